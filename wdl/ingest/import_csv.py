"""CSV as `wdl data import` reads it: every value kept as the file writes it.

- Null is only what `--null-values` lists (default: the empty field), not pyarrow's long default
  list: "NA", "null", "n/a" and "NaN" are values of a text column. (A number column parses
  "NaN" as the number NaN, which a dense column counts as missing, as it does Parquet's NaN.)
- Categorical columns are read as text from every file, so "02134" stays "02134" and "00047" in
  one file is not "47" in another; dense columns as float64 from every file. A sampled integer
  column with a leading zero (a zip code) is text, so inference never calls it dense.
- Text that is not UTF-8 is refused, naming the file, row and column: replacing the bytes would
  merge distinct values, and dropping the column (pyarrow reads it as binary) would be silent.

Rows are numbered from 1 after the header, as in the import's other errors.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from wdl.errors import DataError, clip, first_line

_LEADING_ZERO = r"^[+-]?0[0-9]"
_BAD_VALUE = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to (\w+): invalid value '(.*)'",
                        re.DOTALL)


def quoted(value) -> str:
    """A value from the data as an error quotes it: repr, clipped."""
    return clip(repr(value))


def convert_options(null_values, types: dict | None = None, columns: list[str] | None = None) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(column_types=types or {}, include_columns=columns or [], null_values=list(null_values),
                                strings_can_be_null=True, quoted_strings_can_be_null=True)


def first_rows(path: str, null_values) -> pa.Table:
    """The file's first block of rows, with its types as inference should see them: integer
    columns with a leading zero in any value read as text."""
    try:
        t = pacsv.open_csv(path, convert_options=convert_options(null_values)).read_next_batch()
        t = pa.Table.from_batches([t])
        names = t.schema.names  # a name given twice is refused by the caller
        ints = [f.name for f in t.schema if pa.types.is_integer(f.type) and names.count(f.name) == 1]
        if ints:
            text = pacsv.open_csv(path, convert_options=convert_options(
                null_values, {n: pa.string() for n in ints}, ints)).read_next_batch()
            for name in ints:
                col = text.column(name)
                if pc.any(pc.match_substring_regex(col, _LEADING_ZERO)).as_py():
                    t = t.set_column(t.schema.get_field_index(name), name, col)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file (no rows)") from None
    except (pa.ArrowException, OSError) as e:
        raise read_error(path, e, null_values) from None
    binary = [f.name for f in t.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if binary:
        raise _not_utf8(path, binary, null_values) or DataError(f"{path}: column {binary[0]!r} is not UTF-8 text")
    return t


def csv_schema(spec, schema: pa.Schema) -> pa.Schema:
    """The types every CSV file is read with: categorical (and separated multi-hot) columns as text
    (booleans aside), so that "02134" keeps its zero in every file; dense columns as float64, so
    that a later block's 2.5 fits a column whose first rows were integers."""
    for name, c in spec.columns.items():
        i = schema.get_field_index(name)
        t = schema.field(i).type if i >= 0 else None
        if c.kind in ("categorical", "multi_hot") and t is not None and not pa.types.is_boolean(t):
            schema = schema.set(i, pa.field(name, pa.string()))
        elif c.kind == "dense" and t is not None and (pa.types.is_integer(t) or pa.types.is_floating(t)):
            schema = schema.set(i, pa.field(name, pa.float64()))
    return schema


def read_error(path: str, e: BaseException, null_values, text_columns: list[str] | None = None) -> DataError:
    """The one-line error for a CSV file pyarrow could not read: a value that is not UTF-8 or not
    a number is named with its column (and row where found); other messages are clipped."""
    message = first_line(e)
    if "invalid UTF8" in message and text_columns:
        found = _not_utf8(path, text_columns, null_values)
        if found is not None:
            return found
    bad = _BAD_VALUE.match(str(e).strip())
    if bad:
        index, line, kind, value = bad.groups()
        header = _header(path)
        name = header[int(index)] if int(index) < len(header) else f"#{index}"
        hint = " (a missing value? list it with --null-values)" if kind in ("double", "float", "int64") else ""
        where = f"{path} line {line}" if line else path  # pyarrow counts the header as line 1
        return DataError(f"{where}: column {name!r} holds {quoted(value)}, which is not {kind}{hint}")
    return DataError(f"{path}: cannot read ({clip(message)})")


def _header(path: str) -> list[str]:
    try:
        return pacsv.open_csv(path).schema.names
    except (pa.ArrowException, OSError):
        return []


def _not_utf8(path: str, columns: list[str], null_values) -> DataError | None:
    """The error naming the first row of `columns` that is not UTF-8, or None if none is found.
    Reads the columns again as bytes: only ever on the way to an error."""
    opts = convert_options(null_values, {n: pa.binary() for n in columns}, columns)
    try:
        row = 0
        for batch in pacsv.open_csv(path, convert_options=opts):
            for name in columns:
                col = batch.column(name)
                try:
                    col.cast(pa.string())
                    continue
                except pa.ArrowInvalid:
                    pass
                for i, v in enumerate(col.to_pylist()):
                    try:
                        (v or b"").decode("utf-8")
                    except UnicodeDecodeError as err:
                        return DataError(f"{path} row {row + i + 1}: column {name!r} is not UTF-8 text "
                                         f"(byte {v[err.start]:#04x} in {quoted(v)}); convert the file to UTF-8, "
                                         "e.g. iconv -f latin1 -t utf-8")
            row += batch.num_rows
    except (pa.ArrowException, OSError):
        return None
    return None
