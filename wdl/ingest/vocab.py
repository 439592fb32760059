"""Per-column statistics of an import: value counts -> vocabularies, and a bounded sample of
dense values -> quantile edges (raw values -> ids: wdl.data.id_encoder).

Everything here is bounded by the number of distinct values (or a fixed sample size), never by
the number of rows, and is mergeable, so that workers can each see part of the input and the
result does not depend on how the input was cut.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wdl.data.id_encoder import chunks


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
