"""MovieLens ratings (every GroupLens layout, or RecBole's copy of ml-100k) -> a wdl data set.

Ratings go through pyarrow.csv, never per-row Python (ml-32m has 32M rows); the small
users/movies files are parsed in Python. Categorical ids come from vocabularies built over
the whole users/movies files, so a movie's id does not depend on the split; id 0 is reserved
for missing / out-of-vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.parse
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from wdl.data.writer import DatasetWriter
from wdl.errors import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m")
RECBOLE = "recbole==1.2.1"
# (layout, ratings file, users file or None, movies file); the first layout found wins.
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
USER_COLUMNS = ("age_bucket", "gender", "occupation", "zip_prefix")
_CHUNK = 1 << 20  # rows per table handed to the writer: bounds memory on ml-32m


# ---------------------------------------------------------------------------- sources
class _Source:
    """The raw files of one variant, inside a zip or a folder (the zip's inner folder or its parent)."""

    def __init__(self, path: pathlib.Path, info: dict) -> None:
        self.path, self.info = path, info
        if path.is_dir():
            self._zip = None
            found = [path / n for n in os.listdir(path)] + [c for d in path.iterdir() if d.is_dir() for c in d.iterdir()]
            names = [str(p.relative_to(path)) for p in found if p.is_file()]
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{path} is not a readable zip archive ({e})") from None
            names = [n for n in self._zip.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        self._members: dict[str, str] = {}
        for n in sorted(names, key=lambda n: n.count("/")):  # shallowest copy of a name wins
            self._members.setdefault(n.rsplit("/", 1)[-1], n)

    def has(self, name: str) -> bool:
        return name in self._members

    def where(self, name: str) -> str:
        return f"{self.path}:{self._members[name]}" if self._zip else str(self.path / self._members[name])

    def open(self, name: str):
        member = self._members[name]
        return self._zip.open(member) if self._zip else open(self.path / member, "rb")

    def text(self, name: str, encoding: str | None = None) -> str:
        with self.open(name) as f:
            data = f.read()
        if encoding:
            return data.decode(encoding)
        try:  # newer sets are UTF-8, older ones latin-1
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _hashes(path: pathlib.Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "wdl"


def _resolve_source(variant: str, source, cache: pathlib.Path) -> _Source:
    default_url = f"{BASE_URL}{variant}.zip"
    text = str(source) if source is not None else default_url
    if urllib.parse.urlparse(text).scheme in ("http", "https", "ftp"):
        zip_path = cache / pathlib.PurePosixPath(urllib.parse.urlparse(text).path).name
        recbole = cache / "recbole-1.2.1" / "ml-100k"
        if not zip_path.exists() and text == default_url and variant == "ml-100k" and (recbole / "source.json").exists():
            return _recbole_cached(recbole)
        if not zip_path.exists():
            try:
                _download(text, zip_path)
            except DataError as e:
                if text == default_url and variant == "ml-100k":
                    print(f"movielens: {e}; falling back to RecBole's copy of ml-100k", file=sys.stderr)
                    return _recbole_fallback(cache)
                raise
        return _zip_source(zip_path, origin=text)
    path = pathlib.Path(text).expanduser().absolute()
    if not path.exists():
        raise DataError(f"MovieLens source {path} does not exist")
    if path.is_dir():
        return _Source(path, {"origin": str(path)})
    return _zip_source(path, origin=str(path))


def _zip_source(path: pathlib.Path, origin: str) -> _Source:
    sha, md5 = _hashes(path)
    info = {"origin": origin, "sha256": sha}
    published = path.with_name(path.name + ".md5")  # saved by _download when GroupLens had one
    if published.exists():
        want = published.read_text().strip()
        if want != md5:
            raise DataError(f"{path}: md5 {md5} differs from the published {want}; delete it and retry")
        info["md5"] = md5
    return _Source(path, info)


def _download(url: str, dest: pathlib.Path) -> None:
    import urllib.request

    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=dest.name, file=sys.stderr) as bar:
            while block := r.read(1 << 20):
                f.write(block)
                bar.update(len(block))
        want = _published_md5(url)
        if want and _hashes(part)[1] != want:
            raise DataError(f"download of {url} is corrupt (md5 differs from {url}.md5)")
        if want:
            dest.with_name(dest.name + ".md5").write_text(want + "\n")
        os.replace(part, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', None) or e})") from None
    finally:
        part.unlink(missing_ok=True)


def _published_md5(url: str) -> str | None:
    import urllib.request
    try:
        with urllib.request.urlopen(url + ".md5", timeout=15) as r:
            found = re.search(r"\b[0-9a-fA-F]{32}\b", r.read(4096).decode("ascii", "replace"))
    except OSError:
        return None  # not published or unreachable: the sha256 we record is all there is
    return found.group(0).lower() if found else None


def _recbole_cached(folder: pathlib.Path) -> _Source:
    return _Source(folder, json.loads((folder / "source.json").read_text()))


def _recbole_fallback(cache: pathlib.Path) -> _Source:
    """ml-100k from the RecBole wheel on PyPI (reachable where GroupLens is not), cached unpacked."""
    folder = cache / "recbole-1.2.1" / "ml-100k"
    if (folder / "source.json").exists():
        return _recbole_cached(folder)
    wheels = cache / "wheels"
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               RECBOLE, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataError(f"cannot get ml-100k from GroupLens nor {RECBOLE} from PyPI ({last}); pass --source")
    wheel = found[0]
    prefix = "recbole/dataset_example/ml-100k/"
    tmp = folder.with_name(f"ml-100k.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
                with zf.open(prefix + name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        info = {"origin": f"pypi:{RECBOLE} ({wheel.name}:{prefix})", "sha256": _hashes(wheel)[0]}
        (tmp / "source.json").write_text(json.dumps(info) + "\n")
        os.replace(tmp, folder)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot unpack ml-100k from {wheel} ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _recbole_cached(folder)


# ---------------------------------------------------------------------------- readers
@dataclass
class _Raw:
    user: np.ndarray      # int64 raw ids, one per rating, in file order
    item: np.ndarray
    rating: np.ndarray    # float32
    ts: np.ndarray        # int64 seconds
    users: dict | None    # {"id": int64[], "age": int[], "gender": str[], "occupation": str[], "zip": str[]}
    items: dict           # {"id": int64[], "year": float64[] (nan = unknown), "genres": list[list[str]]}


def _read_ratings(src: _Source, name: str) -> tuple[np.ndarray, ...]:
    cols = ["u", "m", "r", "t"]
    parse = pacsv.ParseOptions(delimiter="\t")
    read = pacsv.ReadOptions(column_names=cols, block_size=1 << 24)
    if name.endswith(".dat"):  # "u::m::r::t": split on ':' and drop the empty fields between
        parse = pacsv.ParseOptions(delimiter=":")
        read = pacsv.ReadOptions(column_names=["u", "_1", "m", "_2", "r", "_3", "t"], block_size=1 << 24)
    elif name.endswith(".csv"):
        parse = pacsv.ParseOptions(delimiter=",")
    if name.endswith((".csv", ".inter")):
        read.skip_rows = 1  # a header with names we replace
    types = {"u": pa.int64(), "m": pa.int64(), "r": pa.float32(), "t": pa.float64()}
    conv = pacsv.ConvertOptions(column_types=types, include_columns=cols)
    try:
        with src.open(name) as f:
            t = pacsv.read_csv(f, read_options=read, parse_options=parse, convert_options=conv)
    except (pa.ArrowInvalid, ValueError) as e:
        raise DataError(f"{src.where(name)}: malformed ratings ({str(e).splitlines()[0]})") from None
    if t.num_rows == 0:
        raise DataError(f"{src.where(name)}: no ratings")
    if any(t.column(c).null_count for c in cols):
        raise DataError(f"{src.where(name)}: ratings with empty fields")
    return tuple(t.column(c).to_numpy() for c in cols)


def _lines(src: _Source, name: str, encoding=None, header=False):
    lines = src.text(name, encoding).splitlines()
    for i, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if line.strip():
            yield i, line


def _bad(src, name, i, what):
    return DataError(f"{src.where(name)} line {i}: {what}")


def _year_from_title(title: str) -> float:
    m = re.search(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$", title)
    return float(m.group(1)) if m else float("nan")


def _read_items(src: _Source, name: str, layout: str) -> dict:
    ids, years, genres = [], [], []
    try:
        if name == "u.item":
            names = ML100K_GENRES
            if src.has("u.genre"):
                names = tuple(l.split("|")[0] for _, l in _lines(src, "u.genre", "latin-1"))
            for i, line in _lines(src, name, "latin-1"):
                f = line.split("|")
                if len(f) < 5 + len(names):
                    raise _bad(src, name, i, f"expected {5 + len(names)} '|' fields, got {len(f)}")
                ids.append(int(f[0]))
                years.append(float(f[2][-4:]) if re.search(r"\d{4}$", f[2]) else float("nan"))
                genres.append([g for g, flag in zip(names, f[5:5 + len(names)]) if flag == "1"])
        elif name.endswith(".item"):  # RecBole: item_id, movie_title, release_year, class
            for i, line in _lines(src, name, "utf-8", header=True):
                f = line.split("\t")
                if len(f) < 4:
                    raise _bad(src, name, i, f"expected 4 tab-separated fields, got {len(f)}")
                ids.append(int(f[0]))
                years.append(float(f[2]) if f[2].isdigit() else float("nan"))
                genres.append([g for g in f[3].split() if g not in NO_GENRES])
        elif name.endswith(".dat"):
            for i, line in _lines(src, name):
                head, _, rest = line.partition("::")
                title, sep, gen = rest.rpartition("::")
                if not sep:
                    raise _bad(src, name, i, "expected 'MovieID::Title::Genres'")
                ids.append(int(head))
                years.append(_year_from_title(title))
                genres.append([g for g in gen.strip().split("|") if g not in NO_GENRES])
        else:  # movies.csv: quoted titles need a real CSV parser
            with src.open(name) as f:
                t = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}))
            ids = t.column("movieId").to_pylist()
            years = [_year_from_title(s or "") for s in t.column("title").to_pylist()]
            genres = [[g for g in (s or "").split("|") if g not in NO_GENRES] for s in t.column("genres").to_pylist()]
    except (ValueError, KeyError, pa.ArrowInvalid) as e:
        raise DataError(f"{src.where(name)}: malformed movies file ({str(e).splitlines()[0]})") from None
    if len(set(ids)) != len(ids):
        raise DataError(f"{src.where(name)}: duplicate movie ids")
    return {"id": np.asarray(ids, np.int64), "year": np.asarray(years, np.float64), "genres": genres}


def _read_users(src: _Source, name: str) -> dict:
    rows = []
    for i, line in _lines(src, name, "latin-1" if name != "ml-100k.user" else "utf-8", header=name.endswith(".user") and name != "u.user"):
        f = line.split("::") if name.endswith(".dat") else line.split("\t" if name == "ml-100k.user" else "|")
        if len(f) != 5:
            raise _bad(src, name, i, f"expected 5 fields, got {len(f)}")
        try:
            if name == "users.dat":  # UserID::Gender::Age::Occupation::Zip, occupation as a code
                uid, gender, age, occ, zip_code = int(f[0]), f[1], int(f[2]), ML1M_OCCUPATIONS[int(f[3])], f[4]
            else:  # user_id, age, gender, occupation, zip
                uid, age, gender, occ, zip_code = int(f[0]), int(f[1]), f[2], f[3], f[4]
        except (ValueError, IndexError):
            raise _bad(src, name, i, f"malformed user {line.strip()!r}") from None
        rows.append((uid, age, gender.strip(), occ.strip(), zip_code.strip()[:3].upper()))
    if len({r[0] for r in rows}) != len(rows):
        raise DataError(f"{src.where(name)}: duplicate user ids")
    uid, age, gender, occ, zips = zip(*rows) if rows else ((),) * 5
    return {"id": np.asarray(uid, np.int64), "age": list(age), "gender": list(gender),
            "occupation": list(occ), "zip": list(zips)}


def read_movielens(src: _Source, variant: str) -> tuple[_Raw, str]:
    for layout, ratings, users, items in LAYOUTS[variant]:
        if src.has(ratings) and src.has(items) and (users is None or src.has(users)):
            u, m, r, t = _read_ratings(src, ratings)
            raw = _Raw(u, m, r, t.astype(np.int64), _read_users(src, users) if users else None,
                       _read_items(src, items, layout))
            return raw, layout
    want = " or ".join("/".join(f for f in files[1:] if f) for files in LAYOUTS[variant])
    raise DataError(f"{src.path} does not hold {variant} (looked for {want})")


# ---------------------------------------------------------------------------- encoding
def _encode(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Ids 1..len(vocab) for values in the sorted `vocab`, 0 for the rest."""
    if len(vocab) == 0:
        return np.zeros(len(values), np.int64)
    pos = np.searchsorted(vocab, values)
    hit = vocab[np.minimum(pos, len(vocab) - 1)] == values
    return np.where(hit, pos + 1, 0).astype(np.int64)


def _vocab(values: list) -> tuple[list, np.ndarray]:
    """Sorted vocabulary of a small column (users, movies) and each value's id."""
    vocab = sorted(set(values))
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return vocab, np.fromiter((index[v] for v in values), np.int64, len(values))


def _age_bucket(age: int) -> int:
    return AGE_GROUPS[int(np.searchsorted(AGE_GROUPS[1:], age, side="right"))]


@dataclass
class _Encoded:
    """Per-rating user/movie ids plus per-id feature tables (row 0 = missing user/movie)."""
    user_id: np.ndarray
    movie_id: np.ndarray
    user_feats: dict[str, np.ndarray]   # column -> int64[n_users + 1]
    year: np.ndarray                    # float64[n_movies + 1], nan = unknown
    decade: np.ndarray                  # int64[n_movies + 1]
    genres: pa.ListArray                # list<int64>[n_movies + 1]
    vocabs: dict[str, list]             # column -> raw values of ids 1..


def _encode_all(raw: _Raw) -> _Encoded:
    vocabs: dict[str, list] = {}
    user_vocab = raw.users["id"] if raw.users else raw.user
    user_vocab = np.unique(user_vocab)  # sorted; from the users file where there is one
    vocabs["user_id"] = user_vocab.tolist()
    user_feats = {}
    if raw.users:
        rows = _encode(raw.users["id"], user_vocab)
        buckets = [_age_bucket(a) for a in raw.users["age"]]
        per_column = {"age_bucket": (list(AGE_GROUPS), np.asarray([AGE_GROUPS.index(b) + 1 for b in buckets], np.int64))}
        for col, key in (("gender", "gender"), ("occupation", "occupation"), ("zip_prefix", "zip")):
            per_column[col] = _vocab(raw.users[key])
        for col, (vocab, ids) in per_column.items():
            table = np.zeros(len(user_vocab) + 1, np.int64)
            table[rows] = ids
            user_feats[col], vocabs[col] = table, vocab

    items = raw.items
    order = np.argsort(items["id"], kind="stable")
    vocabs["movie_id"] = items["id"][order].tolist()
    year = np.concatenate([[np.nan], items["year"][order]])
    decades = sorted({int(y) // 10 * 10 for y in items["year"] if not np.isnan(y)})
    vocabs["release_decade"] = decades
    decade = np.zeros(len(year), np.int64)
    known = ~np.isnan(year)
    decade[known] = np.searchsorted(decades, (year[known] // 10 * 10).astype(np.int64)) + 1
    genre_vocab = sorted({g for gs in items["genres"] for g in gs})
    vocabs["genres"] = genre_vocab
    gindex = {g: i + 1 for i, g in enumerate(genre_vocab)}
    lists = [[]] + [[gindex[g] for g in items["genres"][i]] for i in order]
    genres = pa.array(lists, type=pa.list_(pa.int64()))
    return _Encoded(_encode(raw.user, user_vocab), _encode(raw.item, items["id"][order]),
                    user_feats, year, decade, genres, vocabs)


def _table(raw: _Raw, enc: _Encoded, idx: np.ndarray, year_filled: np.ndarray, threshold: float) -> pa.Table:
    uid, mid = enc.user_id[idx], enc.movie_id[idx]
    cols = {"user_id": uid, "movie_id": mid}
    cols.update({c: t[uid] for c, t in enc.user_feats.items()})
    cols["genres"] = enc.genres.take(pa.array(mid))
    cols["release_year"] = year_filled[mid].astype(np.float32)
    cols["release_decade"] = enc.decade[mid]
    cols["timestamp"] = raw.ts[idx]
    cols["rating"] = raw.rating[idx]
    cols["label"] = (raw.rating[idx] >= threshold).astype(np.int8)
    return pa.table(cols)


# ---------------------------------------------------------------------------- splits
def _split(raw: _Raw, kind: str, seed: int, test_fraction: float, valid_fraction: float,
           cutoff) -> tuple[dict[str, np.ndarray], dict]:
    n = len(raw.ts)
    info = {"kind": kind, "test_fraction": test_fraction, "valid_fraction": valid_fraction,
            "valid_of": "train"}
    if kind == "random":
        perm = np.random.default_rng(seed).permutation(n)
        n_train = n - int(round(n * test_fraction))
        train, test = perm[:n_train], perm[n_train:]
        info["seed"] = seed
    else:
        if cutoff is None:  # the timestamp of the first test row in time order; ties go to test
            by_time = np.sort(raw.ts, kind="stable")
            n_train = n - int(round(n * test_fraction))
            cutoff = int(by_time[n_train]) if n_train < n else int(by_time[-1]) + 1
        else:
            info["test_fraction"] = None
        cutoff = int(cutoff)
        is_test = raw.ts >= cutoff
        train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)  # file order
        info["cutoff"] = cutoff
        info["rule"] = "timestamp < cutoff -> train, else test"
    parts = {"train": train}
    if valid_fraction > 0:
        n_valid = int(round(len(train) * valid_fraction))
        if kind == "temporal":  # the latest train rows by time, kept in file order
            keep = np.sort(np.argsort(raw.ts[train], kind="stable")[len(train) - n_valid:])
            is_valid = np.zeros(len(train), bool)
            is_valid[keep] = True
            parts["train"], parts["valid"] = train[~is_valid], train[is_valid]
        else:
            parts["train"], parts["valid"] = train[:len(train) - n_valid], train[len(train) - n_valid:]
    parts["test"] = test
    if len(parts["train"]) == 0:
        raise DataError(f"split leaves no training rows ({kind}, test_fraction={test_fraction}, "
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
    if not 0.0 <= test_fraction < 1.0 or not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"test_fraction and valid_fraction must be in [0, 1), got {test_fraction}, {valid_fraction}")
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    with DatasetWriter(out, name=f"movielens-{variant}", overwrite=overwrite, row_group_rows=row_group_rows) as w:
        src = _resolve_source(variant, source, cache)
        raw, layout = read_movielens(src, variant)
        print(f"movielens {variant}: read {len(raw.ts)} ratings from {src.info['origin']} ({layout} layout)",
              file=sys.stderr)
        enc = _encode_all(raw)
        parts, split_info = _split(raw, split, seed, test_fraction, valid_fraction, temporal_cutoff)

        # Unknown release years take the train mean, so normalisation sees no NaN.
        train_years = enc.year[enc.movie_id[parts["train"]]]
        known = train_years[~np.isnan(train_years)]
        mean = float(known.mean()) if known.size else 0.0
        year_filled = np.where(np.isnan(enc.year), mean, enc.year)
        std = float(year_filled[enc.movie_id[parts["train"]]].std())

        for name, idx in parts.items():
            for start in range(0, max(len(idx), 1), _CHUNK):
                w.write(name, _table(raw, enc, idx[start:start + _CHUNK], year_filled, threshold))
        columns = {}
        for col in ["user_id", "movie_id", *enc.user_feats, "genres"]:
            kind = "multi_hot" if col == "genres" else "categorical"
            columns[col] = {"kind": kind, "vocab_size": len(enc.vocabs[col]) + 1,
                            "vocab_file": w.write_vocab(col, enc.vocabs[col])}
        columns["release_year"] = {"kind": "dense", "mean": mean, "std": std, "missing_filled_with": mean}
        columns["release_decade"] = {"kind": "categorical", "vocab_size": len(enc.vocabs["release_decade"]) + 1,
                                     "vocab_file": w.write_vocab("release_decade", enc.vocabs["release_decade"])}
        source_info = {"kind": "movielens", "variant": variant, "layout": layout, **src.info}
        extra = {"threshold": threshold,
                 "counts": {"ratings": len(raw.ts), "users": len(enc.vocabs["user_id"]),
                            "movies": len(enc.vocabs["movie_id"])},
                 "other_columns": {"timestamp": "int64 seconds since 1970, not a feature",
                                   "rating": "float32 raw rating; label = rating >= threshold"}}
        return w.commit(source=source_info, label="label", columns=columns, split=split_info, extra=extra)


# ---------------------------------------------------------------------------- CLI
def add_prepare_arguments(parser) -> None:
    """Flags of `wdl data prepare movielens`."""
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="which MovieLens release")
    parser.add_argument("--source", default=None,
                        help="local zip, local folder or URL (default: the official GroupLens zip; "
                             "ml-100k falls back to RecBole's copy on PyPI when GroupLens is unreachable)")
    parser.add_argument("--out", required=True, help="output data set folder")
    parser.add_argument("--threshold", type=float, default=4.0, help="label = rating >= THRESHOLD (default 4)")
    parser.add_argument("--split", choices=("random", "temporal"), default="random",
                        help="random permutation of ratings, or a global timestamp cut-off (default random)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of ratings in test (default 0.2)")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="fraction of the train part carved off its end as 'valid' (default 0: none)")
    parser.add_argument("--temporal-cutoff", type=int, default=None,
                        help="with --split temporal: ratings at or after this Unix time go to test")
    parser.add_argument("--seed", type=int, default=2021, help="seed of the random split (default 2021)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")
    parser.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/wdl)")
    parser.add_argument("--row-group-rows", type=int, default=16384, help="rows per Parquet row group")


def run_prepare(args) -> pathlib.Path:
    out = prepare_movielens(args.variant, args.out, source=args.source, threshold=args.threshold,
                            split=args.split, seed=args.seed, test_fraction=args.test_fraction,
                            valid_fraction=args.valid_fraction, temporal_cutoff=args.temporal_cutoff,
                            overwrite=args.overwrite, cache_dir=args.cache_dir,
                            row_group_rows=args.row_group_rows)
    print(f"wrote {out}")
    return out
