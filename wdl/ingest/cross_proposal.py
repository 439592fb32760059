"""Crosses proposed from the data: pairs of columns whose joint effect on the label is more than
the sum of their own effects, as `wdl data import` writes them into the manifest
(`proposed_crosses`) and the training config it prints.

    sample = TrainSample(features_of(manifest_columns, elements, train_rows), label, train_rows)
    for table in encoded_train_tables:           # as the import writes them (ids, float32 numbers)
        sample.add(table)
    ranked = sample.rank()                       # every candidate pair, most significant first
    chosen = proposed(ranked)                    # those chosen, with their hash buckets

Candidates are pairs of categorical, multi-hot (one cross id per list element, as the model's
crosses are) and bucketed dense columns with at most PAIR_CELLS_MAX joint cells; two multi-hot
columns never pair (a cross takes at most one).

The test. A main-effects logistic model over every column (one weight per id, ridge-penalised,
fitted by Newton sweeps over the columns) is fitted to the sample first. For a pair (A, B), the
cells (a, b) collect the model's residuals y - p and weights p (1 - p) of their rows; after the
pair's own margins are refitted in the cell table, T = sum over cells of residual^2 / weight is
the score (Rao) statistic of adding the cross to the model: chi-square with
df = cells - levels(A) - levels(B) + 1 when the cross adds nothing. Conditioning on every other
column matters: two attributes of one user (age, occupation) have a joint label rate that their
margins do not explain, because each cell averages the same few users' own effects; the user id
explains it, and a cross of them would add nothing to a model that has the user id.

The score is a z: T's tail probability as a standard normal quantile (Wilson-Hilferty), with T's
variance taken from the cells' own fourth moments so that sparse cells (a few rows, rare
positives) are not read as signal. A pair with many cells is not favoured: each cell must pay
for itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A cross's joint cells (the product of the two columns' id counts) at most: its weights are
# learned per cell, and 100k cells already leave ~10 train rows a cell in a million; the cell
# tables of a pair cost 3 x 8 bytes a cell while it is scored.
PAIR_CELLS_MAX = 100_000
MAX_CANDIDATES = 1000  # pairs scored at most, the fewest cells first: bounds the time for many columns
# Train rows sampled at most: the three planted crosses of a Criteo-shaped set (75-270 cells,
# 0.6 logit) score z 30-48 on 200k rows; the time is linear in rows (~3.5 s for 200k rows of 40
# columns, 350 pairs, on one core).
SAMPLE_ROWS = 300_000
SAMPLE_IDS = 8_000_000  # ids held at most (int32: 32 MB), so many columns sample fewer rows
# Proposed only above this z: of 1,000 pairs without interaction, one passes z 5 with probability
# ~0.03% if the test were exact; the main-effects model never is, hence the margin.
MIN_Z = 5.0
MAX_PROPOSED = 6  # at most this many crosses proposed, the highest z first
RANKED_KEPT = 20  # ranked pairs recorded in the manifest
RESCORED = 32  # after a cross is chosen, the pairs of highest z scored again given it
RIDGE = 1.0  # the main-effects model's L2 on each id's weight (a prior worth ~5 rows at p = 0.25)
SWEEPS = 8  # Newton sweeps over the columns at most (they stop once the logits settle)
REFIT_SWEEPS = 3  # the same after a chosen cross joins the model
# A cross's hash buckets: BUCKETS_PER_CELL x its joint cells, to the next power of two (at most
# MAX_CROSS_BUCKETS). With 2x, a third of the cells would share a weight with another cell; at 8x
# about 1 in 9 does, and a wide row costs 16 bytes.
BUCKETS_PER_CELL = 8
MAX_CROSS_BUCKETS = 1 << 20


@dataclass
class Feature:
    """A column as the sample reads it: ids in [0, size) per row (per element if multi_hot)."""

    name: str
    kind: str  # categorical | multi_hot | buckets (a dense column's bucket: 0 null, 1 .. len(edges) + 1)
    size: int
    edges: np.ndarray | None = None  # buckets: ascending, distinct edges
    ids_per_row: float = 1.0  # multi_hot: the mean list length in train


@dataclass
class _Column:
    ids: list = field(default_factory=list)  # int32 arrays, one per table added
    lengths: list = field(default_factory=list)  # multi_hot: list lengths per row


class TrainSample:
    """A seeded uniform sample of the train rows (at most SAMPLE_ROWS rows and SAMPLE_IDS ids),
    taken from the encoded tables in the order they are added."""

    def __init__(self, features: list[Feature], label: str, train_rows: int, seed: int = 0) -> None:
        self.features, self.label = features, label
        width = max(1.0, sum(f.ids_per_row for f in features))
        self.rate = min(1.0, SAMPLE_ROWS / max(train_rows, 1), SAMPLE_IDS / width / max(train_rows, 1))
        self.rng = np.random.default_rng(seed)
        self.y: list[np.ndarray] = []
        self.cols = {f.name: _Column() for f in features}
        # After rank(): the labels and the main-effects model's columns (the chosen crosses last),
        # which the fm pair proposal (wdl.ingest.fm_pairs) fits its offsets on.
        self.labels: np.ndarray = np.zeros(0, np.float32)
        self.model_columns: list[Ids] = []

    def add(self, t: pa.Table) -> None:
        """Sample the rows of one encoded train table."""
        keep = None if self.rate >= 1 else np.flatnonzero(self.rng.random(t.num_rows) < self.rate)
        if keep is not None:
            t = t.take(keep)
        self.y.append(t.column(self.label).to_numpy(zero_copy_only=False).astype(np.float32))
        for f in self.features:
            col, c = t.column(f.name), self.cols[f.name]
            if f.kind == "multi_hot":
                c.lengths.append(pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int32))
                c.ids.append(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int32))
            elif f.kind == "buckets":  # as the model buckets the stored float32: null -> 0
                null = pc.is_null(col).to_numpy(zero_copy_only=False)
                x = pc.fill_null(pc.cast(col, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
                c.ids.append(np.where(null, 0, np.searchsorted(f.edges, x, side="right") + 1).astype(np.int32))
            else:
                c.ids.append(pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int32))

    @property
    def rows(self) -> int:
        return int(sum(len(y) for y in self.y))

    def rank(self) -> list[dict]:
        """Candidate pairs, most significant first: {columns, z, statistic, df, cells,
        joint_cardinality}, and `proposed: true` on the crosses chosen. Chosen greedily: the pair
        of highest z (at least MIN_Z) joins the model, the others are scored again given it, and
        so on up to MAX_PROPOSED, so that a pair that only echoes a chosen one (a movie's genres
        stand for the movie) is not chosen too. A pair's z is given the crosses chosen before it."""
        y = np.concatenate(self.y) if self.y else np.zeros(0, np.float32)
        ids = {f.name: Ids.of(self.cols[f.name], f) for f in self.features}
        self.labels, self.model_columns = y, list(ids.values())
        if len(y) == 0 or y.min() == y.max():
            return []
        model = MainEffects(y, list(ids.values()))
        moments = model.moments()
        scores = {pair: _score(ids[pair[0]], ids[pair[1]], moments) for pair in candidates(self.features)}
        scores = {k: v for k, v in scores.items() if v is not None}
        chosen: list[dict] = []
        while len(chosen) < MAX_PROPOSED:
            left = sorted((s for k, s in scores.items() if k not in {tuple(c["columns"]) for c in chosen}),
                          key=lambda s: -s["z"])
            if not left or left[0]["z"] < MIN_Z:
                break
            best = left[0]
            chosen.append({**best, "proposed": True})
            model.add(_cross(ids[best["columns"][0]], ids[best["columns"][1]]))
            self.model_columns = list(model.columns)
            moments = model.moments()
            for s in left[1:RESCORED + 1]:  # only these may be chosen next
                key = (s["columns"][0], s["columns"][1])
                scores[key] = _score(ids[key[0]], ids[key[1]], moments)
                if scores[key] is None:  # its rows now all certain (p 0 or 1): nothing left to test
                    del scores[key]
        taken = {tuple(c["columns"]) for c in chosen}
        rest = sorted((s for k, s in scores.items() if k not in taken), key=lambda s: -s["z"])
        return chosen + rest


def features_of(columns: dict[str, dict], elements: dict[str, int], train_rows: int) -> list[Feature]:
    """The sample's view of the manifest's column entries: categorical and multi-hot ids by their
    vocab_size, dense columns by their bucket edges (as `buckets: auto` reads them); `elements`:
    the list elements of each multi-hot column in train."""
    out = []
    for name, c in columns.items():
        if c["kind"] == "dense":  # without edges (a constant column) it has no buckets to cross
            edges = np.asarray(sorted(set(c.get("bucket_edges") or [])), np.float64)
            out += [Feature(name, "buckets", len(edges) + 2, edges)] if len(edges) else []
        else:
            out.append(Feature(name, c["kind"], int(c["vocab_size"]), None,
                               elements.get(name, 0) / max(train_rows, 1) if c["kind"] == "multi_hot" else 1.0))
    return out


def manifest_entry(sample: TrainSample, ranked: list[dict]) -> dict:
    """What the manifest records of the proposal (`proposed_crosses`): how, on how many rows, and
    the best RANKED_KEPT pairs with their scores, the proposed ones first."""
    pairs = [{**s, "hash_buckets": cross_buckets(s["joint_cardinality"])} if s.get("proposed") else s
             for s in ranked[:RANKED_KEPT]]
    return {"method": "score test of each pair's cross against a main-effects logistic model of every column, "
                      "as a z (Wilson-Hilferty); chosen greedily, each given the ones before",
            "sample_rows": sample.rows, "candidates": len(ranked), "min_z": MIN_Z, "max_proposed": MAX_PROPOSED,
            "proposed": [s["columns"] for s in ranked if s.get("proposed")], "ranked": pairs}


def candidates(features: list[Feature]) -> list[tuple[str, str]]:
    """Pairs to score: at most PAIR_CELLS_MAX cells, not two multi_hot columns; the fewest cells
    first, at most MAX_CANDIDATES (ties in column order)."""
    pairs = [(fa.size * fb.size, i, j) for i, fa in enumerate(features) for j, fb in enumerate(features)
             if i < j and fa.size * fb.size <= PAIR_CELLS_MAX and min(fa.size, fb.size) > 1
             and not (fa.kind == fb.kind == "multi_hot")]
    return [(features[i].name, features[j].name) for _, i, j in sorted(pairs)[:MAX_CANDIDATES]]


def proposed(ranked: list[dict]) -> list[dict]:
    """The crosses `TrainSample.rank` chose, with their hash buckets."""
    return [{**s, "hash_buckets": cross_buckets(s["joint_cardinality"])} for s in ranked if s.get("proposed")]


def cross_buckets(joint_cardinality: int) -> int:
    """BUCKETS_PER_CELL per joint cell, up to a power of two, at most MAX_CROSS_BUCKETS."""
    return min(MAX_CROSS_BUCKETS, 1 << max(1, math.ceil(math.log2(BUCKETS_PER_CELL * joint_cardinality))))


# ------------------------------------------------------------------------------- the statistics
@dataclass
class Ids:
    """A column's ids in the sample, one weight each in the main-effects model."""

    name: str
    size: int
    ids: np.ndarray  # per row, or per element
    rows: np.ndarray | None  # multi_hot: the row of each element
    parts: tuple = ()  # a cross: its two columns, in the order of its cells

    @classmethod
    def of(cls, c: _Column, f: Feature) -> "Ids":
        ids = np.clip(np.concatenate(c.ids) if c.ids else np.zeros(0, np.int32), 0, f.size - 1)
        rows, size = None, f.size
        if f.kind == "multi_hot":
            lengths = np.concatenate(c.lengths)
            rows = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        if size > PAIR_CELLS_MAX // 2:  # never in a pair: its weights only for the ids sampled
            seen, ids = np.unique(ids, return_inverse=True)
            size = len(seen)
        return cls(f.name, max(size, 1), ids.astype(np.int32), rows)

    def take(self, keep: np.ndarray) -> "Ids":
        """The same column over the rows where the boolean `keep` holds (renumbered from 0)."""
        if self.rows is None:
            return Ids(self.name, self.size, self.ids[keep], None, self.parts)
        kept = keep[self.rows]
        return Ids(self.name, self.size, self.ids[kept], (np.cumsum(keep) - 1)[self.rows[kept]].astype(np.int32), self.parts)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class MainEffects:
    """A ridge-penalised logistic model with one weight per id of each column (a multi_hot row
    sums its elements' weights), fitted by Gauss-Seidel Newton sweeps over the columns; a column
    added later (a chosen cross) is fitted from where the model stands."""

    def __init__(self, y: np.ndarray, columns: list[Ids]) -> None:
        rate = y.mean()
        self.y, self.columns, self.weights = y, list(columns), [np.zeros(c.size) for c in columns]
        # float32: numpy's exp is ten times faster on it, and the sums (bincount) are float64
        self.eta = np.full(len(y), math.log(rate / (1 - rate)), np.float32)
        self.bias = float(self.eta[0]) if len(y) else 0.0  # the intercept, as eta holds it
        self.fit(SWEEPS)

    def add(self, c: Ids) -> None:
        self.columns.append(c)
        self.weights.append(np.zeros(c.size))
        self.fit(REFIT_SWEEPS)

    def logits(self, columns: list[Ids], rows: int) -> np.ndarray:
        """The model's logits for `rows` other rows, given as `columns` (this model's, in its order)."""
        eta = np.full(rows, self.bias)
        for c, a in zip(columns, self.weights):
            eta += a[c.ids] if c.rows is None else np.bincount(c.rows, a[c.ids], rows)
        return eta

    def residuals(self) -> tuple[np.ndarray, np.ndarray]:
        p = _sigmoid(self.eta)
        return self.y - p, p * (1 - p)

    def moments(self) -> np.ndarray:
        """[3, rows] float64: each row's residual y - p, its variance p (1 - p), and its fourth
        cumulant p (1 - p) (1 - 6 p (1 - p))."""
        r, w = self.residuals()
        w = w.astype(np.float64)
        return np.stack([r.astype(np.float64), w, w * (1 - 6 * w)])

    def fit(self, sweeps: int) -> None:
        """Newton steps column by column (the newest first), `sweeps` times at most: until the
        logits move by less than 0.01 on average in a sweep. Weights of columns that say the same
        (a user id and the user's age) may still trade between them; the logits do not move."""
        y, eta = self.y, self.eta
        for _ in range(sweeps):
            before = eta.copy()
            for c, a in zip(self.columns[::-1], self.weights[::-1]):
                r, w = self.residuals()
                if c.rows is not None:
                    r, w = r[c.rows], w[c.rows]
                step = (np.bincount(c.ids, r, c.size) - RIDGE * a) / (np.bincount(c.ids, w, c.size) + RIDGE)
                a += step
                eta += (step[c.ids] if c.rows is None else np.bincount(c.rows, step[c.ids], len(y))).astype(np.float32)
            r, w = self.residuals()
            step = r.sum(dtype=np.float64) / w.sum(dtype=np.float64)
            eta += np.float32(step)  # the intercept
            self.bias += float(np.float32(step))
            if np.abs(eta - before).mean() < 0.01:
                break


def _cross(a: Ids, b: Ids) -> Ids:
    """The cross of two columns as a column of its own, one id per joint cell: first.ids *
    second.size + second.ids, the multi_hot one (at most one) second, its elements the cells'."""
    if a.rows is not None:
        a, b = b, a
    ids = (a.ids if b.rows is None else a.ids[b.rows]).astype(np.int64) * b.size + b.ids
    return Ids(f"{a.name} x {b.name}", a.size * b.size, ids, b.rows, (a, b))


def _score(a: Ids, b: Ids, moments: np.ndarray) -> dict | None:
    """The score test of a cross of `a` and `b` given the main-effects model's `moments` per row
    (MainEffects.moments); None when the pair has no degree of freedom."""
    names = [a.name, b.name]
    cross = _cross(a, b)
    (a, b), n = cross.parts, cross.size
    r, w, k = moments if cross.rows is None else moments[:, cross.rows]
    S, W, K = (np.bincount(cross.ids, x, n).reshape(a.size, b.size) for x in (r, w, k))
    seen = W > 0
    df = int(seen.sum()) - int(seen.any(1).sum()) - int(seen.any(0).sum()) + 1
    if df < 1:
        return None
    # Refit the pair's margins in the cell table (weighted least squares of S / W on a + b): what
    # is left is the interaction alone, whatever the main-effects fit left over.
    da, db = np.zeros(a.size), np.zeros(b.size)
    wa, wb = W.sum(1) + 1e-12, W.sum(0) + 1e-12
    for _ in range(20):
        da = (S - W * db[None, :]).sum(1) / wa
        db = (S - W * da[:, None]).sum(0) / wb
    R = S - W * (da[:, None] + db[None, :])
    T = float((R[seen] ** 2 / W[seen]).sum())
    # Var(S^2 / W) = 2 + K / W^2 for a sum of Bernoulli residuals (2 for a chi-square of 1 df)
    var = float((2 + K[seen] / W[seen] ** 2).sum()) * df / int(seen.sum())
    adjusted = df + (T - df) * math.sqrt(2 * df / max(var, 1e-12))
    return {"columns": names, "z": round(_wilson_hilferty(adjusted, df), 2),
            "statistic": round(T, 1), "df": df, "cells": int(seen.sum()), "joint_cardinality": n}


def _wilson_hilferty(x: float, df: int) -> float:
    """The standard normal quantile of a chi-square(df) value x's upper tail (Wilson-Hilferty)."""
    v = 2.0 / (9 * df)
    return ((max(x, 0.0) / df) ** (1 / 3) - (1 - v)) / math.sqrt(v)
