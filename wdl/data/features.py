"""FeatureSpec: the single source of truth for columns, vocabularies, hashing and crosses.

It turns Arrow record batches into `FeatureTable`s (columnar tensors, wdl.data.batch), fully
vectorised: pyarrow compute for nulls, wdl.data.id_encoder for vocabularies, numpy uint64
arithmetic for hashing (wdl.data.hashing). The model only learns the table sizes
(`num_embeddings`) and the dense width from it.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from wdl.config import FeaturesConfig
from wdl.data.batch import FeatureTable, Jagged
from wdl.data.hashing import cross_ids, cross_salt, hash_ids, hash_strings
from wdl.data.id_encoder import IdEncoder
from wdl.errors import ConfigError, DataError, clip


def _tensor(a: np.ndarray) -> Tensor:
    """`a` as a tensor without a copy. Arrow's zero-copy numpy views are read-only, which torch
    warns about; the tensors made here are only ever read (batches are cut from them by gathers
    and slices), so the warning is silenced for this call, not for the whole process."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


_BAND = 4096  # rows per band in _stack_rows: a band of ids (~1 MB for Criteo's 29 keys) stays in cache


def _stack_rows(columns: list[np.ndarray], n: int, dtype: type) -> np.ndarray:
    """np.stack(columns, 1): [n, len(columns)]. Built a band of rows at a time: stacking whole
    columns writes each one across all n rows with a row's stride, which for Criteo's 29 id
    columns is 2.5x slower (measured: 82 against 33 ms for 262,144 rows)."""
    out = np.empty((n, len(columns)), dtype)
    if columns:
        for i in range(0, n, _BAND):
            np.stack([c[i:i + _BAND] for c in columns], 1, out=out[i:i + _BAND])
    return out


@dataclass
class SparseColumn:
    name: str
    kind: str  # categorical | multi_hot
    num_embeddings: int
    mode: str  # ids | hash | vocab | buckets (a dense column's bucket)
    vocab: Optional[pa.Array] = None
    edges: Optional[np.ndarray] = None  # buckets: ascending edges; id = 1 + number of edges <= value


@dataclass
class DenseColumn:
    name: str
    normalize: str
    mean: float
    std: float
    fill: float  # a null's value in raw units (then normalised as any value): the config's, or the train mean
    indicator: bool = False  # the train split has nulls here: the deep part also reads 1.0 where a row's is null


@dataclass
class Cross:
    name: str
    columns: list[str]
    buckets: int
    salt: int


class FeatureSpec:
    """Which columns are read and how raw values become model inputs.

    Args:
        cfg: the `features` config slice.
        manifest_columns: the data set manifest's `columns` (vocab sizes, dense statistics);
            may be empty for a foreign Parquet set fully described by the config.
        sparse_keys: the sparse columns and crosses the model reads.
        dense_keys: the dense columns the model reads, in order.
        root: folder that relative `vocab_file` paths are resolved against.
    """

    def __init__(
        self,
        cfg: FeaturesConfig,
        manifest_columns: dict[str, dict],
        sparse_keys: list[str],
        dense_keys: list[str],
        root: Path | None = None,
    ) -> None:
        self.label = cfg.label
        self.has_labels = True  # False: score rows without a label column (labels read as 0)
        # Per vocabulary column: [values, out of vocabulary, missing] seen by `encode` (see
        # `take_unknown_counts`): ids the data cannot honour are counted, never silently dropped.
        self.unknown: dict[str, list[int]] = {}
        self._encoders: dict[tuple[str, pa.DataType], IdEncoder] = {}  # vocab_file columns' look-ups
        self.sparse_keys = list(dict.fromkeys(sparse_keys))
        self.dense: list[DenseColumn] = []
        self.sparse: dict[str, SparseColumn] = {}
        self.crosses: dict[str, Cross] = {}
        for key in self.sparse_keys:
            if key in cfg.crosses:
                c = cfg.crosses[key]
                for col in c.columns:
                    self._add_sparse(col, cfg, manifest_columns, root)
                self.crosses[key] = Cross(key, list(c.columns), c.hash_buckets, cross_salt(key))
            else:
                self._add_sparse(key, cfg, manifest_columns, root)
        # Keys with exactly one id per row (no multi-hot column involved): batches gather them
        # without offsets.
        self.single_keys = frozenset(
            k for k in self.sparse_keys
            if all(self.sparse[c].kind == "categorical" for c in (self.crosses[k].columns if k in self.crosses else [k]))
        )
        self.dropped: list[str] = []  # dense columns left out for their share of missing values
        for key in dense_keys:
            col = cfg.columns[key]
            meta = manifest_columns.get(key, {})
            if _missing_share(key, meta, cfg.max_missing_fraction):
                self.dropped.append(key)
                continue
            if col.normalize == "standard" and "mean" not in meta:
                raise ConfigError(
                    f"features.columns.{key}: normalize=standard needs mean/std in the data set manifest; use log1p or none"
                )
            std = float(meta.get("std", 1.0)) or 1.0
            mean = float(meta.get("mean", 0.0))
            fill = mean if col.fill is None else col.fill  # the train mean: 0 once standardised
            self.dense.append(DenseColumn(key, col.normalize, mean, std, fill, int(meta.get("missing_train") or 0) > 0))
        if self.dropped:
            _say(f"warning: dense column(s) {', '.join(self.dropped)} are missing in more than "
                 f"{cfg.max_missing_fraction:.0%} of the train rows (features.max_missing_fraction): left out of the model")

    def _add_sparse(self, name: str, cfg: FeaturesConfig, meta_cols: dict, root: Path | None) -> None:
        if name in self.sparse:
            return
        col = cfg.columns[name]
        meta = meta_cols.get(name, {})
        if col.kind == "dense":  # bucketed (config validation allows nothing else here)
            edges = col.buckets
            if edges == "auto":
                if not meta.get("bucket_edges"):
                    raise ConfigError(f"features.columns.{name}.buckets=auto but the manifest gives no bucket_edges "
                                      "for it (`wdl data import` writes them); give the edges as a list")
                edges = sorted(set(meta["bucket_edges"]))  # repeated quantiles mean one bucket
            self.sparse[name] = SparseColumn(name, "categorical", len(edges) + 2, "buckets",
                                             edges=np.asarray(edges, dtype=np.float64))
        elif col.hash_buckets is not None:
            self.sparse[name] = SparseColumn(name, col.kind, col.hash_buckets, "hash")
        elif col.vocab_file is not None:
            path = Path(col.vocab_file)
            if not path.is_absolute() and root is not None:
                path = root / path
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"features.columns.{name}.vocab_file: cannot read {path}: {e}") from None
            # Position i holds the raw value of id i; position 0 is the reserved OOV id.
            self.sparse[name] = SparseColumn(name, col.kind, len(values), "vocab", pa.array(values[1:]))
        else:
            size = col.vocab_size
            if size == "auto":
                if "vocab_size" not in meta:
                    raise ConfigError(f"features.columns.{name}.vocab_size=auto but the manifest gives no vocab_size for it")
                size = int(meta["vocab_size"])
            self.sparse[name] = SparseColumn(name, col.kind, int(size), "ids")

    # --- what the model needs to know -----------------------------------------------------------

    def num_embeddings(self, key: str) -> int:
        return self.crosses[key].buckets if key in self.crosses else self.sparse[key].num_embeddings

    @property
    def dense_dim(self) -> int:
        """The deep part's dense inputs: each dense column, then a missing indicator for each
        column with nulls in the train split (`missing_columns`)."""
        return len(self.dense) + len(self.missing_columns)

    @property
    def missing_columns(self) -> list[str]:
        return [d.name for d in self.dense if d.indicator]

    @property
    def columns(self) -> list[str]:
        """The Parquet columns to read."""
        # a bucketed dense column is read once for both uses
        return list(dict.fromkeys([self.label] * self.has_labels + [*self.sparse, *(d.name for d in self.dense)]))

    # --- Arrow -> tensors -----------------------------------------------------------------------

    def check_schema(self, schema: pa.Schema, where: str) -> None:
        names = set(schema.names)
        for col in self.columns:
            if col not in names:
                raise DataError(f"{where}: column {col!r} named in the config is missing (has: {clip(', '.join(schema.names))})")
        for name, sc in self.sparse.items():
            t = schema.field(name).type
            is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
            if (sc.kind == "multi_hot") != is_list:
                raise DataError(f"{where}: column {name!r} has type {t} but the config says {sc.kind}")

    def encode(self, table: pa.Table | pa.RecordBatch, where: str) -> FeatureTable:
        """Vectorised conversion of N rows; `where` names the source in error messages."""
        n = table.num_rows
        labels = self._labels(table.column(self.label), where) if self.has_labels else np.zeros(n, np.float32)
        ids: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name, sc in self.sparse.items():
            ids[name] = self._sparse_ids(table.column(name), sc, where, self.unknown.setdefault(name, [0, 0, 0]))
        single: list[np.ndarray] = []  # ids of the keys with one id per row, in sparse_keys order
        multi: dict[str, Jagged] = {}
        lengths_t: dict[int, Tensor] = {}
        for key in self.sparse_keys:
            if key in self.crosses:
                values, lengths = self._cross(self.crosses[key], ids, self.sparse)
            else:
                values, lengths = ids[key]
            if key in self.single_keys:  # no lengths: one id per row
                single.append(values)
                continue
            if id(lengths) not in lengths_t:  # a multi-hot column and its crosses share one lengths tensor
                lengths_t[id(lengths)] = _tensor(lengths)
            multi[key] = Jagged(_tensor(values), lengths_t[id(lengths)])
        single_ids = _stack_rows(single, n, np.int64)
        values, missing = [], []
        for d in self.dense:
            x, null = self._dense(table.column(d.name), d, where)
            values.append(x)
            if d.indicator:
                missing.append(null.astype(np.float32))
        dense = _stack_rows(values + missing, n, np.float32)
        return FeatureTable(torch.from_numpy(dense), torch.from_numpy(labels), torch.from_numpy(single_ids),
                            tuple(k for k in self.sparse_keys if k in self.single_keys), multi, tuple(self.sparse_keys))

    def _labels(self, col: pa.Array, where: str) -> np.ndarray:
        try:
            y = np.array(pc.cast(col, pa.float32(), safe=False).to_numpy(zero_copy_only=False), dtype=np.float32)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{where}: label column {self.label!r} holds {col.type} values; labels must be 0 or 1") from None
        bad = ~((y == 0.0) | (y == 1.0))  # NaN and nulls (NaN after conversion) are bad too
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: label column {self.label!r} holds {float(y[row])} at row {row}; labels must be 0 or 1")
        return y

    def take_unknown_counts(self) -> dict[str, dict[str, int]]:
        """Counts since the last call, per column with a vocabulary: `values`, `out_of_vocab`
        (raw values outside vocab_size or the vocab_file, mapped to id 0) and `missing` (nulls,
        and ids already 0 = unknown in the data set)."""
        out = {k: {"values": v, "out_of_vocab": o, "missing": m} for k, (v, o, m) in self.unknown.items()
               if self.sparse[k].mode != "hash"}
        self.unknown = {}
        return out

    def _sparse_ids(self, col: pa.ChunkedArray | pa.Array, sc: SparseColumn, where: str,
                    counts: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, lengths per row; None for a categorical column: one id per row).
        counts: [values, out of vocabulary, missing], added to in place."""
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        lengths = None
        flat = col
        if sc.kind == "multi_hot":
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int32)
            flat = pc.list_flatten(col)
        if pa.types.is_dictionary(flat.type) and sc.mode != "vocab":
            # Dictionary-encoded columns (pandas categoricals read back): hashed and bucketed by
            # their values. The vocabulary look-up takes them as they are (IdEncoder).
            flat = flat.dictionary_decode()
        if sc.mode == "buckets":
            if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
                raise DataError(f"{where}: column {sc.name!r} has type {flat.type}; buckets need numbers")
            null = flat.is_null().to_numpy(zero_copy_only=False)
            x = pc.fill_null(pc.cast(flat, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            if not np.isfinite(x).all():  # as for dense values: null is missing, NaN/inf an error
                raise DataError(f"{where}: column {sc.name!r} holds {x[~np.isfinite(x)][0]}")
            values = np.where(null, 0, np.searchsorted(sc.edges, x, side="right") + 1).astype(np.int64)
            counts[0] += len(values)
            counts[2] += int(np.count_nonzero(values == 0))
        elif sc.mode == "hash":
            if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
                values = hash_strings(flat, sc.num_embeddings)
            else:
                values = hash_ids(pc.fill_null(flat, 0).to_numpy(zero_copy_only=False), sc.num_embeddings)
        elif sc.mode == "vocab":
            values = self._vocab_encoder(sc, flat.type, where).encode(flat)
            zeros = int(np.count_nonzero(values == 0))
            counts[0] += len(values)
            counts[1] += zeros - flat.null_count
            counts[2] += flat.null_count
        else:
            if not pa.types.is_integer(flat.type):
                raise DataError(f"{where}: column {sc.name!r} has type {flat.type}; vocab_size needs integer ids (use hash_buckets)")
            nulls = flat.null_count
            if nulls:
                flat = pc.fill_null(flat, 0)
            # Zero-copy when the column is already int64 without nulls; clip (copying) only when needed.
            values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            outside = 0
            if len(values) and (values.min() < 0 or values.max() >= sc.num_embeddings):
                bad = (values < 0) | (values >= sc.num_embeddings)
                outside = int(np.count_nonzero(bad))
                values = np.where(bad, 0, values)  # reserved OOV id
            counts[0] += len(values)
            counts[1] += outside
            counts[2] += int(np.count_nonzero(values == 0)) - outside
        return values, lengths

    def _vocab_encoder(self, sc: SparseColumn, t: pa.DataType, where: str) -> IdEncoder:
        """The look-up of `sc`'s vocabulary for values of type `t`, built on first use (the
        vocabulary cast to the column's type: ids read as strings still find their values)."""
        enc = self._encoders.get((sc.name, t))
        if enc is None:
            vt = t.value_type if pa.types.is_dictionary(t) else t  # IdEncoder looks up a dictionary's values
            try:  # a column of nulls only (no type to cast to) looks up nothing: every id is 0
                vocab = pa.array([], vt) if pa.types.is_null(vt) else sc.vocab.cast(vt) if sc.vocab.type != vt else sc.vocab
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"{where}: column {sc.name!r} has type {t}, its vocabulary holds "
                                f"{sc.vocab.type} values") from None
            enc = self._encoders[(sc.name, t)] = IdEncoder(vocab)
        return enc

    def __getstate__(self) -> dict:
        # The look-ups are rebuilt where they are used (a loader worker), not pickled over.
        return {**self.__dict__, "_encoders": {}}

    @staticmethod
    def _cross(cross: Cross, ids: dict[str, tuple[np.ndarray, np.ndarray | None]],
               columns: dict[str, SparseColumn]) -> tuple[np.ndarray, np.ndarray | None]:
        # A multi-hot component yields one cross id per list element (sharing its lengths);
        # the scalar components are repeated along its elements. Without one: one id per row.
        multi = [c for c in cross.columns if columns[c].kind == "multi_hot"]
        if not multi:
            return cross_ids([ids[c][0] for c in cross.columns], cross.buckets, cross.salt), None
        m_values, m_lengths = ids[multi[0]]
        parts = [m_values if c == multi[0] else np.repeat(ids[c][0], m_lengths) for c in cross.columns]
        return cross_ids(parts, cross.buckets, cross.salt), m_lengths

    @staticmethod
    def _dense(col: pa.ChunkedArray, d: DenseColumn, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(normalised values, True where null). A null is a missing value (filled); a NaN or inf
        in the data is an error. Arrow keeps the two apart, numpy would not, so fill nulls before
        converting."""
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
            raise DataError(f"{where}: column {d.name!r} is declared dense but holds {t}; declare it categorical "
                            "(vocab_size, hash_buckets or vocab_file) or store numbers")
        null = pc.is_null(col).to_numpy(zero_copy_only=False) if col.null_count else np.zeros(len(col), bool)
        x = pc.fill_null(pc.cast(col, pa.float64()), d.fill).to_numpy(zero_copy_only=False)
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x))[0])
            raise DataError(f"{where}: dense column {d.name!r} holds {x[row]} at row {row}")
        if d.normalize == "standard":
            x = (x - d.mean) / d.std
        elif d.normalize == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        return x.astype(np.float32), null


def _missing_share(name: str, meta: dict, max_fraction: float) -> bool:
    """Whether dense column `name` is to be dropped for its share of missing train values
    (the manifest's missing_train / values_train; unknown: kept). A column missing in every
    train row has nothing to learn from or normalise with: an error unless it is dropped."""
    missing, present = int(meta.get("missing_train") or 0), meta.get("values_train")
    if not missing or present is None:
        return False
    share = missing / (missing + int(present))
    if share > max_fraction:
        return True
    if not present:
        raise ConfigError(f"dense column {name!r} is missing (null) in every train row of the data set: take it out of "
                          "model.deep.dense, or let features.max_missing_fraction (below 1) drop such columns")
    return False


def _say(line: str) -> None:
    """A line on stderr, from the first rank only (every rank builds the spec)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        print(f"wdl: {line}", file=sys.stderr, flush=True)
