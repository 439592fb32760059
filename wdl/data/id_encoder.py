"""Raw values -> ids through a vocabulary, built once and reused for every batch: what `wdl data
import` writes a column's ids with, and what FeatureSpec reads a `vocab_file` column with (the
rows of a `wdl predict --raw` or a scorer's raw rows among them). Also `split_strings`, how both
make lists of a string column of separated values before the look-up.

pyarrow's `index_in` hashes its whole value set on every call: 20 ms for a 100k-value
vocabulary, whether the call looks up one value or a million. Arrow keeps no hash set between
calls, so this keeps its own: a table look-up for integers, a Python dict for a few strings,
and `index_in` only where the values are many enough to pay for the hashing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LUT_SPAN = 1 << 26  # integer vocabularies spanning at most this many values are encoded by table look-up


def chunks(arr) -> list[pa.Array]:
    return arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]


def split_strings(col, sep: str):
    """A string column of separated values (`wdl data import`'s `separator`) as lists, split as
    the import splits them before its look-up: "" is an empty list, null stays null."""
    col = pc.cast(col, pa.string()) if pa.types.is_dictionary(col.type) else col
    return pc.split_pattern(pc.if_else(pc.equal(col, ""), None, col), sep)


class IdEncoder:
    """Raw values -> ids: value `vocab[i]` gets id i + 1; values not in the vocabulary and nulls
    get the reserved id 0. Built once per process and reused for every chunk (pyarrow's
    index_in would rebuild its hash set of the whole vocabulary on every call)."""

    def __init__(self, vocab: pa.Array) -> None:
        self.vocab = vocab
        self.is_int = pa.types.is_integer(vocab.type) or pa.types.is_null(vocab.type)
        self._lut = self._sorted = self._dict = None

    def encode(self, arr) -> np.ndarray:
        """int64 ids, one per element of `arr` (an Array or ChunkedArray of raw values)."""
        parts = chunks(arr)
        if len(self.vocab) == 0 or not parts:
            return np.zeros(len(arr), np.int64)
        if self.is_int and not pa.types.is_dictionary(parts[0].type):
            return np.concatenate([self._encode_int_chunk(c) for c in parts])
        if not pa.types.is_dictionary(parts[0].type) and 4 * len(arr) > len(self.vocab):
            # Plain strings: one probe per value beats hashing them into dictionaries first.
            return self._index_in(arr)
        # Strings (or a dictionary-encoded column): look up each chunk's distinct values once, the
        # dictionaries of all chunks in one call (index_in hashes the whole vocabulary per call).
        encs = [c if pa.types.is_dictionary(c.type) else pc.dictionary_encode(c) for c in parts]
        mapped = self._lookup(pa.concat_arrays([e.dictionary for e in encs]))
        out, start = [], 0
        for e in encs:
            m = np.append(mapped[start:start + len(e.dictionary)], 0)  # the slot that null indices point at
            start += len(e.dictionary)
            out.append(m[pc.fill_null(e.indices, len(m) - 1).to_numpy(zero_copy_only=False)])
        return np.concatenate(out)

    def _encode_int_chunk(self, chunk: pa.Array) -> np.ndarray:
        values = pc.fill_null(chunk, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        ids = self._encode_ints(values)
        if chunk.null_count:
            ids[pc.is_null(chunk).to_numpy(zero_copy_only=False)] = 0
        return ids

    def _lookup(self, values: pa.Array) -> np.ndarray:
        """The id of each of `values` (distinct values of some chunks; null -> 0)."""
        if self.is_int:
            ids = self._encode_ints(pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64))
            return np.where(pc.is_valid(values).to_numpy(zero_copy_only=False), ids, 0)
        if 4 * len(values) > len(self.vocab):
            # Arrow builds a hash set of the vocabulary per call (O(vocabulary)): worth it only when
            # the values are many; Python's dict costs ~1 us per value.
            return self._index_in(values)
        if self._dict is None:
            self._dict = {v: i + 1 for i, v in enumerate(self.vocab.to_pylist())}
        lookup = self._dict.get
        return np.fromiter((lookup(v, 0) for v in values.to_pylist()), np.int64, len(values))

    def _index_in(self, values) -> np.ndarray:
        """Ids through Arrow's set lookup (null and unknown -> 0); it hashes the vocabulary per call."""
        ids = pc.fill_null(pc.add(pc.index_in(values, value_set=self.vocab), 1), 0)
        return ids.to_numpy().astype(np.int64)

    def _encode_ints(self, values: np.ndarray) -> np.ndarray:
        if self._lut is None and self._sorted is None:
            v = self.vocab.to_numpy(zero_copy_only=False).astype(np.int64)
            lo, hi = int(v.min()), int(v.max())
            if hi - lo < _LUT_SPAN and -(1 << 62) < lo and hi < (1 << 62):  # dense enough: one table read per value
                self._lut = (lo, hi, np.zeros(hi - lo + 2, np.int64))
                self._lut[2][v - lo] = np.arange(1, len(v) + 1)
            else:
                order = np.argsort(v, kind="stable")
                self._sorted = (v[order], order.astype(np.int64) + 1)
        if self._lut is not None:
            lo, hi, lut = self._lut
            # Clip first (no overflow), then every value outside [lo, hi] lands on lut[-1] == 0.
            return lut[np.clip(values, lo - 1, hi + 1) - lo]
        sv, ids = self._sorted
        pos = np.minimum(np.searchsorted(sv, values), len(sv) - 1)
        return np.where(sv[pos] == values, ids[pos], 0)
