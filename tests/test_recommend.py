"""`wdl recommend`: a user's top k items, seen ones left out, scored exactly as `wdl predict`
scores the same (user, item) rows of the data set: a MovieLens set (items table, titles) and
a set from `wdl data import` (items and sides read from its train split)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import ROOT, read_split, side_by_side
from wdl.cli import main
from wdl.ingest.movielens import ML100K_GENRES, prepare_movielens

N_USERS, N_MOVIES, N_RATINGS = 30, 50, 1500
SILENT_USER = 999  # in the users file, never rates


def write_ml100k(root: Path) -> Path:
    """A small MovieLens-100k folder; raw ids are offset (users 101.., movies 1001..) so that
    raw and encoded ids differ, one movie has no release date and one is never rated."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    users = [f"{100 + u}|{rng.integers(15, 70)}|{'MF'[u % 2]}|{['writer', 'other', 'artist'][u % 3]}|{10000 + u * 37}"
             for u in range(1, N_USERS + 1)] + [f"{SILENT_USER}|30|F|other|02138"]
    (root / "u.user").write_text("\n".join(users) + "\n")
    movies = []
    for m in range(1, N_MOVIES + 1):
        year = 1930 + int(rng.integers(0, 70))
        date = "" if m == 7 else f"01-Jan-{year}"
        flags = ["1" if rng.random() < 0.2 else "0" for _ in ML100K_GENRES]
        movies.append("|".join([str(1000 + m), f"Movie {m} ({year})", date, "", "http://x", *flags]))
    (root / "u.item").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    u = rng.integers(1, N_USERS + 1, N_RATINGS) + 100
    m = rng.integers(1, N_MOVIES, N_RATINGS) + 1000  # movie N_MOVIES is never rated
    r = np.clip(np.round(3 + (u % 3 - 1) * ((m % 4) - 1.5) + rng.normal(0, 1, N_RATINGS)), 1, 5).astype(int)
    (root / "u.data").write_text("".join(f"{a}\t{b}\t{c}\t{880000000 + i}\n" for i, (a, b, c) in enumerate(zip(u, m, r))))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recommend")
    data = prepare_movielens("ml-100k", root / "ml", source=write_ml100k(root / "src"), cache_dir=root / "cache")
    assert main(["train", "--config", str(ROOT / "configs/movielens-100k.yaml"), f"data.path={data}",
                 f"run.out_dir={root / 'runs'}", "run.name=model", "run.device=cpu", "train.epochs=1",
                 "train.progress=false", "data.batch_size=256"]) == 0
    return root / "runs" / "model"


def raw_ids(data: Path, column: str) -> list:
    return json.loads((data / "vocab" / f"{column}.json").read_text())  # position i: raw value of id i


def recommend(capsys, *args) -> tuple[int, str, str]:
    rc = main(["recommend", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_top_k_leaves_out_seen_movies_and_scores_as_predict(trained, tmp_path, capsys):
    data = Path(yaml.safe_load((trained / "config.yaml").read_text())["data"]["path"])
    users, movies = raw_ids(data, "user_id"), raw_ids(data, "movie_id")
    train = read_split(data, "train")
    user = 105
    mine = np.asarray(train["user_id"].to_numpy()) == users.index(user)
    seen = {movies[i] for i in train["movie_id"].to_numpy()[mine]}
    assert 0 < len(seen) < N_MOVIES - 5

    rc, out, err = recommend(capsys, "--run", str(trained), "--user", str(user), "--k", "5",
                             "--out", str(tmp_path / "top.parquet"))
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 1 + 5 and lines[1].split("|")[0].strip() == "rank"  # summary, header, k rows
    top = pq.read_table(tmp_path / "top.parquet")
    assert top["rank"].to_pylist() == [1, 2, 3, 4, 5]
    assert not set(top["movie_id"].to_pylist()) & seen and not any(top["seen"].to_pylist())
    scores = top["score"].to_numpy()
    assert (np.diff(scores) <= 0).all()
    for line, movie, title in zip(lines[2:], top["movie_id"].to_pylist(), top["title"].to_pylist()):
        assert line.split("|")[1].strip() == str(movie) and line.endswith(title) and title.startswith("Movie ")

    # Every movie, seen ones included: the same scores as wdl predict on this user's rows.
    rc, out, err = recommend(capsys, str(trained), "--user", str(user), "--k", "1000", "--include-seen",
                             "--out", str(tmp_path / "all.parquet"))
    assert rc == 0, err
    every = pq.read_table(tmp_path / "all.parquet")
    assert sorted(every["movie_id"].to_pylist()) == movies[1:]  # the never-rated movie too
    assert {m for m, s in zip(every["movie_id"].to_pylist(), every["seen"].to_pylist()) if s} == seen
    assert every.filter(pc.invert(every["seen"]))["movie_id"].to_pylist()[:5] == top["movie_id"].to_pylist()
    by_movie = dict(zip(every["movie_id"].to_pylist(), every["score"].to_numpy()))
    for split in ("train", "test"):
        assert main(["predict", "--run", str(trained), "--split", split, "--out", str(tmp_path / f"{split}.parquet")]) == 0
        rows = read_split(data, split)
        mask = rows["user_id"].to_numpy() == users.index(user)
        predicted = pq.read_table(tmp_path / f"{split}.parquet")["score"].to_numpy()[mask]
        expected = np.array([by_movie[movies[i]] for i in rows["movie_id"].to_numpy()[mask]])
        assert mask.any()
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-6)


def test_unknown_or_silent_user_is_one_line(trained, capsys):
    for user, says in (("77777", "no such user"), ("abc", "no such user"), (str(SILENT_USER), "no rows")):
        rc, out, err = recommend(capsys, "--run", str(trained), "--user", user)
        assert rc == 2 and says in err and err.startswith("error: --user") and err.count("\n") == 1, err


def test_data_set_without_items_table_is_one_line(trained, tmp_path, capsys):
    """A MovieLens set prepared before the items table existed names the command to re-run (a
    data set of another kind asks for its user and item columns: below)."""
    data = Path(yaml.safe_load((trained / "config.yaml").read_text())["data"]["path"])
    old = tmp_path / "old-ml"
    shutil.copytree(data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["items"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "items.parquet").unlink()
    for path, says in ((old, "re-run `wdl data prepare movielens --variant ml-100k"),):
        run = tmp_path / f"run-{path.name}"
        shutil.copytree(trained, run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"]["path"] = str(path)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        rc, out, err = recommend(capsys, "--run", str(run), "--user", "105")
        assert rc == 2 and says in err and err.count("\n") == 1, err


def write_shop(path: Path) -> Path:
    """Raw clicks: string user ids with a region each, int item ids with a category, a price and
    tags each (so every column is user- or item-side), a label that depends on both."""
    rng = np.random.default_rng(5)
    n, users, items = 2000, 40, 60
    u, i = rng.integers(0, users, n), rng.integers(0, items, n)
    region = np.array(["north", "south", "east"])[np.arange(users) % 3]
    category = np.array(["a", "b", "c", "d"])[np.arange(items) % 4]
    tags = [[f"t{(j * 7 + k) % 5}" for k in range(j % 3)] for j in range(items)]
    logit = (u % 3 - 1) * (i % 4 - 1.5) + rng.normal(0, 1, n)
    pq.write_table(pa.table({
        "user": pa.array([f"u{x}" for x in u]), "item": pa.array(1000 + i, pa.int64()),
        "region": pa.array(region[u]), "category": pa.array(category[i]),
        "price": pa.array((i % 7 + 1) * 2.5, pa.float64()), "tags": pa.array([tags[x] for x in i]),
        "clicked": pa.array((logit > 0).astype(np.int8)),
    }), path)
    return path


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shop")
    raw = write_shop(root / "clicks.parquet")
    assert main(["data", "import", str(raw), "--label", "clicked", "--kind", "item=categorical",
                 "--kind", "tags=multi_hot", "--out", str(root / "data"), "--no-progress"]) == 0
    config = {
        "run": {"name": "shop", "out_dir": str(root / "runs"), "device": "cpu"},
        "data": {"path": str(root / "data"), "batch_size": 128},
        "features": {"label": "clicked", "columns": {
            **{c: {"kind": "categorical", "vocab_size": "auto"} for c in ("user", "item", "region", "category")},
            "tags": {"kind": "multi_hot", "vocab_size": "auto"}, "price": {"kind": "dense", "normalize": "log1p"}}},
        "model": {"wide": {"features": ["user", "item", "region", "category", "tags"]},
                  "deep": {"embeddings": {"user": 8, "item": 8, "category": 4, "tags": 4}, "dense": ["price"],
                           "hidden": [16]}},
        "train": {"epochs": 1, "progress": False},
    }
    (root / "shop.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(root / "shop.yaml")]) == 0
    return root / "runs" / "shop", raw


def test_imported_set_scores_as_predict_and_leaves_out_seen(shop, tmp_path, capsys):
    run, raw = shop
    columns = ["--user-column", "user", "--item-column", "item"]
    rc, out, err = recommend(capsys, str(run), "--user", "u3", "--k", "5", *columns)
    assert rc == 0, err
    assert out.splitlines()[0].startswith("wdl: top 5 of ") and "context" not in out.splitlines()[0]
    assert out.splitlines()[1].split("|")[1].strip() == "item" and len(out.strip().splitlines()) == 7

    rc, out, err = recommend(capsys, str(run), "--user", "u3", "--k", "1000", "--include-seen", *columns,
                             "--out", str(tmp_path / "all.parquet"))
    assert rc == 0, err
    every = pq.read_table(tmp_path / "all.parquet")
    assert set(every["user"].to_pylist()) == {"u3"}
    data = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["path"])
    train = read_split(data, "train")
    users, items = raw_ids(data, "user"), raw_ids(data, "item")
    mine = train["user"].to_numpy() == users.index("u3")
    seen = {items[j] for j in train["item"].to_numpy()[mine]}
    assert {m for m, s in zip(every["item"].to_pylist(), every["seen"].to_pylist()) if s} == seen
    assert set(every["item"].to_pylist()) == {items[j] for j in train["item"].to_numpy()}

    # wdl predict on the user's raw rows (every split) gives the same score per item.
    assert main(["predict", str(run), "--data", str(raw), "--raw", "--key", "user", "--key", "item",
                 "--out", str(tmp_path / "p.parquet")]) == 0
    scored = pq.read_table(tmp_path / "p.parquet").filter(pc.equal(pc.field("user"), "u3"))
    by_item = dict(zip(every["item"].to_pylist(), every["score"].to_numpy()))
    pairs = [(s, by_item[i]) for i, s in zip(scored["item"].to_pylist(), scored["score"].to_numpy()) if i in by_item]
    assert len(pairs) >= 10
    np.testing.assert_allclose(*np.array(pairs).T, rtol=0, atol=1e-6)

    # Without --include-seen: none of the seen items, best first.
    rc, out, err = recommend(capsys, str(run), "--user", "u3", "--k", "1000", *columns,
                             "--out", str(tmp_path / "top.parquet"))
    top = pq.read_table(tmp_path / "top.parquet")
    assert rc == 0 and not set(top["item"].to_pylist()) & seen and (np.diff(top["score"].to_numpy()) <= 0).all()


def test_imported_set_users_file_and_refusals(shop, tmp_path, capsys):
    run, _ = shop
    users = tmp_path / "users.txt"
    users.write_text("u1\nu7\nnobody\n")
    rc, out, err = recommend(capsys, str(run), "--users", str(users), "--k", "3", "--user-column", "user",
                             "--item-column", "item", "--out", str(tmp_path / "many.parquet"))
    assert rc == 0, err
    many = pq.read_table(tmp_path / "many.parquet")
    assert many["user"].to_pylist() == ["u1"] * 3 + ["u7"] * 3 and many["rank"].to_pylist() == [1, 2, 3] * 2
    assert "1 users of" in out and "nobody" in out

    for args, says in ((("--user", "u1"), "--user-column COL --item-column COL"),
                       (("--user", "u1", "--user-column", "user", "--item-column", "price"), "--item-column price"),
                       (("--user", "ghost", "--user-column", "user", "--item-column", "item"), "no such user"),
                       (("--users", str(users), "--user-column", "user", "--item-column", "item"), "give --out")):
        rc, out, err = recommend(capsys, str(run), *args)
        assert rc == 2 and says in err and err.count("\n") == 1, err


@pytest.mark.slow  # three subprocesses that import torch and TorchRec, side by side: about 12 s
def test_documented_commands_print_no_library_warnings(shop, tmp_path):
    """predict, export and recommend keep torch's and TorchRec's warnings (e.g. DCP's ShardedTensor
    deprecation when loading TorchRec tables) off the console: only wdl's own lines."""
    import subprocess
    import sys

    run, raw = shop
    commands = [["predict", str(run), "--data", str(raw), "--raw", "--out", str(tmp_path / "p.parquet")],
                ["export", str(run), "--out", str(tmp_path / "exported")],
                ["recommend", str(run), "--user", "u3", "--user-column", "user", "--item-column", "item"]]
    runs = [lambda args=args: subprocess.run([sys.executable, "-m", "wdl.cli", *args], capture_output=True, text=True,
                                             timeout=300) for args in commands]
    for args, done in zip(commands, side_by_side(*runs)):  # three readers of one run: at once
        assert done.returncode == 0, done.stderr
        for line in (done.stdout + done.stderr).splitlines():
            assert line.startswith(("wdl:", "rank ", " ")) and "Warning" not in line, (args[0], line)
