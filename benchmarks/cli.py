"""`wdl bench ...` and `python -m benchmarks ...`.

The harness is not installed with the `wdl` package: it needs the source tree (launch/train.py,
configs/, suites/). `wdl bench` loads it from there (wdl/cli.py) and hands its arguments to `main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    sub = bench.add_subparsers(dest="bench_command", required=True)
    r = sub.add_parser("run", help="run a suite (a name from `wdl bench list`, or a YAML path)")
    r.add_argument("suite")
    r.add_argument("--out", default=None, help="result folder (default benchmarks/out/SUITE-DATE)")
    r.add_argument("--install-peers", action="store_true",
                   help="create the peers' venvs under .venv-peers/ first (downloads from PyPI)")
    r.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value",
                   help="suite keys (epochs=2, repetitions=3) or trainer config keys (train.*, data.*, model.*, ...)")
    r.set_defaults(func=run_main)
    ls = sub.add_parser("list", help="list the suites")
    ls.set_defaults(func=list_main)
    c = sub.add_parser("compare", help="ratios B/A between two results; flags changes beyond the noise")
    c.add_argument("a", help="results.json (or its folder): the baseline")
    c.add_argument("b", help="results.json (or its folder): the candidate")
    c.add_argument("--fail-on-regression", action="store_true", help="exit 1 when something got worse beyond noise")
    c.set_defaults(func=compare_main)


def run_main(args: argparse.Namespace) -> int:
    from benchmarks.machine import ROOT
    from benchmarks.run import run_suite
    from benchmarks.suite import load_suite

    # Options may follow the suite's name, mixed with key=value items.
    p = argparse.ArgumentParser(prog="wdl bench run SUITE")
    p.add_argument("--out", default=args.out)
    p.add_argument("--install-peers", action="store_true", default=args.install_peers)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(args.rest, namespace=args)
    suite = load_suite(args.suite, args.overrides)
    _check_counts(suite)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"{suite['name']}-{stamp}"
    result = run_suite(suite, out.resolve(), install_peers=args.install_peers)
    print((out / "report.md").read_text())
    n = len(result.get("measurements", result.get("runs", [])))  # a quality file's result holds runs
    print(f"bench: results in {out} ({n} measurements)")
    return 0


def _check_counts(suite: dict) -> None:
    """The suite's counts, from its file or `key=value` (threads=abc was a ValueError deep in the run)."""
    from wdl.errors import ConfigError

    for key, least in (("threads", 0), ("repetitions", 1), ("epochs", 1), ("warmup_epochs", 0)):
        value = suite.get(key)
        if key == "threads" and value is None:  # unset: each library's own default
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"suite {suite['name']!r}: {key}={value!r} must be a whole number >= {least}")


def list_main(args: argparse.Namespace) -> int:
    from benchmarks.suite import list_suites

    for name, desc in list_suites():
        print(f"{name:<24} {desc}")
    return 0


def compare_main(args: argparse.Namespace) -> int:
    from benchmarks.results import compare, format_compare, load_result

    rows, notes = compare(load_result(args.a), load_result(args.b))
    print(format_compare(rows, notes))
    return 1 if args.fail_on_regression and any(r["flag"] == "WORSE" for r in rows) else 0


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    from wdl.cli import run_guarded

    parser = argparse.ArgumentParser(prog=prog, description="wdl benchmark harness")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
