"""`wdl` command line: train, tune, predict, export, recommend, data, plan, bench.

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

    p = sub.add_parser("recommend", help="the top k items for a user or a file of users (seen ones left out)")
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

    from wdl.tune import add_tune_arguments, tune_main  # torch loads only when the trials start

    p = sub.add_parser("tune", help="search hyper-parameters on validation (successive halving); the winner as a "
                                    "config, trained once and scored once on test")
    add_tune_arguments(p)
    p.set_defaults(func=tune_main)

    from wdl.config_reference import add_config_commands

    add_config_commands(sub)

    p = sub.add_parser("plan", help="memory per rank and time per step for N GPUs, on paper")
    add_plan_arguments(p)
    p.set_defaults(func=plan_main)

    # The benchmark harness is not installed with wdl: it lives in benchmarks/ of the source tree
    # and is loaded from there when `wdl bench` runs. Its own parser reads the rest of the line
    # (prefix_chars="+": "--out", "-h" are its options, not this parser's).
    bench = sub.add_parser("bench", help="benchmark suites: run, list, compare (from a source checkout)",
                           add_help=False, prefix_chars="+")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=bench_main)
    return parser


def bench_main(args: argparse.Namespace, root: Path | None = None) -> int:
    """`wdl bench ...`: benchmarks/cli.py of the source tree this wdl runs from (`root`). Found by
    name: the harness imports wdl, never the reverse."""
    import importlib

    root = root or Path(__file__).resolve().parents[1]
    if not ((root / "benchmarks" / "cli.py").is_file() and (root / "launch" / "train.py").is_file()):
        raise ConfigError(f"wdl bench runs from a source checkout of wdl (benchmarks/, launch/, configs/), and this "
                          f"wdl is installed without one ({root}); clone the repository and `pip install -e .` there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.cli").main(args.bench_args, prog="wdl bench")


# `wdl plan`'s bounds: beyond them a plan is no use and would take minutes (or overflow) to make.
MAX_RANKS = 4096
MAX_GIB = 1 << 20  # 1 PiB per rank
MAX_BANDWIDTH = 1e7  # GB/s
MAX_ROWS = 1 << 48


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--world-size", type=int, required=True, help=f"ranks (GPUs or processes) in all, up to {MAX_RANKS}")
    p.add_argument("--local-world-size", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GiB of device memory per rank (default 80)")
    p.add_argument("--ddr-gb", type=float, default=512.0, help="GiB of host memory per rank (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the config's data.batch_size)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="TorchRec table weights")
    p.add_argument("--table-rows", nargs="+", default=[], metavar="FEATURE=ROWS",
                   help="table sizes, e.g. for vocab_size: auto when the data set is not prepared")
    p.add_argument("--uvm", action="store_true", help="let TorchRec keep tables in host memory behind an HBM cache")
    for flag, what in (("hbm-bw", "HBM"), ("ddr-bw", "host memory"), ("intra-bw", "intra-node link"),
                       ("inter-bw", "inter-node link")):
        p.add_argument(f"--{flag}", type=float, default=None, metavar="GB/s", help=f"{what} bandwidth (default: TorchRec's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense FLOP/s assumed for the MLP (default 67 on cuda, 0.1 on cpu)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, as for wdl train")


def _check_plan_arguments(args: argparse.Namespace) -> dict[str, int]:
    """One ConfigError for the first argument out of range; the --table-rows as a dict."""
    import math

    for flag, n in (("--world-size", args.world_size), ("--local-world-size", args.local_world_size)):
        if not 1 <= n <= MAX_RANKS:
            raise ConfigError(f"{flag} {n}: must be in [1, {MAX_RANKS}]")
    if args.batch_size is not None and not 1 <= args.batch_size <= 1 << 31:
        raise ConfigError(f"--batch-size {args.batch_size}: must be in [1, 2^31]")
    bounded = [("--hbm-gb", args.hbm_gb, MAX_GIB, args.device == "cuda"), ("--ddr-gb", args.ddr_gb, MAX_GIB, False)]
    bounded += [(f"--{f}", v, MAX_BANDWIDTH, True) for f, v in (("hbm-bw", args.hbm_bw), ("ddr-bw", args.ddr_bw),
                                                                  ("intra-bw", args.intra_bw), ("inter-bw", args.inter_bw))
                if v is not None]
    bounded += [("--peak-tflops", args.peak_tflops, 1e6, True)] if args.peak_tflops is not None else []
    for flag, v, most, positive in bounded:
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0) and v <= most):
            raise ConfigError(f"{flag} {v}: must be a number {'>' if positive else '>='} 0 and at most {most:g}")
    if args.device == "cpu" and args.ddr_gb <= 0:
        raise ConfigError(f"--ddr-gb {args.ddr_gb}: on cpu the tables live in host memory; give it > 0")
    rows = {}
    for item in args.table_rows:
        name, _, n = item.partition("=")
        if not n.isdigit() or not 1 <= int(n) <= MAX_ROWS:
            raise ConfigError(f"--table-rows {item!r}: expected FEATURE=ROWS with ROWS in [1, 2^48]")
        rows[name] = int(n)
    return rows


def plan_main(args: argparse.Namespace) -> int:
    from wdl.train.metrics import finite_json

    from wdl.config import load_config
    from wdl.distributed.plan_report import render
    from wdl.distributed.planning import Hardware
    from wdl.train.build import plan  # torch and torchrec load only when a plan is made

    rows = _check_plan_arguments(args)
    cfg = load_config(args.config, args.overrides)
    hw = Hardware(args.device, args.world_size, args.local_world_size, args.hbm_gb, args.ddr_gb, args.hbm_bw,
                  args.ddr_bw, args.intra_bw, args.inter_bw, args.peak_tflops, args.uvm)
    result = plan(cfg, hw, batch_size=args.batch_size or cfg.data.batch_size, dtype=args.dtype, table_rows=rows)
    print(finite_json(result, indent=1) if args.json else render(result))
    return 0


def export_main(args: argparse.Namespace) -> int:
    from wdl.export import export_main as run_export

    return run_export(args)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of this run (auto) or from PATH")
    p.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="warm start: a new run from another run's model, tables grown to this data set (train.init_from)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides, e.g. train.epochs=2 data.batch_size=512")


def train_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.distributed.env import close_distributed, init_distributed
    from wdl.train.trainer import Trainer

    from wdl.train import run_log

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else []) \
        + ([f"train.init_from={args.init_from}"] if args.init_from else [])
    cfg = load_config(args.config, overrides)
    run_log.capture()  # library warnings go to <run folder>/run.log once the folder is known
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, env)
        summary = trainer.train()
        if cfg.train.refit:  # a new model on every train row for the epochs chosen (wdl/train/refit.py)
            from wdl.train.refit import refit

            run_dir = trainer.run_dir
            trainer.close()
            trainer = None
            refit(cfg, env, run_dir, summary)
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
