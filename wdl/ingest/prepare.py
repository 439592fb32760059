"""Prepare on first use: a config's `data.prepare` names a source that creates `data.path` when
it is missing, so `make train` needs no separate step. Called from above both wdl.data and the
sources (the trainer's rank 0, the benchmark harness), so that wdl.data never imports them."""

from __future__ import annotations

from pathlib import Path

from wdl.config import DataConfig
from wdl.data.dataset import open_dataset
from wdl.data.manifest import Manifest


def open_or_prepare(cfg: DataConfig) -> Manifest:
    """The data set at cfg.path; prepared first when missing and cfg.prepare names a source."""
    root = Path(cfg.path)
    # Only a missing (or empty) folder is prepared: anything else is reported by open_dataset.
    missing = not root.exists() or (root.is_dir() and not any(root.iterdir()))
    if missing and cfg.prepare.source == "movielens":
        from wdl.ingest.movielens import prepare_movielens

        print(f"wdl: {root} has no data set yet; preparing MovieLens {cfg.prepare.variant} there", flush=True)
        prepare_movielens(cfg.prepare.variant, root)
    return open_dataset(cfg)
