"""The two passes of `wdl data prepare criteo` over one block of lines, run in worker processes;
`wdl.ingest.criteo` plans them and writes what they return, in input order.

Pass 1 (`count_job`, vocabulary mode only) counts the categorical values of the block's train
rows; pass 2 (`encode_job`) turns its good lines into the data set's columns. Both give each
line its split the same way, from its file and line number, never from the batching or worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from wdl.data.hashing import mix64, unit_uniform
from wdl.errors import DataError
from wdl.ingest import criteo_tsv
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE, Block, Parsed


@dataclass
class Plan:
    """Everything a worker needs to turn a block into tables (sent once per worker)."""

    split: str  # days | random
    file_splits: list[str]  # days: per input, train / test / halves
    half: int  # days with halving: lines of the test day that go to valid
    seed: int
    test_fraction: float
    valid_fraction: float
    dense_transform: str
    hash_buckets: int | None
    vocabs: list[np.ndarray] | None = None  # per categorical column, sorted uint32 values


_PLAN: Plan | None = None  # this worker's plan (init_worker)


def init_worker(plan: Plan) -> None:
    global _PLAN
    _PLAN = plan


def _assign(plan: Plan, p: Parsed, file_index: int) -> np.ndarray:
    """Split of every row: 0 train, 1 valid, 2 test."""
    if plan.split == "days":
        rule = plan.file_splits[file_index]
        if rule == "halves":
            return np.where(p.lines <= plan.half, 1, 2).astype(np.int8)
        return np.full(len(p.lines), {"train": 0, "valid": 1, "test": 2}[rule], dtype=np.int8)
    key = p.lines.astype(np.uint64) ^ (np.uint64(file_index) << np.uint64(40))
    u = unit_uniform(key ^ mix64(np.array([plan.seed], dtype=np.uint64)))
    return np.where(u < plan.test_fraction, 2, np.where(u < plan.test_fraction + plan.valid_fraction, 1, 0)).astype(np.int8)


def count_job(block: Block) -> tuple[Block, Parsed, list]:
    """First pass of vocabulary mode: distinct values and their counts over the train rows."""
    p = criteo_tsv.parse_block(block)
    train = _assign(_PLAN, p, block.file_index) == 0
    counts = []
    for j in range(len(CATEGORICAL)):
        v = p.cat[train & ~p.cat_missing[:, j], j]
        counts.append(np.unique(v, return_counts=True))
    return _strip(block), _strip_parsed(p), counts


def encode_job(block: Block) -> tuple[Block, Parsed, dict[str, pa.Table]]:
    """Second pass: the block's good lines as one table per split (dense transformed, ids encoded)."""
    plan = _PLAN
    p = criteo_tsv.parse_block(block)
    where = _assign(plan, p, block.file_index)
    dense = np.nan_to_num(p.dense, nan=0.0)
    if plan.dense_transform in ("log1p", "clamp"):
        dense = np.maximum(dense, 0.0)
    if plan.dense_transform == "log1p":
        dense = np.log1p(dense)
    _check_float32(dense, p, block, plan.dense_transform)
    ids = np.zeros(p.cat.shape, dtype=np.int64)
    for j in range(len(CATEGORICAL)):
        v = p.cat[:, j]
        if plan.vocabs is None:
            salted = v.astype(np.uint64) | (np.uint64(j + 1) << np.uint64(32))
            col = 1 + (mix64(salted) % np.uint64(plan.hash_buckets - 1)).astype(np.int64)
        else:
            vocab = plan.vocabs[j]
            pos = np.searchsorted(vocab, v)
            hit = vocab[np.minimum(pos, len(vocab) - 1)] == v if len(vocab) else np.zeros(len(v), bool)
            col = np.where(hit, pos + 1, 0)
        ids[:, j] = np.where(p.cat_missing[:, j], 0, col)
    tables = {}
    for code, name in enumerate(("train", "valid", "test")):
        rows = where == code
        if rows.any():
            cols = {"label": pa.array(p.label[rows], pa.int8())}
            cols.update({c: pa.array(dense[rows, j].astype(np.float32)) for j, c in enumerate(DENSE)})
            cols.update({c: pa.array(ids[rows, j]) for j, c in enumerate(CATEGORICAL)})
            tables[name] = pa.table(cols)
    return _strip(block), _strip_parsed(p), tables


def _check_float32(dense: np.ndarray, p: Parsed, block: Block, transform: str) -> None:
    """The data set stores float32: a value beyond its range would be written as inf (and make
    the manifest's statistics NaN)."""
    out = np.abs(dense) > np.finfo(np.float32).max
    if out.any():
        row, j = map(int, np.argwhere(out)[0])
        raise DataError(f"{block.path}:{int(p.lines[row])}: {DENSE[j]} value {dense[row, j]:g} is beyond float32's range "
                        f"(+-{np.finfo(np.float32).max:.1e}) with --dense-transform {transform}; log1p keeps it in range")


def _strip(block: Block) -> Block:
    """The block without its text: only its position goes back to the main process."""
    return Block(block.path, block.file_index, block.first_line, block.lines, b"", block.raw_bytes)


def _strip_parsed(p: Parsed) -> Parsed:
    empty = np.zeros(0)
    return Parsed(empty, empty, empty, empty, empty, p.bad, p.first_bad)
