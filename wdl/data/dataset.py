"""From config to loaders: open the data set, build the FeatureSpec, and give each rank its
loaders for the train and eval splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import sys
from typing import Any, Optional, Union

import torch

from wdl.config import Config, DataConfig
from wdl.data.batch import FeatureTable
from wdl.data.features import FeatureSpec
from wdl.data.manifest import Manifest, load_manifest
from wdl.data.parquet import (InMemoryLoader, RowGroup, StreamingLoader, list_row_groups, read_row_group,
                              sample_row_groups)
from wdl.data.tables import model_reads
from wdl.errors import DataError


def open_dataset(cfg: DataConfig) -> Manifest:
    """The data set at cfg.path (wdl.ingest.prepare.open_or_prepare first creates a missing one)."""
    return load_manifest(Path(cfg.path))


def feature_spec(cfg: Config, manifest: Manifest) -> FeatureSpec:
    """The spec of exactly what the model reads."""
    reads = model_reads(cfg.model)
    if cfg.features.label != manifest.label and manifest.label:
        raise DataError(f"{manifest.root}: the data set's label column is {manifest.label!r}, the config says {cfg.features.label!r}")
    return FeatureSpec(cfg.features, manifest.columns, reads.sparse, list(reads.dense), root=manifest.root)


def load_table(files: list[Path], spec: FeatureSpec) -> FeatureTable:
    """A whole (small) split as tensors, read row group by row group."""
    parts, open_files = [], {}
    for u in list_row_groups(files, spec):
        t = read_row_group(u, spec.columns, open_files)
        parts.append(spec.encode(t, f"{u.path} (row group {u.index})"))  # rows are counted within the group
    if not parts:
        raise DataError(f"no rows in {', '.join(map(str, files))}")
    return FeatureTable.concat(parts)


Loader = Union[InMemoryLoader, StreamingLoader]


@dataclass
class Loaders:
    """One rank's loaders: `train`; `valid` selects the epoch (None without a validation split);
    `test` is data.eval_split."""

    train: Loader
    valid: Optional[Loader]
    test: Loader
    # Per split read, per column with a vocabulary: values, out_of_vocab, missing (and
    # sampled_row_groups when streaming: counted on a sample of row groups, not all).
    unknown: dict[str, dict[str, dict[str, int]]]


def build_loaders(cfg: DataConfig, manifest: Manifest, spec: FeatureSpec, *, rank: int, world_size: int,
                  device: torch.device, seed: int) -> Loaders:
    def loader(rows: FeatureTable | list[RowGroup], train: bool) -> Loader:
        if isinstance(rows, FeatureTable):
            return InMemoryLoader(rows.to(device), cfg.batch_size if train else cfg.eval_batch_size,
                                  rank=rank, world_size=world_size, shuffle=train, seed=seed)
        return StreamingLoader(rows, spec, cfg.batch_size if train else cfg.eval_batch_size, rank=rank,
                               world_size=world_size, num_workers=cfg.num_workers if train else 0, shuffle=train,
                               shuffle_buffer=cfg.shuffle_buffer, seed=seed, pin_memory=device.type == "cuda",
                               timeout_s=cfg.loader_timeout_s)

    unknown: dict[str, dict[str, dict[str, int]]] = {}
    train = _rows(cfg, manifest, spec, cfg.train_split, "data.train_split", world_size, unknown)
    valid = None
    if cfg.valid_split:
        valid = _rows(cfg, manifest, spec, cfg.valid_split, "data.valid_split", world_size, unknown)
    elif cfg.valid_fraction > 0:
        train, valid = _carve(train, cfg.valid_fraction, seed, world_size, f"{manifest.root}/{cfg.train_split}")
    test = _rows(cfg, manifest, spec, cfg.eval_split, "data.eval_split", world_size, unknown)
    return Loaders(loader(train, True), loader(valid, False) if valid is not None else None, loader(test, False),
                   unknown)


def check_unknown(unknown: dict[str, dict[str, dict[str, int]]], max_fraction: float) -> str | None:
    """A line naming the ids the vocabularies cannot honour, per split (None when there are
    none); a DataError when a column's out-of-vocabulary share passes `max_fraction` (those
    values would all become id 0)."""
    splits = []
    for split, columns in unknown.items():
        parts = []
        for col, c in columns.items():
            n = max(c["values"], 1)
            oov, missing = c["out_of_vocab"] / n, c["missing"] / n
            if oov > max_fraction:
                raise DataError(
                    f"column {col!r}: {oov:.1%} of its values in the {split!r} split are outside its vocabulary "
                    f"and would all become the unknown id 0; raise its vocab_size, use hash_buckets, import the data "
                    f"with `wdl data import`, or allow it with data.max_unknown_fraction (now {max_fraction})")
            what = [f"{oov:.2%} out of vocabulary"] * bool(oov) + [f"{missing:.2%} missing"] * bool(missing)
            if what:
                parts.append(f"{col} {', '.join(what)}")
        if parts:
            sampled = " (sampled)" if any("sampled_row_groups" in c for c in columns.values()) else ""
            splits.append(f"{split}{sampled}: {'; '.join(parts)}")
    return f"unknown ids (id 0): {' | '.join(splits)}" if splits else None


def _rows(cfg: DataConfig, manifest: Manifest, spec: FeatureSpec, split: str, key: str, world_size: int,
          unknown: dict[str, dict[str, dict[str, int]]]) -> FeatureTable | list[RowGroup]:
    """A split's rows: a table in memory, or its row groups to stream. Counts the ids its
    vocabularies cannot honour into `unknown[split]` (all rows in memory, a sample when streaming)."""
    entry = manifest.split(split)
    if entry.rows < world_size:
        raise DataError(f"the {split!r} split of {manifest.root} ({key}) has {entry.rows} rows, too few for "
                        f"{world_size} rank(s); prepare it with more rows or pick another split")
    files = [f.path for f in entry.files]
    spec.take_unknown_counts()
    if cfg.in_memory:
        table = load_table(files, spec)
        unknown[split] = spec.take_unknown_counts()
        return table
    units = list_row_groups(files, spec)
    sample = sample_row_groups(units)
    open_files: dict = {}
    for u in sample:
        spec.encode(read_row_group(u, spec.columns, open_files), f"{u.path} (row group {u.index})")
    unknown[split] = {k: {**c, "sampled_row_groups": len(sample)} for k, c in spec.take_unknown_counts().items()}
    return units


def _carve(rows: FeatureTable | list[RowGroup], fraction: float, seed: int, world_size: int,
           where: str) -> tuple[FeatureTable | list[RowGroup], FeatureTable | list[RowGroup]]:
    """Hold out `fraction` of the train rows for validation, the same rows on every rank and in
    every epoch: single rows in memory, whole row groups when streaming."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(rows, FeatureTable):
        n = len(rows)
        n_valid = int(round(n * fraction))
        order = torch.randperm(n, generator=g)
        held, kept = order[:n_valid].sort().values, order[n_valid:].sort().values
        if n_valid < world_size or n - n_valid < world_size:
            raise DataError(f"data.valid_fraction={fraction} of the {n} rows of {where} leaves too few rows for "
                            f"{world_size} rank(s) on one side")
        return rows.take_table(kept), rows.take_table(held)
    order = torch.randperm(len(rows), generator=g).tolist()
    total, held = sum(u.rows for u in rows), []
    while order and sum(u.rows for u in held) < fraction * total:
        held.append(rows[order.pop(0)])
    kept = [rows[i] for i in sorted(order)]
    if not held or not kept:
        raise DataError(f"data.valid_fraction={fraction}: {where} has {len(rows)} row groups, too few to hold out "
                        "whole row groups for validation; use a valid split in the data (data.valid_split)")
    return kept, sorted(held, key=rows.index)


def warn_single_class(manifest: Any, splits: list[str]) -> None:
    for split in dict.fromkeys(splits):
        rate = manifest.split(split).positive_rate
        if rate in (0.0, 1.0):
            print(f"wdl: warning: every label of the {split!r} split is {int(rate)}, so its AUC is undefined "
                  f"(shown as '-'); logloss is still computed", file=sys.stderr, flush=True)


def read_order(cfg: Config, manifest: Any) -> dict[str, Any]:
    """The settings that fix which rows each step reads within an epoch (see data/parquet.py),
    and the data set itself (its manifest names every shard and its row count)."""
    d = cfg.data
    identity = manifest.identity
    order = {"data.batch_size": d.batch_size, "data.in_memory": d.in_memory, "run.seed": cfg.run.seed,
             "data.valid_split": d.valid_split, "data.valid_fraction": d.valid_fraction,  # what train holds
             "data set (manifest hash)": identity}
    if not d.in_memory:
        order |= {"data.num_workers": d.num_workers, "data.shuffle_buffer": d.shuffle_buffer}
    return order
