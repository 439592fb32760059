"""The two passes of `wdl data import` over one work unit (a few Parquet row groups or one CSV
file), run in worker processes; `wdl.ingest.importer` plans them and merges their results.

Pass 1 (`stats_job`) gathers statistics of the unit's train rows; pass 2 (`encode_job`) turns
its rows into the data set's columns. Both read a unit and assign each row's split through
wdl.ingest.import_read, so they agree whatever the batching or the worker.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wdl.data.column_stats import RunningStats
from wdl.data.hashing import mix64
from wdl.data.id_encoder import IdEncoder, chunks
from wdl.ingest.import_read import Plan, Unit, dense_values, labels, list_values, positions, read_unit, split_codes
from wdl.ingest.vocab import Reservoir, ValueCounts


@dataclass
class DenseStats:
    stats: RunningStats = field(default_factory=RunningStats)
    lo: float = np.inf
    hi: float = -np.inf
    missing: int = 0
    sample: Reservoir = None

    def merge(self, o: "DenseStats") -> None:
        self.stats.merge(o.stats)
        self.lo, self.hi, self.missing = min(self.lo, o.lo), max(self.hi, o.hi), self.missing + o.missing
        self.sample.merge(o.sample)


@dataclass
class Stats:
    """Pass 1's result for some units (merged in input order)."""

    rows: np.ndarray  # per split code (0 train, 1 valid, 2 test)
    positives: np.ndarray
    counts: dict[str, ValueCounts]
    dense: dict[str, DenseStats]
    # Parquet string columns read as dictionaries: [dictionary entries, values] (see plain_columns)
    dictionaries: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, plan: Plan) -> "Stats":
        cols = plan.spec.columns
        return cls(np.zeros(3, np.int64), np.zeros(3, np.int64),
                   {n: ValueCounts() for n, c in cols.items() if c.kind != "dense"},
                   {n: DenseStats(sample=Reservoir(plan.sample_size)) for n, c in cols.items() if c.kind == "dense"})

    def merge(self, o: "Stats") -> None:
        self.rows += o.rows
        self.positives += o.positives
        for n, c in o.counts.items():
            self.counts[n].add(c)
        for n, d in o.dense.items():
            self.dense[n].merge(d)
        for n, d in o.dictionaries.items():
            self.dictionaries[n] = self.dictionaries.get(n, 0) + d

    def note_dictionary(self, name: str, arr) -> None:
        parts = [c for c in chunks(arr) if pa.types.is_dictionary(c.type)]
        if parts:
            seen = np.array([sum(len(c.dictionary) for c in parts), sum(len(c) for c in parts)])
            self.dictionaries[name] = self.dictionaries.get(name, 0) + seen

    def plain_columns(self) -> set[str]:
        """Columns pass 2 reads faster as plain strings: their dictionaries hold more than one
        entry per two values, so a lookup of the distinct values saves little, and dictionaries
        that large have mostly overflowed the writer's dictionary page into plain pages, whose
        every value the reader hashes to build them."""
        return {n for n, (entries, values) in self.dictionaries.items() if 2 * entries > values}


# ------------------------------------------------------------------------------- worker side
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
_PLAN: Plan | None = None
_ENCODERS: dict[str, IdEncoder] = {}


def init_worker(plan: Plan) -> None:
    global _PLAN
    _PLAN = plan
    _ENCODERS.clear()
    keep_freed_memory()


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse, for the rest of the process. By default it
    returns blocks above 128 KB (a unit's numpy arrays, pickled results) to the kernel as they are
    freed and trims its heap, so every unit faults the same pages in again: a fifth of the
    import's CPU time was the kernel's. Here blocks up to 32 MB (the most mallopt allows) come
    from the heap and up to 128 MB of free heap stay mapped. A no-op on other C libraries."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20):  # a trim threshold alone would only stop glibc adapting
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def stats_job(unit: Unit) -> Stats:
    plan, out = _PLAN, Stats.empty(_PLAN)
    # Parquet: the label and split columns first; the features only if the rows hold train rows.
    head = list(dict.fromkeys([plan.spec.label, plan.spec.split.column or plan.spec.label])) \
        if unit.fmt == "parquet" else None
    with _Kept(unit.keep, len(plan.types)) as kept:
        for t, row_start in read_unit(plan, unit, head):
            codes, y = split_codes(plan, unit, t, row_start), labels(plan, unit, t, row_start)
            out.rows += np.bincount(codes, minlength=3)
            out.positives += np.bincount(codes, weights=y, minlength=3).astype(np.int64)
            is_train = codes == 0
            if is_train.any() and t.num_columns < len(plan.types):
                rest, _ = next(read_unit(plan, unit, [c for c in plan.types if c not in t.column_names]))
                for name in rest.column_names:
                    t = t.append_column(rest.field(name), rest.column(name))
            kept.add(t)
            if is_train.any():
                _train_stats(plan, unit, t, row_start, is_train, out)
    return out


def _train_stats(plan: Plan, unit: Unit, t: pa.Table, row_start: int, is_train: np.ndarray, out: Stats) -> None:
    mask = None if is_train.all() else is_train  # count the train rows in place, no copy of them
    for name, c in plan.spec.columns.items():
        if c.kind == "categorical":
            out.note_dictionary(name, t.column(name))
            out.counts[name].add_array(t.column(name), mask)
        elif c.kind == "multi_hot":
            lists = list_values(plan, name, t.column(name))
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
            values = pc.list_flatten(lists)
            out.note_dictionary(name, values)
            out.counts[name].add_array(values, None if mask is None else np.repeat(mask, lengths))
        else:
            train = np.flatnonzero(is_train)
            col = t.column(name).take(train) if mask is not None else t.column(name)
            x, d = dense_values(col, name, unit, row_start, train), out.dense[name]
            ok = ~np.isnan(x)
            d.stats.update(x)
            d.missing += int((~ok).sum())
            if ok.any():
                d.lo, d.hi = min(d.lo, float(x[ok].min())), max(d.hi, float(x[ok].max()))
                salt = mix64(np.frombuffer(name.encode().ljust(8, b"\0")[:8], np.uint64))
                d.sample.add(mix64(positions(unit, row_start, 0, train[ok]) ^ salt), x[ok])


class _Kept:
    """The tables pass 1 read of a unit, kept in an Arrow stream at `path` (if given) for pass 2,
    which maps them (`kept_tables`) instead of decoding the input a second time. A unit whose
    tables pass 1 did not read whole (Parquet rows without train rows) keeps nothing."""

    def __init__(self, path: str | None, columns: int) -> None:
        self.path, self.columns, self.whole = path, columns, path is not None
        self.sink = self.writer = None

    def add(self, t: pa.Table) -> None:
        self.whole = self.whole and t.num_columns == self.columns
        if not self.whole:
            return
        if self.writer is None:
            self.sink = pa.OSFile(self.path, "wb")
            self.writer = pa.ipc.new_stream(self.sink, t.schema)  # a stream: dictionaries may change
        self.writer.write_table(t)

    def __enter__(self) -> "_Kept":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            if not self.whole:
                os.remove(self.path)


def kept_tables(unit: Unit):
    """Pass 1's tables of `unit`, as `read_unit` yields them, if it kept them all; else None."""
    if unit.keep is None or not os.path.exists(unit.keep):
        return None
    reader = pa.ipc.open_stream(pa.memory_map(unit.keep))
    os.remove(unit.keep)  # the mapping outlives the file
    if unit.fmt == "parquet":  # one table of several row groups
        return iter([(reader.read_all(), unit.row_start)])
    return _batches(reader, unit.row_start)


def _batches(reader, row: int):
    for batch in reader:  # a CSV file's blocks, one table each
        yield pa.Table.from_batches([batch]), row
        row += batch.num_rows


def encode(unit: Unit):
    """Per table of the unit: ({split code: encoded table}, unknown counts, rows read)."""
    plan = _PLAN
    for t, row_start in kept_tables(unit) or read_unit(plan, unit, _encoded_columns(plan, unit)):
        codes = split_codes(plan, unit, t, row_start)
        split = PerSplit(codes)
        cols = {plan.spec.label: pa.array(labels(plan, unit, t, row_start), pa.int8())}
        unknown = {}  # column -> [[values, unknown, null] per split]
        for name, c in plan.spec.columns.items():
            cols[name], unknown[name] = _ENCODE[c.kind](plan, name, t.column(name), unit, split, row_start)
        table = pa.table(cols, schema=plan.out_schema)
        present = np.flatnonzero(split.rows)
        parts = {int(k): table if len(present) == 1 else table.take(np.flatnonzero(codes == k)) for k in present}
        yield parts, unknown, t.num_rows


def _encoded_columns(plan: Plan, unit: Unit) -> list[str]:
    """What pass 2 reads: the columns it writes, and the time column unless the unit's split is known."""
    time = [plan.spec.split.column] if unit.split is None and plan.spec.split.kind == "time" else []
    return list(dict.fromkeys([plan.spec.label, *plan.spec.columns, *time]))


class PerSplit:
    """How many of a table's rows (or list elements) fall in each split, and how many of those a
    mask selects; counting is one pass over the mask when all fall in one split (a time or files
    split's units mostly do)."""

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = codes
        self.rows = np.bincount(codes, minlength=3)
        present = np.flatnonzero(self.rows)
        self.only = int(present[0]) if len(present) == 1 else None

    def count(self, mask: np.ndarray) -> np.ndarray:
        if self.only is None:
            return np.bincount(self.codes[mask], minlength=3)
        out = np.zeros(3, np.int64)
        out[self.only] = np.count_nonzero(mask)
        return out

    def nulls(self, arr) -> np.ndarray:
        return self.count(pc.is_null(arr).to_numpy(zero_copy_only=False)) if arr.null_count else np.zeros(3, np.int64)

    def elements(self, lengths: np.ndarray) -> "PerSplit":
        """The same for the elements of list rows of these `lengths`."""
        return PerSplit(np.repeat(self.codes, lengths) if self.only is None else np.full(int(lengths.sum()), self.only, np.int8))


def _encoder(plan: Plan, name: str) -> IdEncoder:
    return _ENCODERS.get(name) or _ENCODERS.setdefault(name, IdEncoder(plan.vocabs.get(name, pa.array([]))))


def _encode_dense(plan: Plan, name: str, col, unit: Unit, split: PerSplit, row_start: int):
    x = dense_values(col, name, unit, row_start)
    miss = np.isnan(x)
    missing = split.count(miss)
    return pa.array(x.astype(np.float32), mask=miss), np.stack([split.rows, missing, missing], 1)


def _encode_categorical(plan: Plan, name: str, col, unit: Unit, split: PerSplit, row_start: int):
    ids = _encoder(plan, name).encode(col)
    return pa.array(ids), np.stack([split.rows, split.count(ids == 0), split.nulls(col)], 1)


def _encode_multi_hot(plan: Plan, name: str, col, unit: Unit, split: PerSplit, row_start: int):
    lists = list_values(plan, name, col)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)
    ids = _encoder(plan, name).encode(pc.list_flatten(lists))
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    elements = split.elements(lengths)
    return (pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            np.stack([elements.rows, elements.count(ids == 0), split.nulls(lists)], 1))


_ENCODE = {"dense": _encode_dense, "categorical": _encode_categorical, "multi_hot": _encode_multi_hot}


def encode_job(unit: Unit) -> list:
    """Pass 2 in a pool worker: `encode`'s results with each table written to an Arrow file in
    the plan's handover folder, named by its path. The main process maps the file (`unspill`)
    instead of unpickling the table from a pipe: a tenth of pass 2's CPU time was those copies."""
    return [({code: _spill(table, f"encoded-{unit.file_index}-{unit.row_start}-{i}-{code}") for code, table in parts.items()},
             unknown, n) for i, (parts, unknown, n) in enumerate(encode(unit))]


def _spill(table: pa.Table, name: str) -> str:
    path = os.path.join(_PLAN.handover, name + ".arrow")
    with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def unspill(path: str) -> pa.Table:
    """A table `encode_job` spilled, memory-mapped; its file is removed (the mapping outlives it)."""
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    os.remove(path)
    return table
