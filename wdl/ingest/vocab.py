"""Per-column statistics of an import: value counts -> vocabularies, a bounded sample of dense
values -> quantile edges, and raw values -> ids through a vocabulary.

Everything here is bounded by the number of distinct values (or a fixed sample size), never by
the number of rows, and is mergeable, so that workers can each see part of the input and the
result does not depend on how the input was cut.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LUT_SPAN = 1 << 26  # integer vocabularies spanning at most this many values are encoded by table look-up


def chunks(arr) -> list[pa.Array]:
    return arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]


class ValueCounts:
    """How often each distinct non-null value of one column occurs.

    Memory is one (value, count) pair per distinct value and pending part: parts are merged
    (an Arrow hash aggregation) once they hold more than `merge_every` pairs.
    """

    def __init__(self, merge_every: int = 4_000_000) -> None:
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.merge_every = merge_every

    def add_array(self, arr, mask: np.ndarray | None = None) -> None:
        """Count the non-null values of `arr` (an Array or ChunkedArray), only where `mask` (a
        bool per element, over all chunks) is true if given."""
        pos = 0
        for chunk in chunks(arr):
            m = None if mask is None else mask[pos:pos + len(chunk)]
            pos += len(chunk)
            if not pa.types.is_dictionary(chunk.type) and not pa.types.is_integer(chunk.type):
                chunk = pc.dictionary_encode(chunk)  # strings: each distinct value hashed once
            if pa.types.is_dictionary(chunk.type):  # count indices; the dictionary holds each value once
                n = len(chunk.dictionary)
                idx = pc.fill_null(chunk.indices, n).to_numpy(zero_copy_only=False)  # null -> slot n, dropped
                counts = np.bincount(idx if m is None else idx[m], minlength=n + 1)[:n]
                seen = np.flatnonzero(counts)
                values, counts = chunk.dictionary.take(pa.array(seen)), counts[seen]
            else:  # integers: numpy's sort-based unique is cheaper than a hash table here
                keep = pc.is_valid(chunk).to_numpy(zero_copy_only=False)
                keep = keep if m is None else keep & m
                raw = pc.fill_null(chunk, 0).to_numpy(zero_copy_only=False)
                uniq, counts = np.unique(raw[keep], return_counts=True)
                values = pa.array(uniq, chunk.type)
            self._append(pa.table({"value": values, "count": pa.array(counts, pa.int64())}))

    def add(self, other: "ValueCounts") -> None:
        for t in other.parts:
            self._append(t)

    def _append(self, t: pa.Table) -> None:
        if t.column("value").null_count:  # nulls are counted apart, as unknown values
            t = t.filter(pc.is_valid(t.column("value")))
        if t.num_rows:
            self.parts.append(t)
            self.pending += t.num_rows
        if self.pending > self.merge_every:
            # One thread: counts are merged while the rest of the input is read, by other
            # processes that keep the cores busy; Arrow's threads would only add their overhead.
            self._merge(threads=False)

    def _merge(self, threads: bool = True) -> None:
        if len(self.parts) > 1:
            g = pa.concat_tables(self.parts).group_by("value", use_threads=threads).aggregate([("count", "sum")])
            self.parts = [g.rename_columns(["value", "count"]).select(["value", "count"])]
        self.pending = sum(t.num_rows for t in self.parts)
        self.merge_every = max(self.merge_every, 2 * self.pending)  # amortised: never O(n^2) merging

    def table(self) -> pa.Table:
        self._merge()
        if not self.parts:
            return pa.table({"value": pa.array([], pa.null()), "count": pa.array([], pa.int64())})
        return self.parts[0]

    def vocabulary(self, min_frequency: int = 1, top_k: int | None = None) -> tuple[pa.Array, int]:
        """Values seen at least `min_frequency` times, most frequent first (ties by value), at
        most `top_k` of them; and the number of distinct values seen."""
        t = self.table()
        distinct = t.num_rows
        t = t.filter(pc.greater_equal(t.column("count"), min_frequency))
        order = pc.sort_indices(t, sort_keys=[("count", "descending"), ("value", "ascending")])
        if top_k is not None:
            order = order[:top_k]
        return t.column("value").take(order).combine_chunks(), distinct


class Reservoir:
    """A uniform sample without replacement of at most `size` values, for quantiles.

    Each value comes with a key that is a fixed hash of its position in the input (file, row);
    the sample is the values with the smallest keys (bottom-k sampling). It is therefore the
    same whatever the batching or the number of workers, and merging two reservoirs is keeping
    the smallest keys of both. Quantiles are exact while a column has at most `size` values.
    """

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self.keys = np.zeros(0, np.uint64)
        self.values = np.zeros(0, np.float64)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(self.keys) >= self.size:  # only keys below the current largest can enter
            keep = keys < self.keys.max()
            keys, values = keys[keep], values[keep]
        if len(keys) == 0:
            return
        k, v = np.concatenate([self.keys, keys]), np.concatenate([self.values, values])
        if len(k) > self.size:
            idx = np.argpartition(k, self.size - 1)[:self.size]
            k, v = k[idx], v[idx]
        self.keys, self.values = k, v

    def merge(self, other: "Reservoir") -> None:
        self.add(other.keys, other.values)

    def quantiles(self, buckets: int) -> list[float]:
        """The `buckets - 1` inner edges of equal-frequency buckets (may repeat on skewed data)."""
        if len(self.values) == 0 or buckets < 2:
            return []
        return np.quantile(self.values, np.arange(1, buckets) / buckets).tolist()

    def skewness(self) -> float:
        x = self.values
        if len(x) < 3 or x.std() == 0:
            return 0.0
        return float(((x - x.mean()) ** 3).mean() / x.std() ** 3)


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
