"""Criteo click logs (Kaggle `train.txt`, Terabyte `day_N`; plain or gzip) -> a wdl data set.

    wdl data prepare criteo --input day_0.gz ... day_23.gz --out data/criteo-tb --hash-buckets 1000000
    wdl data prepare criteo --input train.txt --out data/criteo-kaggle --min-frequency 4 --workers 2

Memory stays bounded whatever the input size: the main process cuts the files into blocks of
whole lines (wdl.ingest.criteo_tsv), a pool of `--workers` processes parses and encodes them, and the
results come back in input order (at most 2 blocks per worker in flight) to the DatasetWriter.
Output is therefore identical for any number of workers.

- Dense I1..I13: missing -> 0, then `--dense-transform` log1p (negatives clamped to 0, then
  log(1 + x), the DLRM convention), clamp (negatives to 0 only) or none; float32.
- Categorical C1..C26: `--hash-buckets N`: id = 1 + hash(column, value) % (N - 1); or
  `--min-frequency K`: a first pass counts each value over the train rows, values seen at least
  K times get ids 1.. (in value order), the rest are out-of-vocabulary. Either way id 0 means
  missing or out-of-vocabulary and vocab_size is what the manifest says. Counting keeps one
  (value, count) pair per distinct value in memory: ~12 bytes each, a few hundred MB for the
  Kaggle set; prefer hashing for Terabyte.
- Splits: `days` (files named day_N: the test day, by default the highest N, e.g. 23, is
  test, the earlier days train; `--halve-test-day` makes its first half valid and its second
  half test) or `random` (each line by a hash of (seed, file, line number), so the split does
  not depend on the number of workers).
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from wdl.data.hashing import mix64, unit_uniform
from wdl.data.writer import DatasetWriter, RunningStats
from wdl.errors import DataError
from wdl.ingest import criteo_tsv
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE, Block, Parsed
from wdl.ingest.pool import ordered_map

DEFAULT_HASH_BUCKETS = 1_000_000
_DAY = re.compile(r"^day_(\d+)(\..+)?$")
_MAX_WARNINGS = 20


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


@dataclass
class Tally:
    """What the main process accumulates: lines, bad lines by reason, rows per split."""

    lines: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)
    rows: collections.Counter = field(default_factory=collections.Counter)
    positives: collections.Counter = field(default_factory=collections.Counter)
    warned: int = 0


# ---------------------------------------------------------------------------------- workers
_PLAN: Plan | None = None


def _init_worker(plan: Plan) -> None:
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


def _count_job(block: Block) -> tuple[Block, Parsed, list]:
    """First pass of vocabulary mode: distinct values and their counts over the train rows."""
    p = criteo_tsv.parse_block(block)
    train = _assign(_PLAN, p, block.file_index) == 0
    counts = []
    for j in range(len(CATEGORICAL)):
        v = p.cat[train & ~p.cat_missing[:, j], j]
        counts.append(np.unique(v, return_counts=True))
    return _strip(block), _strip_parsed(p), counts


def _encode_job(block: Block) -> tuple[Block, Parsed, dict[str, pa.Table]]:
    plan = _PLAN
    p = criteo_tsv.parse_block(block)
    where = _assign(plan, p, block.file_index)
    dense = np.nan_to_num(p.dense, nan=0.0)
    if plan.dense_transform in ("log1p", "clamp"):
        dense = np.maximum(dense, 0.0)
    if plan.dense_transform == "log1p":
        dense = np.log1p(dense)
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


def _strip(block: Block) -> Block:
    """The block without its text: only its position goes back to the main process."""
    return Block(block.path, block.file_index, block.first_line, block.lines, b"", block.raw_bytes)


def _strip_parsed(p: Parsed) -> Parsed:
    empty = np.zeros(0)
    return Parsed(empty, empty, empty, empty, empty, p.bad, p.first_bad)


def _pipeline(job, blocks, plan: Plan, workers: int):
    return ordered_map(job, blocks, workers, _init_worker, plan)


# ---------------------------------------------------------------------------------- main side
def _plan_splits(inputs: list[str], split: str, test_day: int | None, halve: bool,
                 test_fraction: float, valid_fraction: float) -> tuple[str, list[str], int, dict]:
    days = [_DAY.match(os.path.basename(p)) for p in inputs]
    if split == "auto":
        split = "days" if all(days) and len({int(d.group(1)) for d in days}) > 1 else "random"
    if split == "random":
        if not (0 <= test_fraction < 1 and 0 <= valid_fraction < 1 and test_fraction + valid_fraction < 1):
            raise DataError(f"--test-fraction {test_fraction} and --valid-fraction {valid_fraction} must be in [0, 1) "
                            "and leave rows for training")
        if test_fraction == 0:
            print("wdl: note: --test-fraction 0 leaves the test split empty; training on this set needs "
                  "data.eval_split set to another split", flush=True)
        return "random", ["random"] * len(inputs), 0, {"kind": "random", "test_fraction": test_fraction,
                                                       "valid_fraction": valid_fraction}
    bad = [p for p, d in zip(inputs, days) if not d]
    if bad:
        raise DataError(f"--split days needs inputs named day_N (Criteo Terabyte), got {bad[0]}")
    numbers = [int(d.group(1)) for d in days]
    test_day = max(numbers) if test_day is None else test_day
    if test_day not in numbers:
        raise DataError(f"test day {test_day} is not among the inputs (days {sorted(set(numbers))})")
    later = sorted({n for n in numbers if n > test_day})
    if later:
        raise DataError(f"day {later[0]} comes after the test day {test_day}: training on it would use the future; "
                        "leave it out of --input")
    if all(n == test_day for n in numbers):
        raise DataError(f"every input is the test day {test_day}: nothing to train on")
    rules = ["halves" if n == test_day and halve else "test" if n == test_day else "train" for n in numbers]
    half = 0
    if halve:
        test_files = [p for p, n in zip(inputs, numbers) if n == test_day]
        if len(test_files) > 1:
            raise DataError(f"--halve-test-day needs exactly one file for day {test_day}, got {len(test_files)}")
        half = criteo_tsv.count_lines(test_files[0]) // 2  # first half valid, second half test
    info = {"kind": "days", "test_day": test_day, "train_days": sorted({n for n in numbers if n != test_day}),
            "test_day_halved": halve, "rule": "day < test_day -> train; test day -> test"
            + (" (first half -> valid)" if halve else "")}
    return "days", rules, half, info


def _check_bad(block: Block, p: Parsed, tally: Tally, on_bad: str, report: bool) -> None:
    for reason, n in p.bad.items():
        tally.bad[reason] += n
    if not p.bad:
        return
    line, message = p.first_bad[0]
    if on_bad == "error":
        raise DataError(f"{block.path}:{line}: bad line: {message} (--on-bad-line skip or warn drops bad lines)")
    if on_bad == "warn" and report:
        for line, message in p.first_bad:
            if tally.warned < _MAX_WARNINGS:
                print(f"warning: {block.path}:{line}: skipped bad line: {message}", file=sys.stderr)
            elif tally.warned == _MAX_WARNINGS:
                print("warning: further bad lines are skipped silently; the summary counts them", file=sys.stderr)
            tally.warned += 1


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True,
                disable=None if enabled else True, file=sys.stderr)


def _blocks(inputs: list[str], block_bytes: int):
    for i, path in enumerate(inputs):
        yield from criteo_tsv.iter_blocks(path, i, block_bytes)


def _count_vocabs(inputs, plan, workers, on_bad, min_frequency, block_bytes, progress) -> list[np.ndarray]:
    """Pass 1: per column, the sorted values seen at least `min_frequency` times in train rows."""
    merged = [(np.zeros(0, np.uint32), np.zeros(0, np.int64)) for _ in CATEGORICAL]
    pending: list[list] = [[] for _ in CATEGORICAL]
    pending_size = 0
    tally = Tally()

    def merge(j: int) -> None:
        vals = np.concatenate([merged[j][0], *(u for u, _ in pending[j])])
        cnts = np.concatenate([merged[j][1], *(c for _, c in pending[j])])
        u, inv = np.unique(vals, return_inverse=True)
        merged[j] = (u, np.bincount(inv, weights=cnts, minlength=len(u)).astype(np.int64))
        pending[j] = []

    bar = _progress(criteo_tsv.input_size(inputs), "count", progress)
    for block, p, counts in _pipeline(_count_job, _blocks(inputs, block_bytes), plan, workers):
        _check_bad(block, p, tally, on_bad, report=False)
        for j, c in enumerate(counts):
            pending[j].append(c)
            pending_size += len(c[0])
        if pending_size > 8_000_000:  # merge in batches: np.unique over everything at once is O(n log n)
            for j in range(len(CATEGORICAL)):
                merge(j)
            pending_size = 0
        bar.update(block.raw_bytes)
    bar.close()
    for j in range(len(CATEGORICAL)):
        merge(j)
    return [u[c >= min_frequency] for u, c in merged]


def prepare_criteo(inputs, out, *, hash_buckets: int | None = None, min_frequency: int | None = None,
                   workers: int = 1, on_bad_line: str = "error", split: str = "auto", test_fraction: float = 0.1,
                   valid_fraction: float = 0.0, test_day: int | None = None, halve_test_day: bool = False,
                   seed: int = 2021, dense_transform: str = "log1p", overwrite: bool = False,
                   row_group_rows: int = 16384, rows_per_file: int = 1_000_000, progress: bool = True,
                   block_bytes: int = criteo_tsv.BLOCK_BYTES) -> dict:
    """Convert Criteo TSV files into a data set at `out`; returns the summary (also in the manifest)."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise DataError("no --input files given")
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"input {p} does not exist or is not a file")
    if hash_buckets is not None and min_frequency is not None:
        raise DataError("give --hash-buckets or --min-frequency, not both")
    if min_frequency is None and hash_buckets is None:
        hash_buckets = DEFAULT_HASH_BUCKETS
    if hash_buckets is not None and hash_buckets < 2:
        raise DataError(f"--hash-buckets must be >= 2 (id 0 is reserved), got {hash_buckets}")
    if min_frequency is not None and min_frequency < 1:
        raise DataError(f"--min-frequency must be >= 1, got {min_frequency}")
    if on_bad_line not in ("error", "skip", "warn"):
        raise DataError(f"--on-bad-line must be error, skip or warn, got {on_bad_line!r}")
    if dense_transform not in ("log1p", "clamp", "none"):
        raise DataError(f"--dense-transform must be log1p, clamp or none, got {dense_transform!r}")
    kind, rules, half, split_info = _plan_splits(inputs, split, test_day, halve_test_day, test_fraction, valid_fraction)
    if kind == "random":
        split_info["seed"] = seed
    plan = Plan(kind, rules, half, seed, test_fraction, valid_fraction, dense_transform, hash_buckets)
    workers = max(1, int(workers))
    start = time.perf_counter()

    with DatasetWriter(out, name="criteo", overwrite=overwrite, rows_per_file=rows_per_file,
                       row_group_rows=row_group_rows) as w:
        if min_frequency is not None:
            plan.vocabs = _count_vocabs(inputs, plan, workers, on_bad_line, min_frequency, block_bytes, progress)
        tally = Tally()
        stats = [RunningStats() for _ in DENSE]
        bar = _progress(criteo_tsv.input_size(inputs), "prepare", progress)
        for block, p, tables in _pipeline(_encode_job, _blocks(inputs, block_bytes), plan, workers):
            _check_bad(block, p, tally, on_bad_line, report=True)
            tally.lines += block.lines
            for name, t in tables.items():
                w.write(name, t)
                tally.rows[name] += t.num_rows
                tally.positives[name] += int(np.asarray(t.column("label")).sum())
                if name == "train":
                    for j, c in enumerate(DENSE):
                        stats[j].update(t.column(c).to_numpy())
            bar.update(block.raw_bytes)
            rows = sum(tally.rows.values())
            bar.set_postfix_str(f"{rows / max(time.perf_counter() - start, 1e-9):,.0f} rows/s, {rows:,} rows", refresh=False)
        bar.close()
        if tally.rows["train"] == 0:
            raise DataError(f"no good training rows in {', '.join(inputs)} ({tally.lines} lines, "
                            f"{sum(tally.bad.values())} bad)")
        for name in ("valid", "test"):  # the splits the plan promises exist even when empty
            if name == "test" or (kind == "random" and valid_fraction > 0) or (kind == "days" and halve_test_day):
                w.write(name, pa.table({"label": pa.array([], pa.int8()),
                                        **{c: pa.array([], pa.float32()) for c in DENSE},
                                        **{c: pa.array([], pa.int64()) for c in CATEGORICAL}}))
        columns = {c: {"kind": "dense", **s.result(), "transform": dense_transform} for c, s in zip(DENSE, stats)}
        for j, c in enumerate(CATEGORICAL):
            if plan.vocabs is None:
                columns[c] = {"kind": "categorical", "vocab_size": hash_buckets, "encoding": "hash"}
            else:
                values = [v.decode() for v in criteo_tsv.format_hex32(plan.vocabs[j])]
                columns[c] = {"kind": "categorical", "vocab_size": len(values) + 1, "encoding": "vocab",
                              "min_frequency": min_frequency, "vocab_file": w.write_vocab(c, values)}
        seconds = time.perf_counter() - start
        rows = sum(tally.rows.values())
        summary = {
            "lines": tally.lines, "rows": dict(tally.rows), "bad_lines": sum(tally.bad.values()),
            "bad_lines_by_reason": dict(tally.bad), "on_bad_line": on_bad_line,
            "positive_rate": {k: tally.positives[k] / n for k, n in tally.rows.items() if n},
            "vocab_sizes": {c: columns[c]["vocab_size"] for c in CATEGORICAL},
            "seconds": seconds, "rows_per_second": rows / seconds if seconds > 0 else 0.0, "workers": workers,
        }
        source = {"kind": "criteo", "inputs": [os.path.abspath(p) for p in inputs],
                  "categorical": {"hash_buckets": hash_buckets} if plan.vocabs is None else {"min_frequency": min_frequency}}
        extra = {"counts": summary, **_planted_info(inputs, kind)}
        w.commit(source=source, label="label", columns=columns, split=split_info, extra=extra)
    return summary


def _planted_info(inputs: list[str], kind: str) -> dict:
    """A synthetic Criteo-format set (wdl data generate --format criteo-tsv) leaves planted.json
    next to its day files; its Bayes-optimal test AUC still holds for the prepared set."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in inputs}
    if kind != "days" or len(folders) != 1:
        return {}
    path = os.path.join(folders.pop(), "planted.json")
    if not os.path.isfile(path):
        return {}
    try:
        info = json.loads(open(path, encoding="utf-8").read())
        return {"bayes_optimal_auc": float(info["bayes_optimal_auc"]), "planted": info}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def format_summary(out, s: dict) -> str:
    rows = ", ".join(f"{k} {v:,}" for k, v in s["rows"].items())
    pos = ", ".join(f"{k} {v:.4f}" for k, v in s["positive_rate"].items())
    bad = ", ".join(f"{k} {v:,}" for k, v in s["bad_lines_by_reason"].items()) or "none"
    vocab = " ".join(f"{c}={n}" for c, n in s["vocab_sizes"].items())
    return (f"wrote {out}\n  lines {s['lines']:,}; rows: {rows}\n  bad lines: {s['bad_lines']:,} ({bad}; "
            f"--on-bad-line {s['on_bad_line']})\n  positive rate: {pos}\n  vocab sizes: {vocab}\n"
            f"  {s['seconds']:.1f} s, {s['rows_per_second']:,.0f} rows/s with {s['workers']} worker(s)")


# ---------------------------------------------------------------------------------- CLI
def add_prepare_arguments(parser) -> None:
    """Flags of `wdl data prepare criteo`."""
    parser.add_argument("--input", required=True, nargs="+", help="Criteo TSV files, plain or gzip (train.txt, day_0 ...)")
    parser.add_argument("--out", required=True, help="output data set folder")
    enc = parser.add_mutually_exclusive_group()
    enc.add_argument("--hash-buckets", type=int, default=None,
                     help=f"hash each categorical column into N ids (default {DEFAULT_HASH_BUCKETS:,}; 0 = missing)")
    enc.add_argument("--min-frequency", type=int, default=None,
                     help="two passes: a vocabulary of values seen >= K times in train, others -> id 0")
    parser.add_argument("--workers", type=int, default=1, help="parsing processes (default 1)")
    parser.add_argument("--on-bad-line", choices=("error", "skip", "warn"), default="error",
                        help="a malformed line stops the run (default), is dropped, or is dropped with a warning")
    parser.add_argument("--split", choices=("auto", "days", "random"), default="auto",
                        help="days: day_N files, the last day is test; random: by line; auto: days when inputs are day_N")
    parser.add_argument("--test-day", type=int, default=None, help="with --split days: the test day (default the highest)")
    parser.add_argument("--halve-test-day", action="store_true",
                        help="with --split days: first half of the test day -> valid, second half -> test")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="random split: test share (default 0.1)")
    parser.add_argument("--valid-fraction", type=float, default=0.0, help="random split: valid share (default 0)")
    parser.add_argument("--seed", type=int, default=2021, help="seed of the random split")
    parser.add_argument("--dense-transform", choices=("log1p", "clamp", "none"), default="log1p",
                        help="dense values: log(1 + max(x, 0)) (default), max(x, 0), or as read; missing -> 0")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")
    parser.add_argument("--row-group-rows", type=int, default=16384, help="rows per Parquet row group")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args) -> int:
    summary = prepare_criteo(
        args.input, args.out, hash_buckets=args.hash_buckets, min_frequency=args.min_frequency, workers=args.workers,
        on_bad_line=args.on_bad_line, split=args.split, test_fraction=args.test_fraction,
        valid_fraction=args.valid_fraction, test_day=args.test_day, halve_test_day=args.halve_test_day,
        seed=args.seed, dense_transform=args.dense_transform, overwrite=args.overwrite,
        row_group_rows=args.row_group_rows, progress=not args.no_progress)
    print(format_summary(args.out, summary))
    return 0
