"""Criteo click logs (Kaggle `train.txt`, Terabyte `day_N`; plain or gzip) -> a wdl data set.

    wdl data prepare criteo --input day_0.gz ... day_23.gz --out data/criteo-tb --hash-buckets 1000000
    wdl data prepare criteo --input train.txt --out data/criteo-kaggle --min-frequency 4 --workers 2

Memory stays bounded whatever the input size: the main process cuts the files into blocks of
whole lines (wdl.ingest.criteo_tsv), a pool of `--workers` processes parses and encodes them
(wdl.ingest.criteo_passes), and the results come back in input order (at most 2 blocks per worker in flight) to the DatasetWriter.
Output is therefore identical for any number of workers.

- Dense I1..I13: missing -> 0, then `--dense-transform` log1p (negatives clamped to 0, then
  log(1 + x), the DLRM convention), clamp (negatives to 0 only) or none; float32 (a value beyond
  its range is an error naming the line, where it would be written as inf).
- Inputs: each file once (a path given twice, a link or a hard link to one is refused).
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

from wdl.data.column_stats import RunningStats
from wdl.data.writer import DatasetWriter
from wdl.errors import DataError
from wdl.ingest import criteo_tsv, leftovers
from wdl.ingest.criteo_passes import Plan, count_job, encode_job, init_worker
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE, Block, Parsed
from wdl.ingest.options import from_args, resolve, seed_problem
from wdl.ingest.pool import ordered_map, worker_count

DEFAULT_HASH_BUCKETS = 1_000_000
ON_BAD_LINE = ("error", "skip", "warn")
SPLITS = ("auto", "days", "random")
DENSE_TRANSFORMS = ("log1p", "clamp", "none")
_DAY = re.compile(r"^day_(\d+)(\..+)?$")
_MAX_WARNINGS = 20


@dataclass(frozen=True)
class CriteoOptions:
    """How `wdl data prepare criteo` encodes, splits and writes: its flags, one field each."""

    hash_buckets: int | None = None  # ids per categorical column (default DEFAULT_HASH_BUCKETS) ...
    min_frequency: int | None = None  # ... or a vocabulary of the values seen this often in train
    workers: int = 1  # parsing processes (fewer than 1 counts as 1)
    on_bad_line: str = "error"  # ON_BAD_LINE
    split: str = "auto"  # SPLITS: days when the inputs are day_N files of several days
    test_fraction: float = 0.1  # random split
    valid_fraction: float = 0.0  # random split
    test_day: int | None = None  # days split: the test day (default the highest)
    halve_test_day: bool = False  # days split: the test day's first half is valid
    seed: int = 2021  # random split
    dense_transform: str = "log1p"  # DENSE_TRANSFORMS
    overwrite: bool = False
    row_group_rows: int = 16384
    rows_per_file: int = 1_000_000
    progress: bool = True
    block_bytes: int = criteo_tsv.BLOCK_BYTES  # text per parse call

    def __post_init__(self) -> None:
        if (problem := seed_problem(self.seed)) is not None:
            raise DataError(f"--seed: {problem}")
        if self.hash_buckets is not None and self.min_frequency is not None:
            raise DataError("give --hash-buckets or --min-frequency, not both")
        if self.buckets is not None and self.buckets < 2:
            raise DataError(f"--hash-buckets must be >= 2 (id 0 is reserved), got {self.buckets}")
        if self.min_frequency is not None and self.min_frequency < 1:
            raise DataError(f"--min-frequency must be >= 1, got {self.min_frequency}")
        if self.on_bad_line not in ON_BAD_LINE:
            raise DataError(f"--on-bad-line must be error, skip or warn, got {self.on_bad_line!r}")
        if self.split not in SPLITS:
            raise DataError(f"--split must be auto, days or random, got {self.split!r}")
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise DataError(f"--dense-transform must be log1p, clamp or none, got {self.dense_transform!r}")

    @property
    def buckets(self) -> int | None:
        """Hash buckets per categorical column; None with a vocabulary (min_frequency)."""
        if self.min_frequency is not None:
            return None
        return DEFAULT_HASH_BUCKETS if self.hash_buckets is None else self.hash_buckets


@dataclass
class Tally:
    """What the main process accumulates: lines, bad lines by reason, rows per split."""

    lines: int = 0
    bad: collections.Counter = field(default_factory=collections.Counter)
    rows: collections.Counter = field(default_factory=collections.Counter)
    positives: collections.Counter = field(default_factory=collections.Counter)
    warned: int = 0


def _pipeline(job, blocks, plan: Plan, workers: int):
    return ordered_map(job, blocks, workers, init_worker, plan)


# ---------------------------------------------------------------------------------- main side
def _plan_splits(inputs: list[str], opts: CriteoOptions) -> tuple[str, list[str], int, dict]:
    """(split kind, per input its rule, valid lines of a halved test day, the manifest's split)."""
    split, test_day, halve = opts.split, opts.test_day, opts.halve_test_day
    test_fraction, valid_fraction = opts.test_fraction, opts.valid_fraction
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
                                                       "valid_fraction": valid_fraction, "seed": opts.seed}
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


def _count_vocabs(inputs: list[str], plan: Plan, workers: int, opts: CriteoOptions) -> list[np.ndarray]:
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

    bar = _progress(criteo_tsv.input_size(inputs), "count", opts.progress)
    for block, p, counts in _pipeline(count_job, _blocks(inputs, opts.block_bytes), plan, workers):
        _check_bad(block, p, tally, opts.on_bad_line, report=False)
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
    return [u[c >= opts.min_frequency] for u, c in merged]


def prepare_criteo(inputs, out, opts: CriteoOptions | None = None, **options) -> dict:
    """Convert Criteo TSV files into a data set at `out`; returns the summary (also in the manifest).
    opts: a CriteoOptions, or its fields as keywords (applied over it when both are given)."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise DataError("no --input files given")
    _check_inputs(inputs)
    opts = resolve(CriteoOptions, opts, options)
    kind, rules, half, split_info = _plan_splits(inputs, opts)
    plan = Plan(kind, rules, half, opts.seed, opts.test_fraction, opts.valid_fraction, opts.dense_transform,
                opts.buckets)
    workers = worker_count(opts.workers)
    start = time.perf_counter()

    leftovers.clear_stale(out)
    with DatasetWriter(out, name="criteo", overwrite=opts.overwrite, rows_per_file=opts.rows_per_file,
                       row_group_rows=opts.row_group_rows) as w, leftovers.hold(w.tmp):
        if opts.min_frequency is not None:
            plan.vocabs = _count_vocabs(inputs, plan, workers, opts)
        tally, stats = _encode(w, inputs, plan, workers, opts, start)
        if tally.rows["train"] == 0:
            raise DataError(f"no good training rows in {', '.join(inputs)} ({tally.lines} lines, "
                            f"{sum(tally.bad.values())} bad)")
        for name in ("valid", "test"):  # the splits the plan promises exist even when empty
            if name == "test" or (kind == "random" and opts.valid_fraction > 0) or (kind == "days" and opts.halve_test_day):
                w.write(name, pa.table({"label": pa.array([], pa.int8()),
                                        **{c: pa.array([], pa.float32()) for c in DENSE},
                                        **{c: pa.array([], pa.int64()) for c in CATEGORICAL}}))
        columns = _columns(w, plan, stats, opts)
        summary = _summary(tally, columns, opts.on_bad_line, workers, time.perf_counter() - start)
        source = {"kind": "criteo", "inputs": [os.path.abspath(p) for p in inputs],
                  "categorical": ({"hash_buckets": opts.buckets} if plan.vocabs is None
                                  else {"min_frequency": opts.min_frequency})}
        extra = {"counts": summary, **_planted_info(inputs, kind)}
        w.commit(source=source, label="label", columns=columns, split=split_info, extra=extra)
    return summary


def _check_inputs(inputs: list[str]) -> None:
    """Every input is a file, and no file comes twice (named twice, through a link, or by two
    globs): its lines would be rows twice, and the random split would put copies in train and test."""
    seen: dict = {}
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"input {p} does not exist or is not a file")
        st = os.stat(p)
        for key in (os.path.realpath(p), (st.st_dev, st.st_ino)):
            if key in seen:
                raise DataError(f"input {p} is the same file as {seen[key]}: give each file once")
            seen[key] = p


def _encode(w: DatasetWriter, inputs: list[str], plan: Plan, workers: int, opts: CriteoOptions,
            start: float) -> tuple[Tally, list[RunningStats]]:
    """Pass 2: every block parsed, encoded and written; bad lines tallied; the train rows'
    dense statistics."""
    tally = Tally()
    stats = [RunningStats() for _ in DENSE]
    bar = _progress(criteo_tsv.input_size(inputs), "prepare", opts.progress)
    for block, p, tables in _pipeline(encode_job, _blocks(inputs, opts.block_bytes), plan, workers):
        _check_bad(block, p, tally, opts.on_bad_line, report=True)
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
    return tally, stats


def _columns(w: DatasetWriter, plan: Plan, stats: list[RunningStats], opts: CriteoOptions) -> dict:
    """The manifest's column entries (vocabularies written in vocabulary mode)."""
    columns = {c: {"kind": "dense", **s.result(), "transform": opts.dense_transform} for c, s in zip(DENSE, stats)}
    for j, c in enumerate(CATEGORICAL):
        if plan.vocabs is None:
            columns[c] = {"kind": "categorical", "vocab_size": opts.buckets, "encoding": "hash"}
        else:
            values = [v.decode() for v in criteo_tsv.format_hex32(plan.vocabs[j])]
            columns[c] = {"kind": "categorical", "vocab_size": len(values) + 1, "encoding": "vocab",
                          "min_frequency": opts.min_frequency, "vocab_file": w.write_vocab(c, values)}
    return columns


def _summary(tally: Tally, columns: dict, on_bad_line: str, workers: int, seconds: float) -> dict:
    rows = sum(tally.rows.values())
    return {
        "lines": tally.lines, "rows": dict(tally.rows), "bad_lines": sum(tally.bad.values()),
        "bad_lines_by_reason": dict(tally.bad), "on_bad_line": on_bad_line,
        "positive_rate": {k: tally.positives[k] / n for k, n in tally.rows.items() if n},
        "vocab_sizes": {c: columns[c]["vocab_size"] for c in CATEGORICAL},
        "seconds": seconds, "rows_per_second": rows / seconds if seconds > 0 else 0.0, "workers": workers,
    }


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
    """Flags of `wdl data prepare criteo`: the fields of CriteoOptions, with their defaults."""
    d = CriteoOptions()
    add = parser.add_argument
    add("--input", required=True, nargs="+", help="Criteo TSV files, plain or gzip (train.txt, day_0 ...)")
    add("--out", required=True, help="output data set folder")
    enc = parser.add_mutually_exclusive_group()
    enc.add_argument("--hash-buckets", type=int, default=d.hash_buckets,
                     help=f"hash each categorical column into N ids (default {DEFAULT_HASH_BUCKETS:,}; 0 = missing)")
    enc.add_argument("--min-frequency", type=int, default=d.min_frequency,
                     help="two passes: a vocabulary of values seen >= K times in train, others -> id 0")
    add("--workers", type=int, default=d.workers, help=f"parsing processes (default {d.workers}; at most the usable cores)")
    add("--on-bad-line", choices=ON_BAD_LINE, default=d.on_bad_line,
        help="a malformed line stops the run (default), is dropped, or is dropped with a warning")
    add("--split", choices=SPLITS, default=d.split,
        help="days: day_N files, the last day is test; random: by line; auto: days when inputs are day_N")
    add("--test-day", type=int, default=d.test_day, help="with --split days: the test day (default the highest)")
    add("--halve-test-day", action="store_true",
        help="with --split days: first half of the test day -> valid, second half -> test")
    add("--test-fraction", type=float, default=d.test_fraction, help=f"random split: test share (default {d.test_fraction})")
    add("--valid-fraction", type=float, default=d.valid_fraction,
        help=f"random split: valid share (default {d.valid_fraction:g})")
    add("--seed", type=int, default=d.seed, help="seed of the random split")
    add("--dense-transform", choices=DENSE_TRANSFORMS, default=d.dense_transform,
        help="dense values: log(1 + max(x, 0)) (default), max(x, 0), or as read; missing -> 0")
    add("--overwrite", action="store_true", help="replace an existing data set at --out")
    add("--row-group-rows", type=int, default=d.row_group_rows, help="rows per Parquet row group")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_prepare(args) -> int:
    summary = prepare_criteo(args.input, args.out, **from_args(CriteoOptions, args))
    print(format_summary(args.out, summary))
    return 0
