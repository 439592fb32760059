"""`wdl` command line: train, predict, export, recommend, data, plan, bench.

`train_main` is also the entry point of launch/train.py, what torchrun runs:
config -> init distributed -> Trainer -> train -> close."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wdl.errors import ConfigError, WdlError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wdl", description="Wide & Deep recommendation models trained at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config (one process; use torchrun launch/train.py for many)")
    add_train_arguments(p)
    p.set_defaults(func=train_main)

    from wdl.predict import add_predict_arguments, add_run_arguments, predict_main

    p = sub.add_parser("predict", help="score a data set's rows with a trained model (Parquet: row, score, label)")
    add_predict_arguments(p)
    p.set_defaults(func=predict_main)

    # wdl.export defines torch modules (torch takes ~3 s to import): loaded only when exporting,
    # so that commands without torch (wdl data ...) start fast.
    p = sub.add_parser("export", help="a trained model as a folder to serve from (torch.export program + feature encoding)")
    add_run_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="artefact folder to write (model.pt2, encoding.json, vocab/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (swapped in whole once the new one loads)")
    p.set_defaults(func=export_main)

    from wdl.recommend import add_recommend_arguments, recommend_main

    p = sub.add_parser("recommend", help="the top k movies for one user of a MovieLens run (seen ones left out)")
    add_recommend_arguments(p)
    p.set_defaults(func=recommend_main)

    data = sub.add_parser("data", help="prepare or generate data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="convert a public data set to wdl Parquet shards")
    prepare_sub = prepare.add_subparsers(dest="source", required=True)

    from wdl.ingest import movielens

    ml = prepare_sub.add_parser("movielens", help="MovieLens 100k ... 32M from GroupLens archives")
    movielens.add_prepare_arguments(ml)
    ml.set_defaults(func=movielens.run_prepare)

    from wdl.ingest import criteo, synthetic

    cr = prepare_sub.add_parser("criteo", help="Criteo TSV click logs (Kaggle train.txt, Terabyte day_N), plain or gzip")
    criteo.add_prepare_arguments(cr)
    cr.set_defaults(func=criteo.run_prepare)
    gen = data_sub.add_parser("generate", help="a synthetic data set with a planted signal and known best AUC")
    synthetic.add_generate_arguments(gen)
    gen.set_defaults(func=synthetic.run_generate)
    from wdl.ingest import import_cli

    imp = data_sub.add_parser("import", help="your own Parquet or CSV files -> a wdl data set (vocabularies, statistics, split)")
    import_cli.add_import_arguments(imp)
    imp.set_defaults(func=import_cli.run_import)

    from wdl.distributed.plan_report import add_plan_arguments  # torchrec is imported only when a plan runs

    add_plan_arguments(sub.add_parser("plan", help="memory per rank and time per step for N GPUs, on paper"))

    # The benchmark harness is not installed with wdl: it lives in benchmarks/ of the source tree
    # and is loaded from there when `wdl bench` runs. Its own parser reads the rest of the line
    # (prefix_chars="+": "--out", "-h" are its options, not this parser's).
    bench = sub.add_parser("bench", help="benchmark suites: run, list, compare (from a source checkout)",
                           add_help=False, prefix_chars="+")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=bench_main)
    return parser


def bench_main(args: argparse.Namespace, root: Path | None = None) -> int:
    """`wdl bench ...`: benchmarks/cli.py of the source tree this wdl runs from (`root`)."""
    root = root or Path(__file__).resolve().parents[1]
    if not ((root / "benchmarks" / "cli.py").is_file() and (root / "launch" / "train.py").is_file()):
        raise ConfigError(f"wdl bench runs from a source checkout of wdl (benchmarks/, launch/, configs/), and this "
                          f"wdl is installed without one ({root}); clone the repository and `pip install -e .` there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.cli import main as harness_main

    return harness_main(args.bench_args, prog="wdl bench")


def export_main(args: argparse.Namespace) -> int:
    from wdl.export import export_main as run_export

    return run_export(args)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of this run (auto) or from PATH")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides, e.g. train.epochs=2 data.batch_size=512")


def train_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.distributed.env import close_distributed, init_distributed
    from wdl.train.trainer import Trainer

    from wdl.train import run_log

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    run_log.capture()  # library warnings go to <run folder>/run.log once the folder is known
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, env)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        run_log.release()
        close_distributed()
    return 0


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, accepting `key=value` overrides anywhere on the line (argparse takes positionals
    only in one run, so `--config C a=1 --resume auto b=2` would lose `b=2`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def run_guarded(fn, *args) -> int:
    """Run a command; user errors become one line on stderr and exit status 2. Ctrl-C and
    SIGTERM (torchrun's, a scheduler's) end it as an interrupt, wherever it was: 130 and 143."""
    import signal

    def terminated(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return fn(*args)
    except WdlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        by_term = e.args == ("SIGTERM",)
        print("interrupted (SIGTERM)" if by_term else "interrupted", file=sys.stderr)
        return 143 if by_term else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
