"""`wdl predict`: score rows with a trained model.

    wdl predict runs/NAME [--checkpoint best|latest|PATH] [--data DIR] [--split S] --out scores.parquet
    torchrun --nproc_per_node N -m wdl.cli predict runs/NAME ...   (each rank scores its own part)

The model is rebuilt from the run's config.yaml exactly as training built it (same tables,
same placement code) and only its weights are loaded. Input is a wdl data set folder (the
training one by default) whose columns the run's feature spec reads; ids and normalisation
come from the training data set's manifest. Rows are read in file order without shuffling,
each rank a contiguous part, so the output holds every input row exactly once, in input order:
`row` (position in the split), `score` (probability) and `label` when the input has one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wdl.errors import CheckpointError, ConfigError, DataError


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--data", default=None, metavar="DIR", help="a wdl data set folder (default: the run's training data)")
    p.add_argument("--split", default=None, help="split of --data to score (default: the run's data.eval_split)")
    p.add_argument("--out", required=True, help="Parquet file to write (row, score, label)")
    p.add_argument("--batch-size", type=int, default=16384)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """RUN (positionally or --run) and --checkpoint: which trained model a command uses."""
    p.add_argument("run", nargs="?", default=None, help="run folder of a trained model (holds config.yaml and checkpoints/)")
    # Also as an option; under torchrun give it positionally (torchrun takes --run for its own --run-path).
    p.add_argument("--run", dest="run_option", default=None, metavar="RUN", help="the same as RUN")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="best: the validation-selected epoch (latest when the run had no validation split); "
                        "latest: the newest good checkpoint; or a checkpoint folder")


def predict_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.data.manifest import load_manifest
    from wdl.data.parquet import StreamingLoader, list_row_groups
    from wdl.distributed.env import all_gather_cat, close_distributed, init_distributed
    from wdl.train import run_log
    from wdl.train.evaluate import predict

    run = run_folder(args, "predict")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as scores.parquet")
    cfg = load_config(run / "config.yaml")
    ckpt = pick_checkpoint(run, cfg, args.checkpoint)
    run_log.capture()
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    try:
        manifest = open_dataset(cfg.data)  # ids and statistics of training
        spec = feature_spec(cfg, manifest)
        source = load_manifest(Path(args.data)) if args.data else manifest
        split = args.split or cfg.data.eval_split
        files = [f.path for f in source.split(split).files]
        if not files:
            raise DataError(f"the {split!r} split of {source.root} has no files")
        names = set(pq.read_schema(files[0]).names)
        spec.has_labels = spec.label in names
        loader = StreamingLoader(list_row_groups(files, spec), spec, args.batch_size, rank=env.rank,
                                 world_size=env.world_size, shuffle=False)

        placed = load_trained_model(cfg, spec, env, ckpt)
        scores, labels = predict(placed.model, loader, env.device)
        scores, labels = all_gather_cat(scores), all_gather_cat(labels)  # rank order = input order
        if env.is_main:
            columns = {"row": pa.array(np.arange(len(scores), dtype=np.int64)),
                       "score": pa.array(scores.numpy().astype(np.float32))}
            if spec.has_labels:
                columns["label"] = pa.array(labels.numpy().astype(np.int8))
            write_parquet(pa.table(columns), out)
            print(f"wdl: scored {len(scores)} rows of {source.root}/{split} with {ckpt} -> {out}", flush=True)
    finally:
        run_log.release()
        close_distributed()
    return 0


def write_parquet(table: pa.Table, out: Path) -> None:
    """`table` at `out`, never a half-written file under that name (written aside, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)


def refuse_torchrun(why: str) -> None:
    """For the commands that run in one process: a one-line error under torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{why}; run it without torchrun")


def run_folder(args: argparse.Namespace, command: str) -> Path:
    """The run folder given positionally or as --run (exactly once), checked to hold a config."""
    if bool(args.run) == bool(args.run_option):
        raise ConfigError(f"give the run folder once: wdl {command} RUN ... (or --run RUN)")
    run = Path(args.run or args.run_option)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml there (a run folder is runs/<name>)")
    return run


def load_trained_model(cfg, spec, env, ckpt: Path):
    """The model rebuilt as training built it (tables, placement) with `ckpt`'s weights only
    (the checkpoint's signature is verified first). Returns build_model's placement (`Placed`)."""
    from wdl.checkpoint import Checkpointer
    from wdl.model.embeddings import resolve_backend
    from wdl.train.trainer import build_model, deep_fused_optimizer, model_signature

    backend = resolve_backend(cfg.model.embedding_backend)
    _, model_cfg, placed = build_model(cfg, spec, env, backend, deep_fused_optimizer(cfg, env, backend))
    checkpointer = Checkpointer(ckpt.parent, 1, env.rank, env.world_size, signature=model_signature(model_cfg, spec))
    checkpointer.load_weights(ckpt, {"model": placed.state_module.state_dict()})
    return placed


def pick_checkpoint(run: Path, cfg, which: str) -> Path:
    from wdl.checkpoint import newest_good_checkpoint

    folder = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints"
    if which in ("best", "latest"):
        if which == "best" and (folder / "best").is_dir():
            return folder / "best"
        found = newest_good_checkpoint(folder)
        if found is None:
            raise CheckpointError(f"{run} has no complete checkpoint to score with (looked in {folder})")
        return found
    path = Path(which)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--checkpoint {which}: not a checkpoint folder (no meta.json)")
    return path
