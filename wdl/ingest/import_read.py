"""Reading the input of `wdl data import`: which files the inputs name (`expand_inputs`), and one
work unit (a few Parquet row groups or one CSV file) as both passes see it: columns cast to the
first file's types, labels checked, and each row's split, a function of (seed, file, row) or of
its time column, never of the batching or the worker.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from wdl.data.hashing import mix64, unit_uniform
from wdl.data.id_encoder import split_strings
from wdl.errors import DataError, clip, first_line
from wdl.ingest import import_spec as S
from wdl.ingest.import_csv import convert_options, quoted, read_error

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}  # and .csv.gz


def expand_inputs(patterns: list[str], fmt: str = "auto") -> list[tuple[str, str]]:
    """(path, format) of every file named by `patterns` (files, folders, globs), in order."""
    files: list[str] = []
    seen: set = set()  # real paths and (device, inode): one file named two ways (./a.parquet, a link) is read once
    for p in patterns:
        if glob.has_magic(p):
            found = sorted(f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"input {p!r} matches no files")
        elif os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).rglob("*")
                           if f.is_file() and _format(str(f), "auto") and not _in_data_set(f, Path(p)))
            if not found:
                raise DataError(f"input folder {p} holds no .parquet or .csv files (beside wdl data sets)")
        elif os.path.isfile(p):
            found = [p]
        else:
            raise DataError(f"input {p} does not exist")
        for f in found:
            st = os.stat(f)
            if (real := os.path.realpath(f)) not in seen and (st.st_dev, st.st_ino) not in seen:
                seen.update([real, (st.st_dev, st.st_ino)])
                files.append(f)
    out = []
    for f in files:
        kind = _format(f, fmt)
        if kind is None:
            raise DataError(f"input {f}: unknown format (name it .parquet or .csv, or pass --format)")
        out.append((f, kind))
    if len({k for _, k in out}) > 1:
        raise DataError("inputs mix Parquet and CSV files; convert them to one format")
    return out


def _format(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    return "csv" if name.endswith(".csv.gz") else SUFFIXES.get(Path(name).suffix)  # not any .gz: a README.txt.gz


def _in_data_set(f: Path, top: Path) -> bool:
    """`f` lies in a wdl data set below the scanned folder `top` (an earlier import's output, or
    one being written): its ids are not raw rows."""
    for parent in f.parents:
        if parent == top:
            return False
        if (parent / "manifest.json").exists() or ".tmp-" in parent.name or ".old-" in parent.name:
            return True
    return False


@dataclass
class Unit:
    """A piece of the input that one worker reads at a time."""

    path: str
    file_index: int
    fmt: str
    row_groups: list[int]  # Parquet only
    row_start: int  # number of the unit's first row within its file
    rows: int | None  # None for CSV (unknown before reading)
    split: int | None  # the split of every row: a files split's, or one pass 1 found all rows in
    size: int = 0  # bytes of its columns uncompressed (Parquet metadata; a CSV file's size)
    keep: str | None = None  # where pass 1 keeps the tables it read, for pass 2 (an Arrow stream)


@dataclass
class Plan:
    """What a worker needs (sent once per worker)."""

    spec: S.ImportSpec
    types: dict[str, pa.DataType]  # every column read, cast to the first file's type
    dict_columns: list[str]  # string and list-of-string columns Parquet hands over dictionary-encoded
    sample_size: int
    cuts: tuple = (None, None)  # time split: valid_from, test_from as scalars of the column's type
    parse_types: dict[str, pa.DataType] | None = None  # CSV: types to parse as, where not `types` (booleans)
    vocabs: dict[str, pa.Array] = field(default_factory=dict)  # pass 2
    handover: str | None = None  # the folder pass 2's workers hand their encoded tables over in
    null_values: tuple[str, ...] = ("",)  # CSV: the texts read as null
    first_file: str = ""  # whose types the others are cast to (named in a type difference)

    @property
    def out_schema(self) -> pa.Schema:
        kinds = {"categorical": pa.int64(), "multi_hot": pa.list_(pa.int64()), "dense": pa.float32()}
        return pa.schema([(self.spec.label, pa.int8())] + [(n, kinds[c.kind]) for n, c in self.spec.columns.items()])


def read_unit(plan: Plan, unit: Unit, columns: list[str] | None = None):
    """(table, number of its first row within the file), columns cast to the plan's types.

    Parquet: the `columns` given (default: all the plan reads), one row group at a time (Arrow
    reads a list of dictionary-encoded strings only so), string and list-of-string columns
    dictionary-encoded as read, which Parquet's own dictionary pages make nearly free; CSV: every
    column, in 16 MB blocks."""
    cols = list(plan.types) if columns is None else columns
    try:
        if unit.fmt == "parquet":
            md = pq.read_metadata(unit.path)
            pf = pq.ParquetFile(unit.path, metadata=md, read_dictionary=_dictionary_paths(plan, md, cols))
            t = pa.concat_tables([pf.read_row_group(g, columns=cols) for g in unit.row_groups])
            yield _conform(plan, t, unit), unit.row_start
            return
        convert = convert_options(plan.null_values, {**plan.types, **(plan.parse_types or {})}, cols)
        row = 0
        for batch in pacsv.open_csv(unit.path, read_options=pacsv.ReadOptions(block_size=1 << 24),
                                    convert_options=convert):
            yield _conform(plan, pa.Table.from_batches([batch]), unit), row
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        if unit.fmt == "csv":
            text = [n for n in cols if _is_text(plan.types[n])]
            raise read_error(unit.path, e, plan.null_values, text) from None
        raise DataError(f"{unit.path}: cannot read ({clip(first_line(e))})") from None


def _dictionary_paths(plan: Plan, md, cols: list[str]) -> list[str]:
    """Parquet column paths to read as dictionaries: the plan's string columns, and the values of
    its list-of-string columns (named after the writer's convention, e.g. tags.list.element)."""
    paths = [md.schema.column(i).path for i in range(md.num_columns)]
    out = []
    for name in (n for n in plan.dict_columns if n in cols):
        leaves = [p for p in paths if p.startswith(name + ".")] if pa.types.is_list(plan.types[name]) else [name]
        out += leaves if len(leaves) == 1 else []
    return out


def _conform(plan: Plan, t: pa.Table, unit: Unit) -> pa.Table:
    for i, name in enumerate(t.column_names):
        col, want = t.column(i), plan.types[name]
        have = _decoded(col.type)
        if have == want:
            continue
        try:
            if not pa.types.is_null(have) and _is_text(have) != _is_text(want):  # "00047" is not 47
                raise ValueError(have)
            t = t.set_column(i, name, col.cast(want))
        except (pa.ArrowException, ValueError):
            raise DataError(f"{unit.path}: column {name!r} is {col.type} here but {want} in the first input file "
                            f"{plan.first_file}") from None
    return t


def _is_text(t: pa.DataType) -> bool:
    """Strings or bytes, or lists of them: never cast to or from numbers, which would lose
    leading zeros and merge values."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _decoded(t: pa.DataType) -> pa.DataType:
    """The type of a column read as dictionaries, decoded (dictionary<string> -> string, list<dictionary<string>> -> list<string>)."""
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_list(t) and pa.types.is_dictionary(t.value_type):
        return pa.list_(pa.field(t.value_field.name, t.value_type.value_type, t.value_field.nullable))
    return t


def split_codes(plan: Plan, unit: Unit, t: pa.Table, row_start: int) -> np.ndarray:
    s, n = plan.spec.split, t.num_rows
    if unit.split is not None:
        return np.full(n, unit.split, np.int8)
    if s.kind == "random":
        u = unit_uniform(positions(unit, row_start, n) ^ mix64(np.uint64(s.seed)))
        return np.where(u < s.test_fraction, 2, np.where(u < s.test_fraction + s.valid_fraction, 1, 0)).astype(np.int8)
    col = t.column(s.column)
    if col.null_count:
        raise DataError(f"{unit.path}: the time column {s.column!r} has empty values; every row needs a time to be split")
    codes = np.zeros(n, np.int8)
    for code, cut in ((1, plan.cuts[0]), (2, plan.cuts[1])):
        if cut is not None:
            codes[pc.greater_equal(col, cut).to_numpy()] = code
    return codes


def positions(unit: Unit, row_start: int, n: int, rows: np.ndarray | None = None) -> np.ndarray:
    """A distinct uint64 per input row: (file index, row number in the file)."""
    r = np.arange(row_start, row_start + n, dtype=np.uint64) if rows is None else rows.astype(np.uint64) + np.uint64(row_start)
    return (np.uint64(unit.file_index) << np.uint64(40)) | r


def labels(plan: Plan, unit: Unit, t: pa.Table, row_start: int) -> np.ndarray:
    try:
        y = pc.cast(t.column(plan.spec.label), pa.float64(), safe=False).to_numpy()  # nulls -> NaN, rejected below
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{unit.path}: label {plan.spec.label!r} holds {t.column(plan.spec.label).type} values; "
                        "labels must be 0/1 or true/false") from None
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{unit.path} row {row_start + row + 1}: label {plan.spec.label!r} is "
                        f"{quoted(t.column(plan.spec.label)[row].as_py())}; "
                        "labels must be 0/1 or true/false")
    return y.astype(np.int8)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def dense_values(col, name: str, unit: Unit, row_start: int, rows: np.ndarray | None = None) -> np.ndarray:
    """float64 values of a dense column (`rows`: the table rows `col` holds, if not all)."""
    # nulls -> NaN: both are missing values. Not a safe cast: an int64 beyond 2^53 (a timestamp in
    # nanoseconds) is rounded, as its float32 will be anyway.
    x = pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        out = np.abs(x) > FLOAT32_MAX  # the data set stores float32: written, it would be inf
    if out.any():
        i = int(np.flatnonzero(out)[0])
        row = row_start + 1 + (i if rows is None else int(rows[i]))
        raise DataError(f"{unit.path} row {row}: dense column {name!r} holds {x[i]:g}, "
                        f"beyond float32's range (+-{FLOAT32_MAX:.1e}) that the data set stores")
    return x


def list_values(plan: Plan, name: str, col):
    sep = plan.spec.columns[name].separator
    return col if sep is None else split_strings(col, sep)
