"""`wdl export` + wdl.serve: the exported artefact scores raw rows exactly as `wdl predict` does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wdl.cli import main
from wdl.errors import WdlError
from wdl.model.embeddings import torchrec_available
from wdl.serve import Scorer

from helpers import ROOT, read_split, write_shop_config, write_tiny_config


def _train(root: Path, data: Path, *overrides: str) -> Path:
    config = write_tiny_config(root, data)
    assert main(["train", "--config", str(config), "run.name=model", "train.epochs=1", *overrides]) == 0
    return root / "runs" / "model"


def _round_trip(run: Path, data: Path, tmp: Path) -> None:
    predicted = tmp / "scores.parquet"
    assert main(["predict", str(run), "--out", str(predicted)]) == 0
    out = tmp / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "model.pt2").is_file() and json.loads((out / "encoding.json").read_text())["format"] == 1
    scores = Scorer.load(out).score(read_split(data, "test").drop_columns(["label"]))  # no label needed
    assert scores.dtype == np.float32 and scores.shape == (600,)
    np.testing.assert_allclose(scores, pq.read_table(predicted)["score"].to_numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory, tiny_data) -> Path:
    return _train(tmp_path_factory.mktemp("export"), tiny_data)


def test_torch_backend_round_trip_equals_predict(torch_run, tiny_data, tmp_path):
    _round_trip(torch_run, tiny_data, tmp_path)


@pytest.mark.skipif(not torchrec_available(), reason="torchrec (with fbgemm-gpu) is not importable")
def test_torchrec_backend_round_trip_equals_predict(tmp_path, tiny_data):
    run = _train(tmp_path, tiny_data, "model.embedding_backend=torchrec", "optim.deep.name=adagrad")
    _round_trip(run, tiny_data, tmp_path)


def test_every_encoding_mode_and_interactions_round_trip(tmp_path, tiny_data):
    """Hashed, vocab-file and bucketed columns, a cross over a bucket, a dot interaction."""
    vocab = tmp_path / "movies.json"
    vocab.write_text(json.dumps([None, *range(80, 0, -1)]))  # position = id; ids unlike the raw values
    run = _train(tmp_path, tiny_data,
                 "features.columns.user_id={kind: categorical, hash_buckets: 64}",
                 f"features.columns.movie_id={{kind: categorical, vocab_file: {vocab}}}",
                 "features.columns.release_year={kind: dense, normalize: log1p, buckets: [1960, 1980, 1990]}",
                 "features.crosses.year_gender={columns: [release_year, gender], hash_buckets: 40}",
                 "model.wide.features=[user_id, movie_id, genres, release_year, year_gender]",
                 "model.deep.interaction=dot", "model.deep.interaction_pairs=[[user_id, movie_id]]")
    _round_trip(run, tiny_data, tmp_path)
    enc = json.loads((tmp_path / "exported" / "encoding.json").read_text())
    assert {c: enc["columns"][c]["mode"] for c in ("user_id", "movie_id", "release_year")} == {
        "user_id": "hash", "movie_id": "vocab", "release_year": "buckets"}
    assert (tmp_path / "exported" / enc["columns"]["movie_id"]["vocab_file"]).read_text() == vocab.read_text()


def test_deep_only_with_fm_round_trip(tmp_path, tiny_data):
    """No wide part (the model's own bias), the factorisation-machine identity over all pairs."""
    run = _train(tmp_path, tiny_data, "model.kind=deep", "model.deep.interaction=fm",
                 "model.deep.embeddings={user_id: 8, movie_id: 8, genres: 8}")
    _round_trip(run, tiny_data, tmp_path)


def test_dicts_equal_table_and_unknown_values_are_id_0(torch_run, tiny_data, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(torch_run), "--out", str(out), "--checkpoint", "latest"]) == 0
    scorer = Scorer.load(out)
    table = read_split(tiny_data, "test").slice(0, 50)
    from_table = scorer.score(table)
    np.testing.assert_array_equal(scorer.score(table.to_pylist()), from_table)
    np.testing.assert_array_equal(scorer.score(table.drop_columns(["label"]).to_pylist()), from_table)
    assert scorer.score(table.slice(3, 1)) == pytest.approx(from_table[3:4], abs=1e-7)  # one row alone
    # An unknown user, a missing movie, no genres: the reserved id 0, exactly as in training.
    row = {**table.slice(0, 1).to_pylist()[0]}
    odd = [{**row, "user_id": 10_000}, {**row, "user_id": 0}, {**row, "movie_id": None, "genres": []},
           {**row, "movie_id": 0, "genres": []}]
    s = scorer.score(odd)
    assert s[0] == s[1] and s[2] == s[3]
    assert scorer.take_unknown_counts()["user_id"]["out_of_vocab"] >= 1
    assert len(scorer.score([])) == 0


def test_bad_artefact_and_bad_input_are_one_line(torch_run, tmp_path, capsys):
    with pytest.raises(WdlError, match="no encoding.json"):
        Scorer.load(tmp_path)
    (tmp_path / "encoding.json").write_text("{not json")
    (tmp_path / "model.pt2").write_text("")
    with pytest.raises(WdlError, match="cannot read"):
        Scorer.load(tmp_path)
    # via the CLI: a folder that is neither empty nor an export is refused, and so is a bad run
    (tmp_path / "encoding.json").unlink()
    assert main(["export", str(torch_run), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no config.yaml" in err and "\n" not in err
    with pytest.raises(WdlError, match="no row has column"):
        out = tmp_path / "ok"
        assert main(["export", str(torch_run), "--out", str(out)]) == 0
        Scorer.load(out).score([{"user_id": 1}])


def test_serving_imports_neither_the_trainer_nor_torchrec():
    import subprocess
    import sys

    code = ("import sys, wdl.serve; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torchrec', 'fbgemm_gpu') or m.startswith(('wdl.train', 'wdl.distributed'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def _raw_shop(rows: int, seed: int) -> pa.Table:
    """Raw rows as a user's own files hold them: integer users from 0, string items with nulls,
    tags as one "a|b" string ("" and null included), a price with nulls, a 0/1 label."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 30, rows), rng.integers(0, 20, rows)
    items = np.array([f"sku-{i}" for i in item], dtype=object)
    items[::37] = None
    tags = ["|".join(f"t{j}" for j in rng.integers(0, 5, rng.integers(0, 3))) for _ in range(rows)]
    tags[5] = None
    logit = (user % 3 - 1.0) + (item % 4 - 1.5)
    return pa.table({"user": pa.array(user, pa.int64()), "item": pa.array(items, pa.string()),
                     "tags": pa.array(tags, pa.string()),
                     "price": pa.array(rng.lognormal(2, 1, rows), mask=np.arange(rows) % 25 == 0),
                     "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8))})


def test_imported_model_scores_raw_rows_as_imported(tmp_path, torch_run, capsys):
    """A model of a `wdl data import` set scores the raw files themselves (score(rows, raw=True)):
    the same scores, exactly, as its imported rows, and as `wdl predict` gives them."""
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(_raw_shop(1500, 0), raw / "a.parquet")
    test_rows = _raw_shop(300, 1)
    pq.write_table(test_rows, raw / "b.parquet")
    spec = tmp_path / "columns.yaml"
    spec.write_text("label: clicked\ncolumns:\n  user: {kind: categorical}\n  item: {kind: categorical, min_frequency: 2}\n"
                    "  tags: {kind: multi_hot, separator: '|'}\n  price: {kind: dense}\n")
    data = tmp_path / "shop"
    assert main(["data", "import", "--spec", str(spec), "--out", str(data), "--split", "files",
                 "--train-files", str(raw / "a.parquet"), "--test-files", str(raw / "b.parquet"), "--no-progress"]) == 0
    config = write_shop_config(tmp_path / "shop.yaml", data, tmp_path / "runs", "shop")
    assert main(["train", "--config", str(config)]) == 0
    run, out, predicted = tmp_path / "runs" / "shop", tmp_path / "exported", tmp_path / "scores.parquet"
    assert main(["export", str(run), "--out", str(out)]) == 0 and main(["predict", str(run), "--out", str(predicted)]) == 0
    scorer = Scorer.load(out)
    from_raw = scorer.score(test_rows, raw=True)
    np.testing.assert_array_equal(from_raw, scorer.score(read_split(data, "test")))
    np.testing.assert_allclose(from_raw, pq.read_table(predicted)["score"].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(scorer.score(test_rows.drop_columns(["clicked"]).to_pylist(), raw=True), from_raw)
    # A value the import never saw is id 0, as in training; the wrong kind of value is one line.
    row = test_rows.slice(0, 1).to_pylist()[0]
    assert scorer.score([{**row, "item": "never-seen"}], raw=True) == pytest.approx(
        scorer.score([{**row, "item": None}], raw=True), abs=0)
    with pytest.raises(WdlError, match="column 'item' has type int64, its vocabulary holds string"):
        scorer.score([{**row, "item": 7}], raw=True)
    # A column of nulls only (one request without tags) is typed as the import typed it
    alone = scorer.score([{**row, "tags": None}], raw=True)
    assert alone == pytest.approx(scorer.score([{**row, "tags": None}, row], raw=True)[:1], abs=0)
    # wdl predict on the raw file, with an id column carried over; without --raw, a hint to it
    keyed = tmp_path / "keyed.parquet"
    assert main(["predict", str(run), "--data", str(raw / "b.parquet"), "--raw", "--key", "user",
                 "--out", str(keyed)]) == 0
    got = pq.read_table(keyed)
    assert got.column_names == ["row", "score", "label", "user"]
    assert got["user"].to_pylist() == test_rows["user"].to_pylist()
    assert got["label"].to_pylist() == test_rows["clicked"].to_pylist()
    np.testing.assert_allclose(got["score"].to_numpy(), from_raw, rtol=0, atol=1e-6)
    assert main(["predict", str(run), "--data", str(raw / "b.parquet"), "--out", str(keyed)]) == 2
    assert "scored with --raw" in capsys.readouterr().err
    with pytest.raises(WdlError, match="raw=True needs a model trained on a data set from `wdl data import`"):
        main(["export", str(torch_run), "--out", str(tmp_path / "movies")])
        Scorer.load(tmp_path / "movies").score([{"user_id": 1}], raw=True)


def test_raw_numbers_are_bucketed_and_missing_as_the_import_stored_them(tmp_path):
    """Shop prices such as 4.99 are float32 once imported (4.98999977): bucketed from the raw
    float64 they would fall on the other side of a bucket edge taken from the stored values.
    Scoring rounds them as the import did (raw rows, and a table of float64 numbers), and reads
    NaN as missing, as the import does."""
    prices = np.array([4.99, 9.99, 14.99, 19.99, 24.99, 29.99, 39.99, 49.99, 79.99, 99.99])

    def shop(rows: int, seed: int) -> pa.Table:
        rng = np.random.default_rng(seed)
        user, price = rng.integers(0, 30, rows), prices[rng.integers(0, len(prices), rows)]
        logit = (user % 3 - 1.0) + (price > 20)
        return pa.table({"user": pa.array(user), "price": pa.array(price),
                         "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8))})

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(shop(1500, 0), raw / "a.parquet")
    test_rows = shop(300, 1)
    pq.write_table(test_rows, raw / "b.parquet")
    (tmp_path / "columns.yaml").write_text("label: clicked\ncolumns:\n  user: {kind: categorical}\n  price: {kind: dense}\n")
    data = tmp_path / "data"
    assert main(["data", "import", "--spec", str(tmp_path / "columns.yaml"), "--out", str(data), "--split", "files",
                 "--train-files", str(raw / "a.parquet"), "--test-files", str(raw / "b.parquet"), "--no-progress"]) == 0
    (tmp_path / "cfg.yaml").write_text(f"""\
run: {{name: m, out_dir: {tmp_path / 'runs'}, seed: 1, device: cpu}}
data: {{path: {data}, batch_size: 256, eval_batch_size: 512, eval_split: test, in_memory: true}}
features:
  label: clicked
  columns:
    user: {{kind: categorical, vocab_size: auto}}
    price: {{kind: dense, normalize: standard, buckets: auto}}
model:
  embedding_backend: torch
  wide: {{features: [user, price]}}
  deep: {{embeddings: {{user: 4, price: 4}}, dense: [], hidden: [8]}}
train: {{epochs: 1, progress: false}}
""")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "runs" / "m"), "--out", str(out)]) == 0
    scorer = Scorer.load(out)
    imported = read_split(data, "test")
    np.testing.assert_array_equal(scorer.score(test_rows, raw=True), scorer.score(imported))
    # the data set's rows with the prices as float64 (4.99, not 4.98999977): the same buckets
    np.testing.assert_array_equal(scorer.score(imported.set_column(
        imported.schema.get_field_index("price"), "price", test_rows["price"])), scorer.score(imported))
    row = test_rows.slice(0, 1).to_pylist()[0]
    assert scorer.score([{**row, "price": float("nan")}], raw=True) == pytest.approx(
        scorer.score([{**row, "price": None}], raw=True), abs=0)


def test_a_bf16_models_export_says_it_scores_in_float32(tiny_data, tmp_path, capsys):
    """The exported MLP is float32; a model trained with its MLP in bf16 scores near, not exactly
    as, wdl predict (bf16), and the export says so."""
    run = _train(tmp_path, tiny_data, "model.deep.precision=bf16")
    predicted, out = tmp_path / "scores.parquet", tmp_path / "exported"
    assert main(["predict", str(run), "--out", str(predicted)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "exported MLP runs in float32" in capsys.readouterr().err
    scores = Scorer.load(out).score(read_split(tiny_data, "test"))
    np.testing.assert_allclose(scores, pq.read_table(predicted)["score"].to_numpy(), rtol=0, atol=5e-3)
