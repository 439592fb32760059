"""`wdl data generate`: synthetic data sets with a planted signal (models in wdl.ingest.planted).

    wdl data generate --profile criteo --rows 1000000 --out data/synthetic-criteo
    wdl data generate --profile criteo --rows 100000000 --out /tmp/crit-tsv --format criteo-tsv --workers 2
    wdl data prepare criteo --input /tmp/crit-tsv/day_0 /tmp/crit-tsv/day_1 --out data/from-tsv

Rows are generated in chunks of CHUNK_ROWS, chunk k from the random stream (seed, k), by a
pool of workers; results are written in chunk order, so the output depends only on the seed
and memory stays bounded (a few chunks in flight) however many rows are asked for.

Each row goes to train/valid/test by a uniform draw. The Bayes-optimal test AUC, the AUC of
the true probabilities on the test rows, is accumulated over a fine histogram of p (2^20 bins;
ties within a bin count half, an error below 1e-5 at these sizes) and written into the
manifest as `bayes_optimal_auc`; Parquet rows also carry their true probability (`bayes_p`).

`--format criteo-tsv` (criteo profile) writes Criteo's TSV layout instead: `day_0` holds the
train rows and `day_1` the test rows, so `wdl data prepare criteo` (days split: the last day is
test) reproduces the same split; `planted.json` next to them carries the Bayes-optimal AUC,
and prepare copies it into its manifest.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from wdl.data.column_stats import RunningStats
from wdl.data.hashing import mix64
from wdl.data.writer import DatasetWriter
from wdl.errors import DataError
from wdl.ingest import planted
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE, format_hex32
from wdl.ingest.options import from_args, resolve, seed_problem
from wdl.ingest.pool import ordered_map
from wdl.ingest.vocab import Reservoir

CHUNK_ROWS = 1 << 17
# Equal-frequency buckets of each dense column (edges in the manifest, for `buckets: auto`): enough
# for the wide part to follow a smooth non-linear effect such as the planted sin(2 I7).
DENSE_BUCKETS = 20
AUC_BINS = 1 << 20
SPLITS = ("train", "valid", "test")
PROFILES = ("criteo", "movielens")
FORMATS = ("parquet", "criteo-tsv")


@dataclass(frozen=True)
class GenerateOptions:
    """How `wdl data generate` draws, splits and writes its rows: its flags, one field each (what
    it generates, the profile and the number of rows, are `generate`'s own arguments)."""

    seed: int = 2021  # the output depends only on this
    fmt: str = "parquet"  # FORMATS: a wdl data set, or Criteo TSV files (criteo profile)
    test_fraction: float = 0.1
    valid_fraction: float = 0.0
    workers: int = 1  # generating processes (fewer than 1 counts as 1)
    overwrite: bool = False
    row_group_rows: int = 16384
    rows_per_file: int = 1_000_000
    progress: bool = True
    days: int = 0  # > 0: that many data sets out/day-01 ... (movielens profile), `rows` each (planted.Day)

    def __post_init__(self) -> None:
        if (problem := seed_problem(self.seed)) is not None:
            raise DataError(f"--seed: {problem}")
        if isinstance(self.days, bool) or not isinstance(self.days, int) or self.days < 0:
            raise DataError(f"--days must be a whole number >= 0 (0: one data set), got {self.days!r}")
        if self.fmt not in FORMATS:
            raise DataError(f"unknown format {self.fmt!r} (parquet or criteo-tsv)")
        if not (0 < self.test_fraction < 1 and 0 <= self.valid_fraction < 1
                and self.test_fraction + self.valid_fraction < 1):
            raise DataError(f"--test-fraction {self.test_fraction} must be in (0, 1) and leave rows for training "
                            f"with --valid-fraction {self.valid_fraction}")

_JOB: dict = {}


def _init_worker(params: dict) -> None:
    _JOB.clear()
    _JOB.update(params)


def _chunk(k: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Chunk k: (split -> Parquet table or TSV bytes, true p of its test rows, their labels)."""
    j = _JOB
    day = j.get("day")
    rng = np.random.default_rng([j["seed"], k] if day is None else [j["seed"], day.number, k])
    n = min(CHUNK_ROWS, j["rows"] - k * CHUNK_ROWS)
    if j["profile"] == "criteo":
        c = planted.criteo_chunk(j["seed"], rng, n)
    else:
        c = planted.movielens_chunk(j["seed"], rng, n, j["n_users"], j["n_items"], day)
    c["label"] = (rng.random(n) < c["p"]).astype(np.int8)
    u = rng.random(n)
    where = np.where(u < j["test_fraction"], 2, np.where(u < j["test_fraction"] + j["valid_fraction"], 1, 0))
    out = {}
    for code, name in enumerate(SPLITS):
        rows = where == code
        if not rows.any():
            continue
        if j["format"] == "criteo-tsv":
            out[name] = _tsv_bytes(j["seed"], c, rows)
        elif j["profile"] == "criteo":
            out[name] = planted.criteo_table(c, rows)
        else:
            out[name] = planted.movielens_table(c, rows)
    test = where == 2
    return out, c["p"][test], c["label"][test]


def _tsv_bytes(seed: int, c: dict, rows: np.ndarray) -> bytes:
    cols = {"label": pa.array(c["label"][rows], pa.int8())}
    for j, name in enumerate(DENSE):
        cols[name] = pa.array(c["raw"][rows, j], from_pandas=True).cast(pa.int64())
    for j, name in enumerate(CATEGORICAL):
        r = c["ranks"][rows, j]
        hexes = format_hex32(planted.criteo_hex(seed, r, j))
        cols[name] = pa.array(hexes.astype(object), pa.binary(), mask=r < 0).cast(pa.string())
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table(cols), sink, write_options=pacsv.WriteOptions(
        include_header=False, delimiter="\t", quoting_style="none"))
    return sink.getvalue().to_pybytes()


class _AUC:
    """Streaming AUC over a histogram of scores in [0, 1]."""

    def __init__(self) -> None:
        self.pos = np.zeros(AUC_BINS, np.int64)
        self.neg = np.zeros(AUC_BINS, np.int64)

    def update(self, p: np.ndarray, y: np.ndarray) -> None:
        b = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        self.pos += np.bincount(b[y == 1], minlength=AUC_BINS)
        self.neg += np.bincount(b[y == 0], minlength=AUC_BINS)

    def result(self) -> float:
        P, N = self.pos.sum(), self.neg.sum()
        if P == 0 or N == 0:
            return float("nan")
        below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (below + 0.5 * self.neg)).sum() / (P * N))


class _Tally:
    """What the main process counts while writing the chunks: rows and positives per split, the
    Bayes-optimal AUC of the test rows, and the progress bar."""

    def __init__(self, rows: int, profile: str, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.auc, self.rows, self.positives = _AUC(), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        self.bar = tqdm(total=rows, desc=f"generate {profile}", unit="row", unit_scale=True, dynamic_ncols=True,
                        disable=None if progress else True, file=sys.stderr)

    def consume(self, tables: dict, p: np.ndarray, y: np.ndarray, write) -> None:
        """One chunk's result: `write(split, table or TSV bytes)` for each split it holds."""
        self.auc.update(p, y)
        for name, t in tables.items():
            write(name, t)
            n = t.num_rows if isinstance(t, pa.Table) else t.count(b"\n")
            self.rows[name] += n
            self.positives[name] += int(np.asarray(t.column("label")).sum()) if isinstance(t, pa.Table) else 0
            self.bar.update(n)


def generate(profile: str, rows: int, out, opts: GenerateOptions | None = None, **options) -> dict:
    """Write a planted synthetic data set of `rows` rows shaped like `profile` to `out`; returns the
    summary. opts: a GenerateOptions, or its fields as keywords (applied over it when both are given)."""
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r} (criteo or movielens)")
    opts = resolve(GenerateOptions, opts, options)
    if opts.fmt == "criteo-tsv" and (profile != "criteo" or opts.valid_fraction > 0):
        raise DataError("--format criteo-tsv needs --profile criteo and no valid split (day_0 train, day_1 test)")
    if rows < 1:
        raise DataError(f"--rows must be >= 1, got {rows}")
    if opts.days:
        return _generate_days(profile, rows, out, opts)
    return _generate(profile, rows, out, opts)


def _generate(profile: str, rows: int, out, opts: GenerateOptions, day: planted.Day | None = None,
              lineage: list[str] | None = None) -> dict:
    """One data set (with `day`: that day of a series, `lineage` the manifest hashes of the days before)."""
    n_users, n_items = (day.users, day.items) if day is not None else planted.movielens_sizes(rows)
    params = {"profile": profile, "rows": rows, "seed": opts.seed, "format": opts.fmt,
              "test_fraction": opts.test_fraction, "valid_fraction": opts.valid_fraction, "n_users": n_users,
              "n_items": n_items, "day": day}
    chunks = range((rows + CHUNK_ROWS - 1) // CHUNK_ROWS)
    results = ordered_map(_chunk, chunks, max(1, int(opts.workers)), _init_worker, params)
    tally = _Tally(rows, profile, opts.progress)
    start = time.perf_counter()
    planted_info = {"profile": profile, "seed": opts.seed, "rows": rows, "model": _describe(profile, n_users, n_items)}
    if day is not None:
        planted_info["day"] = {"day": day.number, "users": day.users, "items": day.items, "new_users_from": day.users_before + 1,
                               "new_items_from": day.items_before + 1, "new_rows_share": planted.DAY_NEW_ROWS * (day.number > 1),
                               "drift_radians": day.angle}
    if opts.fmt == "parquet":
        bayes = _write_parquet(out, profile, rows, results, tally, opts, planted_info, (n_users, n_items), lineage)
    else:
        bayes = _write_tsv(out, results, tally, opts.overwrite, planted_info)
    tally.bar.close()
    seconds = time.perf_counter() - start
    counts = tally.rows
    return {"out": str(out), "rows": {k: v for k, v in counts.items() if v}, "bayes_optimal_auc": bayes,
            "positive_rate": {k: tally.positives[k] / v for k, v in counts.items() if v and opts.fmt == "parquet"},
            "seconds": seconds, "rows_per_second": rows / seconds if seconds else 0.0}


def _generate_days(profile: str, rows: int, out, opts: GenerateOptions) -> dict:
    """out/day-01 ... day-NN: `rows` ratings a day, new users and items each day and drifting
    effects (planted.Day); each day's ids extend the day before's (its manifest's lineage), so a
    model of one day warm-starts on the next (wdl train --init-from)."""
    if profile != "movielens" or opts.fmt != "parquet":
        raise DataError("--days needs --profile movielens and --format parquet")
    from wdl.data.manifest import load_manifest

    days, lineage = [], []
    for d in range(1, opts.days + 1):
        where = pathlib.Path(out) / f"day-{d:02d}"
        s = _generate(profile, rows, where, opts, planted.movielens_day(rows, d), list(lineage))
        lineage.append(load_manifest(where).identity)
        days.append(s)
    return {"out": str(out), "days": days, "rows": {k: sum(s["rows"].get(k, 0) for s in days) for k in SPLITS
                                                   if any(k in s["rows"] for s in days)},
            "bayes_optimal_auc": [s["bayes_optimal_auc"] for s in days], "seconds": sum(s["seconds"] for s in days),
            "rows_per_second": rows * len(days) / max(sum(s["seconds"] for s in days), 1e-9)}


def _write_parquet(out, profile: str, rows: int, results, tally: _Tally, opts: GenerateOptions,
                   planted_info: dict, sizes: tuple[int, int], lineage: list[str] | None = None) -> float:
    """A wdl data set (DatasetWriter); returns the Bayes-optimal test AUC. sizes: users, items."""
    dense_cols = DENSE if profile == "criteo" else ["release_year"]
    stats = {c: RunningStats() for c in dense_cols}
    samples = {c: Reservoir() for c in dense_cols}  # for the bucket edges, as `wdl data import` writes them
    position = [0]
    with DatasetWriter(out, name=f"synthetic-{profile}", overwrite=opts.overwrite, row_group_rows=opts.row_group_rows,
                       rows_per_file=opts.rows_per_file) as w:

        def write(name, t):
            w.write(name, t)
            if name == "train":
                keys = mix64(np.arange(position[0], position[0] + t.num_rows, dtype=np.uint64))
                position[0] += t.num_rows
                for c in dense_cols:
                    stats[c].update(t.column(c).to_numpy())
                    samples[c].add(keys, t.column(c).to_numpy().astype(np.float64))

        for tables, p, y in results:
            tally.consume(tables, p, y, write)
        if tally.rows["test"] == 0:
            raise DataError(f"{rows} rows leave no test rows at --test-fraction {opts.test_fraction}; ask for more rows")
        dense_stats = {c: {**s.result(), "bucket_edges": samples[c].quantiles(DENSE_BUCKETS)} for c, s in stats.items()}
        columns = (planted.criteo_columns(dense_stats) if profile == "criteo"
                   else planted.movielens_columns(*sizes, dense_stats["release_year"]))
        days = {"lineage": lineage} if lineage is not None else {}  # the days before: their ids are kept
        split = {"kind": "random", "seed": opts.seed, "test_fraction": opts.test_fraction,
                 "valid_fraction": opts.valid_fraction, "rule": "each row by a uniform draw from its chunk's stream"}
        bayes = tally.auc.result()
        w.commit(source={"kind": "synthetic", "profile": profile, "seed": opts.seed, "rows": rows}, label="label",
                 columns=columns, split=split, extra={"bayes_optimal_auc": bayes, "planted": planted_info,
                                                     "other_columns": {"bayes_p": "true probability of label 1"}, **days})
    return bayes


def _write_tsv(out, results, tally: _Tally, overwrite: bool, info: dict) -> float:
    """day_0 (train) and day_1 (test) into a temporary folder, planted.json last, then rename."""
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (overwrite and (out / "planted.json").is_file()):
            raise DataError(f"output {out} exists and is not empty; choose another --out"
                            + (" (or --overwrite to replace a generated one)" if (out / "planted.json").is_file() else ""))
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    files = {}
    try:
        tmp.mkdir(parents=True)
        files = {"train": open(tmp / "day_0", "wb"), "test": open(tmp / "day_1", "wb")}
        for tables, p, y in results:
            tally.consume(tables, p, y, lambda name, data: files[name].write(data))
        for f in files.values():
            f.close()
        info = {**info, "bayes_optimal_auc": tally.auc.result(), "train_file": "day_0", "test_file": "day_1"}
        (tmp / "planted.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return info["bayes_optimal_auc"]


def _describe(profile: str, n_users: int, n_items: int) -> dict:
    if profile == "criteo":
        name = lambda j: CATEGORICAL[j]  # noqa: E731
        return {"value_effects": {name(j): s for j, s in planted.CRITEO_VALUE_EFFECTS.items()},
                "latent_interaction": [name(j) for j in planted.CRITEO_LATENT],
                "crosses": [[name(a), name(b)] for a, b in planted.CRITEO_CROSSES],
                "dense_weights_on_standardised_log1p": dict(zip(DENSE, planted.CRITEO_DENSE_WEIGHTS)),
                "nonlinear": "0.5 * sin(2 * log1p(I7))", "cardinalities": dict(zip(CATEGORICAL, planted.CRITEO_CARDINALITIES))}
    return {"users": n_users, "items": n_items, "value_effects": ["user_id", "movie_id", "occupation"],
            "latent_interaction": ["user_id", "movie_id"], "crosses": [["gender", "genres"], ["age_bucket", "genres"]],
            "dense": "0.3 * (release_year - 1985) / 15"}


# ---------------------------------------------------------------------------------- CLI
def add_generate_arguments(parser) -> None:
    """Flags of `wdl data generate`: the profile, rows and output, and the fields of GenerateOptions."""
    d = GenerateOptions()
    add = parser.add_argument
    add("--profile", required=True, choices=PROFILES, help="shape of the data")
    add("--rows", required=True, type=int, help="rows in all splits together")
    add("--out", required=True, help="output folder")
    add("--seed", type=int, default=d.seed, help=f"the output depends only on this (default {d.seed})")
    add("--format", dest="fmt", choices=FORMATS, default=d.fmt,
        help="a wdl data set (default) or Criteo TSV files day_0 (train), day_1 (test)")
    add("--test-fraction", type=float, default=d.test_fraction, help=f"share of test rows (default {d.test_fraction})")
    add("--valid-fraction", type=float, default=d.valid_fraction,
        help=f"share of valid rows (default {d.valid_fraction:g})")
    add("--workers", type=int, default=d.workers, help=f"generating processes (default {d.workers})")
    add("--overwrite", action="store_true", help="replace an existing output")
    add("--days", type=int, default=d.days,
        help="movielens: N data sets OUT/day-01 ... of --rows each, with new users/items and drifting effects each day")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_generate(args) -> int:
    s = generate(args.profile, args.rows, args.out, **from_args(GenerateOptions, args))
    for d in s.get("days", []):
        print(f"wrote {d['out']}: Bayes-optimal test AUC {d['bayes_optimal_auc']:.4f}")
    if "days" in s:
        return 0
    rows = ", ".join(f"{k} {v:,}" for k, v in s["rows"].items())
    print(f"wrote {s['out']}\n  rows: {rows}\n  Bayes-optimal test AUC: {s['bayes_optimal_auc']:.4f}\n"
          f"  {s['seconds']:.1f} s, {s['rows_per_second']:,.0f} rows/s")
    return 0
