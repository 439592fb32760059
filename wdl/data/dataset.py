"""From config to loaders: open (or first prepare) the data set, build the FeatureSpec, and
give each rank its loaders for the train and eval splits."""

from __future__ import annotations

from pathlib import Path

import torch

from wdl.config import Config, DataConfig
from wdl.data.features import FeatureSpec, FeatureTable
from wdl.data.manifest import Manifest, load_manifest
from wdl.data.parquet import InMemoryLoader, StreamingLoader, list_row_groups, read_row_group
from wdl.errors import DataError


def open_dataset(cfg: DataConfig, *, may_prepare: bool = True) -> Manifest:
    """The data set at cfg.path; prepared first when missing and cfg.prepare names a source."""
    root = Path(cfg.path)
    # Only a missing (or empty) folder is prepared: anything else is reported by load_manifest.
    missing = not root.exists() or (root.is_dir() and not any(root.iterdir()))
    if missing and may_prepare and cfg.prepare.source == "movielens":
        from wdl.data.movielens import prepare_movielens

        print(f"wdl: {root} has no data set yet; preparing MovieLens {cfg.prepare.variant} there", flush=True)
        prepare_movielens(cfg.prepare.variant, root)
    return load_manifest(root)


def feature_spec(cfg: Config, manifest: Manifest) -> FeatureSpec:
    """The spec of exactly what the model reads."""
    m = cfg.model
    sparse: list[str] = []
    if m.kind in ("wide_deep", "wide"):
        sparse += m.wide.features
    dense: list[str] = []
    if m.kind in ("wide_deep", "deep"):
        sparse += list(m.deep.embeddings)
        dense = list(m.deep.dense)
    if cfg.features.label != manifest.label and manifest.label:
        raise DataError(f"{manifest.root}: the data set's label column is {manifest.label!r}, the config says {cfg.features.label!r}")
    return FeatureSpec(cfg.features, manifest.columns, sparse, dense, root=manifest.root)


def load_table(files: list[Path], spec: FeatureSpec) -> FeatureTable:
    """A whole (small) split as tensors, read row group by row group."""
    parts, open_files = [], {}
    for u in list_row_groups(files, spec):
        t = read_row_group(u, spec.columns, open_files)
        parts.append(spec.encode(t, f"{u.path} (row group {u.index})"))  # rows are counted within the group
    if not parts:
        raise DataError(f"no rows in {', '.join(map(str, files))}")
    return FeatureTable.concat(parts)


def build_loader(cfg: DataConfig, manifest: Manifest, spec: FeatureSpec, split: str, *, train: bool, rank: int,
                 world_size: int, device: torch.device, seed: int) -> InMemoryLoader | StreamingLoader:
    entry = manifest.split(split)
    key = "data.train_split" if train else "data.eval_split"
    if entry.rows < world_size:
        raise DataError(f"the {split!r} split of {manifest.root} ({key}) has {entry.rows} rows, too few for "
                        f"{world_size} rank(s); prepare it with more rows or pick another split")
    files = [f.path for f in entry.files]
    batch_size = cfg.batch_size if train else cfg.eval_batch_size
    if cfg.in_memory:
        table = load_table(files, spec).to(device)
        return InMemoryLoader(table, batch_size, rank=rank, world_size=world_size, shuffle=train, seed=seed)
    return StreamingLoader(files, spec, batch_size, rank=rank, world_size=world_size,
                           num_workers=cfg.num_workers if train else 0, shuffle=train,
                           shuffle_buffer=cfg.shuffle_buffer, seed=seed)
