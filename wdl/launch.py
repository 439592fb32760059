"""The training entry point shared by `wdl train` and `launch/train.py` (what torchrun runs):
config -> init distributed -> Trainer -> train -> close."""

from __future__ import annotations

import argparse
import sys

from wdl.errors import WdlError


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
    """Run a command; user errors become one line on stderr and exit status 2."""
    try:
        return fn(*args)
    except WdlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
