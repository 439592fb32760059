"""`wdl data import`: your own Parquet or CSV files -> a wdl data set (docs/dataset-format.md).

    wdl data import raw/ --label clicked --out data/shop          # kinds inferred and printed as YAML
    wdl data import 'raw/*.parquet' --spec columns.yaml --out data/shop --workers 2

Two streaming passes over the input, in units of a few Parquet row groups or one CSV file:
1. statistics of the train rows: a count per distinct value of each categorical / multi-hot
   column (memory per distinct value, never per row), mean/std, min/max and a bounded sample
   (quantile edges) of each dense column; labels checked.
2. encoding: raw values -> ids through the vocabularies (id 0 = unknown or null; a raw 0 is a
   value like any other), written by DatasetWriter (temporary folder, manifest last, rename).
   Units pass 1 decoded whole it keeps for pass 2 (Arrow files, within a memory budget). A
   bounded sample of the encoded train rows proposes crosses (wdl/ingest/cross_proposal.py),
   which the training config written beside the data (train-config.yaml) holds.
A row's split is a function of (seed, file, row) or of its time column, so both passes agree
and the output is the same for any --workers.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wdl.data.writer import DatasetWriter
from wdl.errors import ConfigError, DataError, first_line
from wdl.ingest import cross_proposal as X
from wdl.ingest import fm_pairs
from wdl.ingest import import_spec as S
from wdl.ingest import leftovers
from wdl.ingest.import_csv import csv_schema, first_rows
from wdl.ingest.import_passes import Stats, encode, encode_job, init_worker, keep_freed_memory, stats_job, unspill
from wdl.ingest.import_read import Plan, Unit, expand_inputs
from wdl.ingest.options import resolve
from wdl.ingest.pool import ordered_map, worker_count
from wdl.ingest.vocab_from import Parent

UNIT_ROWS = 262144  # rows per work unit (whole Parquet row groups): bounds memory per worker
CSV_POOL_BYTES = 256 << 20  # a CSV file is one unit: larger ones are encoded in-process, streaming
SAMPLE_ROWS = 100_000  # rows read to infer kinds
# Pass 1 keeps the tables it read for pass 2 (which then decodes no input again) up to this share
# of the machine's memory, so that they stay in the page cache: the kernel starts writing dirty
# pages back at a tenth of it. The units beyond are read again.
KEPT_SHARE = 1 / 8
# Encoded rows that may wait for the part files' writer threads: the main process writes all the
# output, and with this much in hand it writes a split's next file while the last one is finished.
WRITE_BACKLOG = 64 << 20
CONFIG_FILE = "train-config.yaml"  # the training config written into the data set folder


def _first_rows(path: str, fmt: str, rows: int, null_values) -> pa.Table:
    """The first `rows` rows of a file (Parquet: none but the schema if rows is 0; CSV: its first block)."""
    if fmt == "csv":
        return first_rows(path, null_values)
    try:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows), None) if rows else None
        return pa.Table.from_batches([batch]) if batch is not None else pq.read_schema(path).empty_table()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read ({first_line(e)})") from None


def _types(spec: S.ImportSpec, schema: pa.Schema, where: str) -> dict[str, pa.DataType]:
    """The type each read column is cast to; refuses kinds the column's type cannot have."""
    types = {}
    for name in dict.fromkeys([spec.label, *spec.columns, spec.split.column or spec.label]):
        if name not in schema.names:
            raise DataError(f"{where}: column {name!r} named in the spec is missing (has: {', '.join(schema.names)})")
        t = schema.field(name).type
        t = t.value_type if pa.types.is_dictionary(t) else pa.string() if pa.types.is_null(t) else t
        kind = "label" if name == spec.label else spec.columns[name].kind if name in spec.columns else "time"
        is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
        is_num = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        ok = {"label": is_num, "dense": is_num, "time": not is_str and not is_list,
              "categorical": is_str or pa.types.is_integer(t) or pa.types.is_boolean(t),
              "multi_hot": (is_list and (pa.types.is_integer(t.value_type) or pa.types.is_string(t.value_type)
                                         or pa.types.is_large_string(t.value_type)))
                           or (is_str and name in spec.columns and spec.columns[name].separator is not None)}[kind]
        if not ok:
            need = {"label": "0/1 numbers or booleans", "dense": "numbers", "time": "numbers, dates or timestamps",
                    "categorical": "strings, integers or booleans",
                    "multi_hot": "lists of strings or integers (or strings with a separator in the spec)"}[kind]
            raise DataError(f"{where}: column {name!r} is {t} but {kind} needs {need}")
        types[name] = pa.int64() if kind == "categorical" and pa.types.is_boolean(t) else t
    return types


def _units(files: list[tuple[str, str, int | None]], plan: Plan) -> list[Unit]:
    units = []
    for i, (path, fmt, split) in enumerate(files):
        if fmt == "csv":
            units.append(Unit(path, i, fmt, [], 0, None, split, os.path.getsize(path)))
            continue
        try:
            md = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read ({first_line(e)})") from None
        names = md.schema.to_arrow_schema().names
        missing = [c for c in plan.types if c not in names]
        if missing:
            raise DataError(f"{path}: column {missing[0]!r} named in the spec is missing (has: {', '.join(names)})")
        start, group, rows, size = 0, [], 0, 0
        for g in range(md.num_row_groups):
            group.append(g)
            rows += md.row_group(g).num_rows
            size += md.row_group(g).total_byte_size
            if rows >= UNIT_ROWS or g == md.num_row_groups - 1:
                units.append(Unit(path, i, fmt, group, start, rows, split, size))
                start, group, rows, size = start + rows, [], 0, 0
    return units


def _keep(units: list[Unit], folder: Path, budget: float) -> None:
    """Let pass 1 keep the tables of the first units whose sizes fit in `budget` bytes."""
    for u in units:
        budget -= u.size
        if budget < 0:
            return
        u.keep = str(folder / f"input-{u.file_index}-{u.row_start}.arrow")


def _memory() -> int:
    """Bytes of memory of the machine (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _cut(value, t: pa.DataType, what: str):
    if value is None:
        return None
    try:
        return pa.scalar(value).cast(t)
    except (pa.ArrowException, ValueError, TypeError):
        raise ConfigError(f"split {what} {value!r} cannot be compared with a time column of type {t}") from None


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:  # without importing tqdm (0.1 s)
        return SimpleNamespace(update=lambda n: None, close=lambda: None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", unit_scale=True, dynamic_ncols=True,
                disable=None, file=sys.stderr)


# ------------------------------------------------------------------------------------ import
def import_data(inputs: list[str], out, opts: S.ImportOptions | None = None, **options) -> dict:
    """Import `inputs` into a data set at `out`; returns the summary (also in the manifest).

    opts: an ImportOptions (wdl.ingest.import_spec), or its fields as keywords (applied over it when both are given). Its
    `spec` gives the columns, else they are inferred from the first file (with `label`), and the
    inferred spec is printed through `log`; its `split` replaces the spec's."""
    start = time.perf_counter()
    keep_freed_memory()  # here too: the main process unpickles and writes the units' rows
    opts = resolve(S.ImportOptions, opts, options)
    split = opts.split or (opts.spec.split if opts.spec else S.SplitSpec())
    files = _input_files(inputs, split, opts.fmt)
    first = _first_rows(files[0][0], files[0][1], 0 if opts.spec else SAMPLE_ROWS, opts.null_values)  # rows to infer kinds
    names = first.schema.names
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{files[0][0]}: column {twice!r} appears {names.count(twice)} times; give each column its own name")
    spec = _columns_spec(opts, split, first, files[0][0])
    types = _types(spec, csv_schema(spec, first.schema) if files[0][1] == "csv" else first.schema, files[0][0])
    strings = [n for n, t in types.items() if n in spec.columns
               and (pa.types.is_string(t) or pa.types.is_list(t) and pa.types.is_string(t.value_type))]
    cuts = tuple(_cut(getattr(split, k), types[split.column], k) for k in ("valid_from", "test_from")) \
        if split.kind == "time" else (None, None)
    # A boolean categorical column is read as int64 (ids of 0 and 1): CSV parses it as boolean first.
    bools = {n: pa.bool_() for n in types if pa.types.is_boolean(first.schema.field(n).type) and n in spec.columns}
    plan = Plan(spec, types, strings, opts.sample_size, cuts, parse_types=bools,
                null_values=tuple(opts.null_values), first_file=files[0][0])
    units = _units(files, plan)
    workers = worker_count(opts.workers)
    parent = Parent(opts.vocab_from, spec, types) if opts.vocab_from else None  # ids continued (vocab_from.py)
    if parent is None and any(c.max_rows for c in spec.columns.values()):
        raise ConfigError("max_rows bounds a vocabulary continued with --vocab-from; a first import bounds it with top_k")

    leftovers.clear_stale(out)
    with DatasetWriter(out, name=Path(out).name, overwrite=opts.overwrite, rows_per_file=opts.rows_per_file,
                       row_group_rows=opts.row_group_rows, label=spec.label, backlog_bytes=WRITE_BACKLOG) as w, \
            leftovers.hold(w.tmp):
        handover = w.tmp / "handover"  # files the passes hand over, not part of the data set
        handover.mkdir()
        plan.handover = str(handover)
        _keep(units, handover, _memory() * KEPT_SHARE)
        agg = _statistics(units, plan, workers, opts.progress, files, split)
        plan.dict_columns = [n for n in plan.dict_columns if n not in agg.plain_columns()]  # as pass 2 reads them
        columns, normalize = _columns(w, spec, agg, plan, opts.buckets, parent)
        # Ids by value and bucket edges are known from here: the sample reads the encoded rows.
        elements = {n: pc.sum(agg.counts[n].table().column("count")).as_py() or 0
                    for n, c in spec.columns.items() if c.kind == "multi_hot"}
        sample = X.TrainSample(X.features_of(columns, elements, int(agg.rows[0])), spec.label, int(agg.rows[0]))
        unknown, promised = _write_rows(w, units, plan, workers, opts.progress, int(agg.rows.sum()), split, sample)
        shutil.rmtree(handover)
        seconds = [time.perf_counter()]  # the two proposals' time, in the manifest
        ranked = sample.rank()
        crosses = X.proposed(ranked)
        seconds.append(time.perf_counter())
        ranked_pairs = fm_pairs.ranked_pairs(sample, S.fm_candidates(columns, int(agg.rows[0])))
        pairs = fm_pairs.proposed(ranked_pairs)
        seconds.append(time.perf_counter())
        summary = _summary(agg, columns, promised, workers, time.perf_counter() - start)
        config = S.training_config(str(out), spec.label, columns, normalize, summary["rows"], crosses, pairs)
        (w.tmp / CONFIG_FILE).write_text(config, encoding="utf-8")
        summary |= {"vocab_growth": parent.growth} if parent is not None else {}
        unknown_values = {k: {n: dict(zip(("values", "unknown", "null"), map(int, u[i]))) for n, u in unknown.items()}
                          for i, k in enumerate(S.SPLIT_NAMES) if k in summary["rows"]}
        source = {"kind": "import", "format": files[0][1], "inputs": [os.path.abspath(p) for p, _, _ in files],
                  "spec": S.spec_yaml(spec)}
        w.commit(source=source, label=spec.label, columns=columns, split=_split_info(split, files),
                 extra={"counts": summary, "unknown_values": unknown_values,
                        "proposed_crosses": {**X.manifest_entry(sample, ranked), "seconds": round(seconds[1] - seconds[0], 1)},
                        "proposed_fm_pairs": {**fm_pairs.manifest_entry(sample, ranked_pairs),
                                              "seconds": round(seconds[2] - seconds[1], 1)},
                        **(parent.manifest_entries() if parent is not None else {})})
    summary.update(unknown_values=unknown_values, training_config=config, config_path=str(Path(out) / CONFIG_FILE),
                   proposed_crosses=[{k: x[k] for k in ("columns", "z", "hash_buckets")} for x in crosses],
                   proposed_fm_pairs=[{k: x[k] for k in ("columns", "z")} for x in ranked_pairs if x.get("proposed")])
    return summary


def _input_files(inputs: list[str], split: S.SplitSpec, fmt: str) -> list[tuple[str, str, int | None]]:
    """(path, format, split code of a files split or None) of every input file."""
    if split.kind == "files":
        if inputs:
            raise DataError("a files split takes its inputs per split (--train-files ...), not as INPUT")
        out = [(p, f, S.SPLIT_NAMES.index(k)) for k, globs in split.files.items() for p, f in expand_inputs(globs, fmt)]
        first: dict[str, str] = {}
        for p, _, code in out:
            other = first.setdefault(os.path.realpath(p), S.SPLIT_NAMES[code])
            if other != S.SPLIT_NAMES[code]:
                raise DataError(f"input {p} is in both the {other} and the {S.SPLIT_NAMES[code]} files: its rows would be in both")
        return out
    if not inputs:
        raise DataError("no input given (files, folders or globs of .parquet / .csv files)")
    return [(p, f, None) for p, f in expand_inputs(inputs, fmt)]


def _columns_spec(opts: S.ImportOptions, split: S.SplitSpec, first: pa.Table, where: str) -> S.ImportSpec:
    """The spec given (its label and split replaced by the options'), or one inferred from the
    first rows and printed."""
    if opts.spec is None:
        if not opts.label:
            raise DataError("give the label column (--label COL) or a spec (--spec FILE)")
        spec, notes = S.infer_spec(first.schema, first, opts.label, split, kinds=opts.kinds or {},
                                   min_frequency=opts.min_frequency, top_k=opts.top_k,
                                   max_categories=opts.max_categories, separator=opts.separator)
        opts.log(f"# columns inferred from {where}; save as a file, edit, and pass it with --spec\n"
                 + S.spec_yaml(spec, notes))
    else:
        spec = S.ImportSpec(opts.label or opts.spec.label, opts.spec.columns, split)
    if spec.label in spec.columns:
        raise DataError(f"the label {spec.label!r} is also listed as a feature column")
    return spec


def _statistics(units: list[Unit], plan: Plan, workers: int, progress: bool, files: list,
                split: S.SplitSpec) -> Stats:
    """Pass 1: the train rows' statistics, merged over the units in order."""
    known = [u.rows for u in units]
    bar, agg = _progress(sum(known) if None not in known else None, "statistics", progress), Stats.empty(plan)
    for unit, st in zip(units, ordered_map(stats_job, units, workers, init_worker, plan)):
        agg.merge(st)
        if np.count_nonzero(st.rows) == 1:  # then pass 2 places the unit's rows without reading a time column
            unit.split = int(np.flatnonzero(st.rows)[0])
        bar.update(int(st.rows.sum()))
    bar.close()
    if agg.rows.sum() == 0:
        raise DataError(f"no rows in {', '.join(p for p, _, _ in files)}")
    if agg.rows[0] == 0:
        raise DataError(f"the {split.kind} split leaves no training rows (rows per split: {dict(zip(S.SPLIT_NAMES, agg.rows.tolist()))})")
    return agg


def _columns(w: DatasetWriter, spec: S.ImportSpec, agg: Stats, plan: Plan, buckets: int,
             parent: Parent | None = None) -> tuple[dict, dict]:
    """The manifest's column entries (vocabularies written and set in `plan` for pass 2), and a
    suggested normalisation per dense column. `parent`: the data set whose ids are continued."""
    columns, normalize = {}, {}
    for name, c in spec.columns.items():
        if c.kind == "dense":
            d = agg.dense[name]
            columns[name] = {"kind": "dense", **d.stats.result(), "min": d.lo if d.stats.count else None,
                             "max": d.hi if d.stats.count else None, "transform": "none",
                             "missing_train": d.missing, "bucket_edges": d.sample.quantiles(buckets),
                             "quantile_sample": len(d.sample.values)}
            normalize[name] = "log1p" if d.lo >= 0 and d.sample.skewness() > 2 else "standard"
            continue
        vocab, distinct = agg.counts[name].vocabulary(c.min_frequency, c.top_k) if parent is None \
            else parent.extend(name, agg.counts[name], c.min_frequency, c.top_k, c.max_rows)
        plan.vocabs[name] = vocab
        columns[name] = {"kind": c.kind, "vocab_size": len(vocab) + 1, "encoding": "vocab",
                         "vocab_file": w.write_vocab(name, vocab.to_pylist()), "raw_type": str(plan.types[name]),
                         "min_frequency": c.min_frequency, "top_k": c.top_k, "distinct_train_values": distinct}
        if parent is not None:
            parent.record(w, name, columns[name])
        if c.separator is not None:  # raw strings "a|b" were split into lists (what scoring raw rows repeats)
            columns[name]["separator"] = c.separator
    return columns, normalize


def _write_rows(w: DatasetWriter, units: list[Unit], plan: Plan, workers: int, progress: bool, rows: int,
                split: S.SplitSpec, sample: X.TrainSample) -> tuple[dict[str, np.ndarray], list[str]]:
    """Pass 2: encode and write every unit (its train rows sampled into `sample`); per column,
    [split, (values, unknown, null)] counts; and the splits the rule promises (written, empty if
    need be)."""
    # Large CSV files would be whole units in a pool: stream them in this process instead.
    pool = workers if all(u.fmt == "parquet" or os.path.getsize(u.path) <= CSV_POOL_BYTES for u in units) else 1
    bar = _progress(rows, "encode", progress)
    unknown = {n: np.zeros((3, 3), np.int64) for n in plan.spec.columns}
    for parts, counts, n in _encoded(units, plan, pool):
        for code, table in parts.items():
            w.write(S.SPLIT_NAMES[code], table)
            if code == 0:
                sample.add(table)
        for name, c in counts.items():
            unknown[name] += c
        bar.update(n)
    bar.close()
    promised = {"random": ["test"] + (["valid"] if split.valid_fraction > 0 else []),
                "time": ["test"] + (["valid"] if split.valid_from is not None else []),
                "files": list(split.files)}[split.kind]
    for name in promised:  # a promised split exists even when empty
        w.write(name, plan.out_schema.empty_table())
    return unknown, promised


def _summary(agg: Stats, columns: dict, promised: list[str], workers: int, seconds: float) -> dict:
    rows = int(agg.rows.sum())
    return {"rows": {k: int(n) for k, n in zip(S.SPLIT_NAMES, agg.rows) if n or k in promised},
            "positive_rate": {k: float(p / n) for k, p, n in zip(S.SPLIT_NAMES, agg.positives, agg.rows) if n},
            "vocab_sizes": {n: c["vocab_size"] for n, c in columns.items() if "vocab_size" in c},
            "seconds": seconds, "rows_per_second": rows / seconds if seconds > 0 else 0.0, "workers": workers}


def _split_info(split: S.SplitSpec, files: list[tuple[str, str, int | None]]) -> dict:
    """The manifest's description of the split."""
    if split.kind == "random":
        rule = {"seed": split.seed, "test_fraction": split.test_fraction, "valid_fraction": split.valid_fraction,
                "rule": "each row by a hash of (seed, file, row)"}
    elif split.kind == "time":
        rule = {"column": split.column, "valid_from": _json(split.valid_from), "test_from": _json(split.test_from),
                "rule": "time < valid_from -> train, < test_from -> valid, else test"}
    else:
        rule = {"files": {k: [p for p, _, s in files if s == S.SPLIT_NAMES.index(k)] for k in split.files}}
    return {"kind": split.kind, **rule}


def _encoded(units: list[Unit], plan: Plan, workers: int):
    if workers > 1:
        for results in ordered_map(encode_job, units, workers, init_worker, plan):
            for paths, unknown, n in results:
                yield {code: unspill(path) for code, path in paths.items()}, unknown, n
        return
    init_worker(plan)
    for u in units:  # table by table: a large CSV file never sits in memory whole
        yield from encode(u)


def _json(v):
    return v if v is None or isinstance(v, (int, float, str)) else str(v)
