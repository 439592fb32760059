"""Rows as one's own files hold them, for a model of a data set from `wdl data import`.

The import maps each categorical and multi-hot column's raw values through a vocabulary
(`vocab/<column>.json`, id i = the i-th value) and writes the ids; the model reads those ids.
Reading the same vocabularies as FeatureSpec `vocab_file` columns gives the same ids from the
raw values, so `wdl predict --raw` and `Scorer.score(rows, raw=True)` score new raw rows without
importing them first. Besides the look-up, this repeats what the import did to a row: a string
column with a `separator` is split into a list ("" an empty list) and dense values become
float32 (through float64), so the scores equal those of the imported rows exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from wdl.data.batch import FeatureTable
from wdl.data.features import FeatureSpec
from wdl.data.id_encoder import split_strings


def raw_vocabularies(manifest: Any, spec: FeatureSpec) -> dict[str, dict[str, Any]]:
    """{column: {"vocab_file": Path, "separator": str | None}} for every column of `spec` that the
    import (`manifest`) mapped through a vocabulary. Empty for other sources (their columns are
    derived, not looked up), or where the model reads such a column other than by its ids
    (hashing or a vocabulary of its own would be a second look-up)."""
    if (manifest.raw.get("source") or {}).get("kind") != "import":
        return {}
    raw = {}
    for name, sc in spec.sparse.items():
        entry = manifest.columns.get(name, {})
        if entry.get("encoding") != "vocab" or not entry.get("vocab_file"):
            continue
        if sc.mode != "ids":
            return {}
        raw[name] = {"vocab_file": Path(manifest.root) / entry["vocab_file"], "separator": entry.get("separator")}
    return raw


class RawRows:
    """A FeatureSpec's interface (columns, check_schema, encode, has_labels, ...) over raw rows.

    spec: the FeatureSpec whose vocabulary columns read the import's vocabularies (vocab_file).
    raw: column -> {"separator": the separator its raw strings are split on, or None, ...}, as
        `raw_vocabularies` gives it (or an artefact's encoding.json keeps it).
    dense_types: column -> the data set's Arrow type of each dense column (float32 for imports).
    """

    def __init__(self, spec: FeatureSpec, raw: dict[str, dict[str, Any]], dense_types: dict[str, pa.DataType]) -> None:
        self.spec, self.dense_types = spec, dict(dense_types)
        self.separators = {name: r["separator"] for name, r in raw.items() if r.get("separator") is not None}

    def __getattr__(self, name: str) -> Any:  # everything else is the spec's
        if name == "spec":  # not set yet (unpickling in a loader worker): no recursion
            raise AttributeError(name)
        return getattr(self.spec, name)

    @property
    def has_labels(self) -> bool:
        return self.spec.has_labels

    @has_labels.setter
    def has_labels(self, value: bool) -> None:
        self.spec.has_labels = value

    def check_schema(self, schema: pa.Schema, where: str) -> None:
        """As FeatureSpec's, on the schema the rows have once prepared (a column of nulls only
        typed, a string split into a list)."""
        fields = []
        for f in schema:
            t = self._null_type(f.name) if pa.types.is_null(f.type) else f.type
            fields.append(pa.field(f.name, pa.list_(pa.string()) if f.name in self.separators and _is_string(t) else t))
        self.spec.check_schema(pa.schema(fields), where)

    def _null_type(self, name: str) -> pa.DataType:
        """The type a column of nulls only is given (it has none of its own)."""
        sc = self.spec.sparse.get(name)
        if sc is not None and sc.vocab is not None:
            return pa.list_(sc.vocab.type) if sc.kind == "multi_hot" and name not in self.separators else sc.vocab.type
        return pa.list_(pa.int64()) if sc is not None and sc.kind == "multi_hot" else pa.float64()

    def encode(self, table: pa.Table | pa.RecordBatch, where: str) -> FeatureTable:
        return self.spec.encode(self.prepare(table), where)

    def prepare(self, table: pa.Table | pa.RecordBatch) -> pa.Table:
        """The rows as the import made them before its look-up: columns of nulls only (a list of
        dicts without a value) given the vocabulary's type, dense numbers in the data set's
        type, strings split where the import split them."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        for i, name in enumerate(table.column_names):
            col = given = table.column(i)
            sep = self.separators.get(name)
            if pa.types.is_null(col.type):
                col = col.cast(self._null_type(name))
            want = self.dense_types.get(name)
            if want is not None and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                # As the import stored them (dense and bucketed columns alike): float64 -> float32
                # gives the same numbers, so the same buckets; NaN is missing, as the import reads it.
                col = pc.cast(pc.cast(col, pa.float64()), want)
                if pa.types.is_floating(want):
                    col = pc.if_else(pc.is_nan(col), pa.scalar(None, want), col)
            if sep is not None and _is_string(col.type):
                col = split_strings(col, sep)  # as the import split it
            if col is not given:
                table = table.set_column(i, name, col)
        return table


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))


def numeric_types(spec: FeatureSpec, schema: pa.Schema) -> dict[str, pa.DataType]:
    """The stored type of every column the spec reads as a number: dense features and bucketed
    columns (what RawRows casts raw numbers to)."""
    names = [d.name for d in spec.dense] + [n for n, sc in spec.sparse.items() if sc.mode == "buckets"]
    return {n: schema.field(n).type for n in names if n in schema.names}
