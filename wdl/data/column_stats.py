"""Mean and std of dense columns, what a data set's manifest records for `normalize: standard`,
and how many values were missing (whether the model gets a missing indicator for a column):
whole (`column_stats`) or accumulated over chunks and workers (`RunningStats`)."""

from __future__ import annotations

import math

import numpy as np


def column_stats(values) -> dict[str, float]:
    """Mean and (population) std of a dense column, ignoring NaN (missing), and the counts of
    missing and present values; what the manifest records of the train split."""
    stats = RunningStats()
    stats.update(values)
    return stats.result()


class RunningStats:
    """Mean/std accumulated over chunks, for dense columns too large to hold at once.

    Chunks are combined with Chan's parallel formula: sums of squares in float64 lose
    everything for columns like timestamps (large mean, small spread).
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.missing = 0  # NaN values seen (nulls, as numpy holds them)

    def update(self, values) -> None:
        x = np.asarray(values, dtype=np.float64).ravel()
        n = x.size
        x = x[~np.isnan(x)]
        self.missing += n - x.size
        if x.size == 0:
            return
        chunk = RunningStats()
        chunk.count, chunk.mean = x.size, float(x.mean())
        chunk.m2 = float(((x - chunk.mean) ** 2).sum())
        self.merge(chunk)

    def merge(self, other: "RunningStats") -> None:
        """Add the values `other` has seen (statistics gathered by another worker)."""
        self.missing += other.missing
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total

    def result(self) -> dict[str, float]:
        """mean, std, and (the manifest's names for a train split's) missing_train, values_train."""
        counts = {"missing_train": self.missing, "values_train": self.count}
        if self.count == 0:
            return {"mean": 0.0, "std": 0.0, **counts}
        return {"mean": self.mean, "std": math.sqrt(self.m2 / self.count), **counts}
