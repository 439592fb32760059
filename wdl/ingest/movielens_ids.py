"""MovieLens ids: the parsed release (wdl.ingest.movielens.Raw) -> per-rating user and movie ids,
per-id user and movie feature tables, and the vocabularies. Ids come from the whole users and
movies files, so a movie's id does not depend on the split; id 0 is missing / unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from wdl.ingest.movielens import Raw

AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ml-1m's buckets: under 18, 18-24, ..., 56+
_LUT_MAX = 1 << 25  # ids below this are encoded through a lookup table


def encode_ids(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Ids 1..len(vocab) for values found in the sorted `vocab`, 0 for the rest."""
    if len(vocab) == 0 or len(values) == 0:
        return np.zeros(len(values), np.int64)
    if vocab[0] >= 0 and vocab[-1] < _LUT_MAX:  # MovieLens ids are small: a table beats searchsorted
        lut = np.zeros(vocab[-1] + 2, np.int64)  # the last slot catches every larger value
        lut[vocab] = np.arange(1, len(vocab) + 1)
        return lut[np.clip(values, -1, vocab[-1] + 1)]  # -1 also lands on that zero slot
    pos = np.searchsorted(vocab, values)
    hit = vocab[np.minimum(pos, len(vocab) - 1)] == values
    return np.where(hit, pos + 1, 0).astype(np.int64)


def unique_ids(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of integer ids."""
    if len(values) and values.min() >= 0 and values.max() < _LUT_MAX:
        return np.flatnonzero(np.bincount(values))
    return np.unique(values)


def small_vocab(values: list, vocab: list | None = None) -> tuple[list, np.ndarray]:
    """A small column's vocabulary (sorted unless given) and each value's id."""
    vocab = sorted(set(values)) if vocab is None else vocab
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return vocab, np.fromiter((index[v] for v in values), np.int64, len(values))


@dataclass
class Encoded:
    """Per-rating user/movie ids plus per-id feature tables (row 0 = missing user/movie)."""
    user_id: np.ndarray
    movie_id: np.ndarray
    user_feats: dict[str, np.ndarray]   # column -> int64[n_users + 1]
    year: np.ndarray                    # float64[n_movies + 1], nan = unknown
    decade: np.ndarray                  # int64[n_movies + 1]
    genres: pa.ListArray                # list<int64>[n_movies + 1]
    titles: list[str]                   # [n_movies]: the title of movie id i + 1
    vocabs: dict[str, list]             # column -> raw values of ids 1..


def encode_release(raw: Raw) -> Encoded:
    """Ids of every rating's user and movie, and the per-id feature tables and vocabularies."""
    user_vocab = unique_ids(raw.users["id"] if raw.users else raw.user)  # users file where there is one
    vocabs, user_feats = {"user_id": user_vocab.tolist()}, {}
    if raw.users:
        rows = encode_ids(raw.users["id"], user_vocab)
        ages = [AGE_GROUPS[int(np.searchsorted(AGE_GROUPS[1:], a, side="right"))] for a in raw.users["age"]]
        for col, (vocab, ids) in {"age_bucket": small_vocab(ages, list(AGE_GROUPS)),
                                  "gender": small_vocab(raw.users["gender"]),
                                  "occupation": small_vocab(raw.users["occupation"]),
                                  "zip_prefix": small_vocab(raw.users["zip"])}.items():
            user_feats[col], vocabs[col] = np.zeros(len(user_vocab) + 1, np.int64), vocab
            user_feats[col][rows] = ids

    order = np.argsort(raw.items["id"], kind="stable")
    movie_vocab = raw.items["id"][order]
    vocabs["movie_id"] = movie_vocab.tolist()
    year = np.concatenate([[np.nan], raw.items["year"][order]])
    known = ~np.isnan(year)
    decades = (year[known] // 10 * 10).astype(np.int64)
    vocabs["release_decade"] = sorted(set(decades.tolist()))
    decade = np.zeros(len(year), np.int64)
    decade[known] = encode_ids(decades, np.asarray(vocabs["release_decade"], np.int64))
    vocabs["genres"] = sorted({g for gs in raw.items["genres"] for g in gs})
    gindex = {g: i + 1 for i, g in enumerate(vocabs["genres"])}
    lists = [[]] + [[gindex[g] for g in raw.items["genres"][i]] for i in order]
    genres = pa.array(lists, type=pa.list_(pa.int64()))
    titles = [raw.items["title"][i] for i in order]
    return Encoded(encode_ids(raw.user, user_vocab), encode_ids(raw.item, movie_vocab),
                    user_feats, year, decade, genres, titles, vocabs)
