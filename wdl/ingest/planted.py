"""The planted models behind `wdl data generate`: Criteo-shaped and MovieLens-shaped rows whose
labels come from a known logistic model, so the best possible (Bayes-optimal) AUC is known.

The logit mixes what each tower of Wide & Deep is for:
- per-value effects (a linear model over one-hot features learns them; both towers can),
- latent user-item interactions <u, v> (generalisation: needs embeddings, i.e. the deep tower),
- explicit pairwise crosses with no main effect (memorisation: the wide tower's crossed columns),
- dense effects, one of them non-linear (the deep tower's MLP).

Every per-value parameter is a hash of (seed, tag, value), never a stored table, so a chunk of
rows is generated from its own random stream with no shared state: generation parallelises and
the output depends only on the seed, not on the number of workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from wdl.data.hashing import mix64, unit_uniform
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE

# Distinct values per categorical column of Criteo Kaggle's train.txt (C1..C26, as commonly
# reported): from 3 to 10 million.
CRITEO_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                        27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
# Share of missing values per column, roughly as in the Kaggle set.
CRITEO_CAT_MISSING = [0, 0, .03, .03, 0, .12, 0, 0, 0, 0, 0, .03, 0, 0, 0, .03, 0, 0, .44, .44, .03, 0, 0,
                      .03, .44, .03]
CRITEO_DENSE_MISSING = [.45, 0, .21, .22, .03, .22, .04, 0, .04, .45, .04, .77, .22]
# log-normal counts: (mu, sigma) of log(1 + x) per dense column
CRITEO_DENSE_SHAPE = [(1.0, 1.0), (1.5, 1.6), (2.0, 1.2), (1.6, 0.9), (7.5, 2.0), (3.5, 1.8), (1.8, 1.3),
                      (2.5, 1.0), (3.8, 1.3), (0.5, 0.6), (1.2, 0.9), (0.3, 0.6), (1.5, 1.0)]

# The planted criteo model (0-based column indices: C1 is 0).
CRITEO_VALUE_EFFECTS = {0: .35, 1: .35, 4: .3, 5: .3, 7: .3, 8: .2, 12: .3, 13: .25, 16: .25, 19: .2,
                        21: .25, 22: .25, 24: .3, 2: .2, 11: .2}
CRITEO_LATENT = (10, 18)  # C11 x C19: a user-item style interaction of two mid-size columns
CRITEO_CROSSES = [(5, 8), (13, 16), (21, 22)]  # C6 x C9, C14 x C17, C22 x C23: pure interactions
CRITEO_DENSE_WEIGHTS = [.25, -.15, .2, 0, .15, 0, .1, 0, 0, .2, 0, 0, .1]
LATENT_DIM = 8

ML_GENRES = 18
ML_AGES, ML_GENDERS, ML_OCCUPATIONS, ML_ZIPS = 7, 2, 21, 100
ML_FIRST_YEAR, ML_DECADES = 1930, 8  # release years 1930..2009


def movielens_sizes(rows: int) -> tuple[int, int]:
    """Users and items for a MovieLens-shaped set of `rows` ratings (about 50 per user, 200 per item)."""
    return int(np.clip(rows // 50, 50, 2_000_000)), int(np.clip(rows // 200, 30, 500_000))


# ---------------------------------------------------------------------------------- helpers
def _salt(seed: int, tag: int) -> np.uint64:
    return np.uint64(int(mix64(np.array([(seed & 0xFFFFFFFF) << 20 | tag], dtype=np.uint64))[0]))


def hashed_normal(seed: int, tag: int, values: np.ndarray) -> np.ndarray:
    """A standard normal per value, fixed by (seed, tag, value): Box-Muller on hashed uniforms."""
    k = np.asarray(values).astype(np.uint64) ^ _salt(seed, tag)
    u1 = unit_uniform(k)
    u2 = unit_uniform(k ^ np.uint64(0x5851F42D4C957F2D))
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


def latent(seed: int, tag: int, values: np.ndarray, dim: int = LATENT_DIM) -> np.ndarray:
    """[n, dim] latent vectors with N(0, 1) entries: <u, v> / sqrt(dim) has unit variance."""
    return np.stack([hashed_normal(seed, tag * 64 + d, values) for d in range(dim)], axis=1)


def zipf_ranks(rng: np.random.Generator, n: int, card: int, s: float) -> np.ndarray:
    """n ranks in [0, card) with P(rank r) ~ (r + 1)^-s (continuous inverse CDF, vectorised)."""
    u = rng.random(n)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(card + 1.0))
    else:
        top = (card + 1.0) ** (1.0 - s)
        x = ((top - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
    return np.minimum(np.floor(x).astype(np.int64) - 1, card - 1)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------- criteo
def criteo_chunk(seed: int, rng: np.random.Generator, n: int) -> dict:
    """n Criteo-shaped rows: ranks [n, 26] (-1 = missing), raw dense [n, 13] (NaN = missing),
    log1p dense [n, 13], true probability [n]."""
    ranks = np.empty((n, 26), dtype=np.int64)
    for j, card in enumerate(CRITEO_CARDINALITIES):
        s = 1.05 + 0.25 * ((j * 7) % 5) / 4  # exponents 1.05 .. 1.3
        ranks[:, j] = zipf_ranks(rng, n, card, s)
        ranks[rng.random(n) < CRITEO_CAT_MISSING[j], j] = -1
    raw = np.empty((n, 13), dtype=np.float64)
    for j, (mu, sigma) in enumerate(CRITEO_DENSE_SHAPE):
        x = np.floor(np.expm1(np.maximum(rng.normal(mu, sigma, n), 0.0)))
        if j == 1:  # I2 holds a few negative values in the real data
            x = np.where(rng.random(n) < 0.05, -rng.integers(1, 4, n), x)
        x[rng.random(n) < CRITEO_DENSE_MISSING[j]] = np.nan
        raw[:, j] = x
    dense = np.log1p(np.maximum(np.nan_to_num(raw, nan=0.0), 0.0))

    z = np.full(n, -1.75)
    for j, scale in CRITEO_VALUE_EFFECTS.items():
        z += np.where(ranks[:, j] >= 0, scale * hashed_normal(seed, 100 + j, ranks[:, j]), 0.0)
    a, b = CRITEO_LATENT
    both = (ranks[:, a] >= 0) & (ranks[:, b] >= 0)
    dot = (latent(seed, 200, ranks[:, a]) * latent(seed, 201, ranks[:, b])).sum(axis=1)
    z += np.where(both, 1.0 * dot / math.sqrt(LATENT_DIM), 0.0)
    for k, (a, b) in enumerate(CRITEO_CROSSES):
        pair = ranks[:, a] * CRITEO_CARDINALITIES[b] + ranks[:, b]
        ok = (ranks[:, a] >= 0) & (ranks[:, b] >= 0)
        z += np.where(ok, 0.6 * hashed_normal(seed, 300 + k, pair), 0.0)
    for j, w in enumerate(CRITEO_DENSE_WEIGHTS):
        if w:
            mu, sigma = CRITEO_DENSE_SHAPE[j]
            z += w * (dense[:, j] - mu) / sigma
    z += 0.5 * np.sin(2.0 * dense[:, 6])  # non-linear in I7: the MLP's job
    return {"ranks": ranks, "raw": raw, "dense": dense, "p": sigmoid(z)}


def criteo_hex(seed: int, ranks: np.ndarray, column: int) -> np.ndarray:
    """uint32 raw 'hash' values standing for ranks in the TSV format (distinct per column)."""
    return (mix64(ranks.astype(np.uint64) ^ _salt(seed, 500 + column)) >> np.uint64(32)).astype(np.uint32)


def criteo_table(c: dict, rows: np.ndarray) -> pa.Table:
    """Parquet rows as `wdl data prepare criteo` writes them: log1p dense, ids rank + 1 (0 = missing)."""
    cols = {"label": pa.array(c["label"][rows], pa.int8())}
    cols.update({name: pa.array(c["dense"][rows, j].astype(np.float32)) for j, name in enumerate(DENSE)})
    cols.update({name: pa.array(c["ranks"][rows, j] + 1) for j, name in enumerate(CATEGORICAL)})
    cols["bayes_p"] = pa.array(c["p"][rows].astype(np.float32))
    return pa.table(cols)


def criteo_columns(stats: dict) -> dict:
    cols = {name: {"kind": "dense", **stats[name], "transform": "log1p"} for name in DENSE}
    cols.update({name: {"kind": "categorical", "vocab_size": card + 1}
                 for name, card in zip(CATEGORICAL, CRITEO_CARDINALITIES)})
    return cols


# ---------------------------------------------------------------------------------- movielens
# --days: each day after the first, this share of rows has a user new that day, and (drawn
# apart) this share an item new that day; the users' and items' effects and latent vectors turn
# by DAY_DRIFT radians a day (a rotation towards independent ones: the same spread, other values).
DAY_NEW_ROWS = 0.15
DAY_NEW_USERS, DAY_NEW_ITEMS = 0.2, 0.1  # new users / items a day, as shares of the first day's
DAY_DRIFT = 0.1
DRIFT_TAG = 40  # the effect a tag turns towards has the tag + DRIFT_TAG


@dataclass(frozen=True)
class Day:
    """Day `number` (from 1) of a `--days` series: the users and items known before it, and through it."""

    number: int
    users_before: int
    users: int
    items_before: int
    items: int

    @property
    def angle(self) -> float:
        return DAY_DRIFT * (self.number - 1)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n (user, item) ids: the known ones as Zipf ranks, a DAY_NEW_ROWS share of each new today."""
        u = zipf_ranks(rng, n, self.users_before or self.users, 0.9) + 1
        i = zipf_ranks(rng, n, self.items_before or self.items, 1.05) + 1
        if self.number > 1:
            u = np.where(rng.random(n) < DAY_NEW_ROWS, self.users_before + 1 + rng.integers(0, self.users - self.users_before, n), u)
            i = np.where(rng.random(n) < DAY_NEW_ROWS, self.items_before + 1 + rng.integers(0, self.items - self.items_before, n), i)
        return u, i


def movielens_day(rows_per_day: int, number: int) -> Day:
    """Day `number` of a series of days of `rows_per_day` ratings each."""
    n_users, n_items = movielens_sizes(rows_per_day)
    du, di = max(1, int(n_users * DAY_NEW_USERS)), max(1, int(n_items * DAY_NEW_ITEMS))
    return Day(number, n_users + (number - 2) * du if number > 1 else 0, n_users + (number - 1) * du,
               n_items + (number - 2) * di if number > 1 else 0, n_items + (number - 1) * di)


def _turned(values: np.ndarray, angle: float, draw) -> np.ndarray:
    """draw(tag_offset, values) turned by `angle` towards the independent draw(DRIFT_TAG, values)."""
    if not angle:
        return draw(0, values)
    return math.cos(angle) * draw(0, values) + math.sin(angle) * draw(DRIFT_TAG, values)


def movielens_chunk(seed: int, rng: np.random.Generator, n: int, n_users: int, n_items: int,
                    day: Day | None = None) -> dict:
    """n MovieLens-shaped ratings with the columns wdl.ingest.movielens writes (ids from 1); with
    `day`, that day's users, items and drifted effects (n_users, n_items unused)."""
    if day is None:
        u = zipf_ranks(rng, n, n_users, 0.9) + 1
        i = zipf_ranks(rng, n, n_items, 1.05) + 1
    else:
        u, i = day.draw(rng, n)
    angle = day.angle if day is not None else 0.0
    age = (mix64(u.astype(np.uint64) ^ _salt(seed, 1)) % np.uint64(ML_AGES)).astype(np.int64) + 1
    gender = (mix64(u.astype(np.uint64) ^ _salt(seed, 2)) % np.uint64(ML_GENDERS)).astype(np.int64) + 1
    occupation = (mix64(u.astype(np.uint64) ^ _salt(seed, 3)) % np.uint64(ML_OCCUPATIONS)).astype(np.int64) + 1
    zip_prefix = (mix64(u.astype(np.uint64) ^ _salt(seed, 4)) % np.uint64(ML_ZIPS)).astype(np.int64) + 1
    # Items: 1 to 3 genres (duplicates dropped), a release year skewed towards recent decades.
    iu = i.astype(np.uint64)
    n_genres = 1 + (mix64(iu ^ _salt(seed, 5)) % np.uint64(3)).astype(np.int64)
    g = np.stack([1 + (mix64(iu ^ _salt(seed, 6 + k)) % np.uint64(ML_GENRES)).astype(np.int64) for k in range(3)], 1)
    g.sort(axis=1)
    keep = (np.arange(3)[None, :] < n_genres[:, None]) & np.concatenate([np.ones((n, 1), bool), g[:, 1:] != g[:, :-1]], 1)
    year = ML_FIRST_YEAR + np.floor(80 * np.sqrt(unit_uniform(iu ^ _salt(seed, 9)))).astype(np.int64)
    decade = (year - ML_FIRST_YEAR) // 10 + 1

    z = -0.1 + 0.5 * _turned(u, angle, lambda t, v: hashed_normal(seed, 20 + t, v)) \
        + 0.6 * _turned(i, angle, lambda t, v: hashed_normal(seed, 21 + t, v))
    z += 0.8 * (_turned(u, angle, lambda t, v: latent(seed, 22 + t, v))
                * _turned(i, angle, lambda t, v: latent(seed, 23 + t, v))).sum(axis=1) / math.sqrt(LATENT_DIM)
    z += 0.2 * hashed_normal(seed, 24, occupation)
    # Crosses with no main effect: gender x genre, age x genre (averaged over an item's genres).
    cross = (np.where(keep, hashed_normal(seed, 25, gender[:, None] * 64 + g), 0.0)
             + np.where(keep, hashed_normal(seed, 26, age[:, None] * 64 + g), 0.0)).sum(1) / keep.sum(1)
    z += 0.7 * cross
    z += 0.3 * (year - 1985) / 15.0
    lengths = keep.sum(1)
    genres = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                      pa.array(g[keep]))
    return {"user_id": u, "movie_id": i, "age_bucket": age, "gender": gender, "occupation": occupation,
            "zip_prefix": zip_prefix, "genres": genres, "release_year": year.astype(np.float32),
            "release_decade": decade, "p": sigmoid(z)}


def movielens_table(c: dict, rows: np.ndarray) -> pa.Table:
    idx = np.flatnonzero(rows)
    cols = {k: pa.array(c[k][idx]) for k in ("user_id", "movie_id", "age_bucket", "gender", "occupation", "zip_prefix")}
    cols["genres"] = c["genres"].take(pa.array(idx))
    cols["release_year"] = pa.array(c["release_year"][idx])
    cols["release_decade"] = pa.array(c["release_decade"][idx])
    cols["label"] = pa.array(c["label"][idx], pa.int8())
    cols["bayes_p"] = pa.array(c["p"][idx].astype(np.float32))
    return pa.table(cols)


def movielens_columns(n_users: int, n_items: int, year_stats: dict) -> dict:
    cat = {"user_id": n_users, "movie_id": n_items, "age_bucket": ML_AGES, "gender": ML_GENDERS,
           "occupation": ML_OCCUPATIONS, "zip_prefix": ML_ZIPS, "release_decade": ML_DECADES}
    cols = {k: {"kind": "categorical", "vocab_size": v + 1} for k, v in cat.items()}
    cols["genres"] = {"kind": "multi_hot", "vocab_size": ML_GENRES + 1}
    cols["release_year"] = {"kind": "dense", **year_stats}
    return cols
