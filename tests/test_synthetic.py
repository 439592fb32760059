"""`wdl data generate`: determinism, the Bayes-optimal AUC, both profiles, the TSV path, the configs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from helpers import ROOT, read_split
from wdl.cli import main as cli_main
from wdl.errors import DataError
from wdl.ingest import synthetic
from wdl.ingest.criteo import prepare_criteo
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE
from wdl.ingest.planted import zipf_ranks
from wdl.ingest.synthetic import generate


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 1000)  # several chunks even for small sets (forked workers inherit it)


def read(out, split):
    """A split's rows and the manifest (as its JSON)."""
    return read_split(out, split), json.loads((out / "manifest.json").read_text())


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path, small_chunks):
    generate("criteo", 5000, tmp_path / "a", seed=3, progress=False)
    generate("criteo", 5000, tmp_path / "b", seed=3, workers=2, progress=False)
    generate("criteo", 5000, tmp_path / "c", seed=4, progress=False)
    for split in ("train", "test"):
        assert read(tmp_path / "a", split)[0].equals(read(tmp_path / "b", split)[0])
    assert not read(tmp_path / "a", "train")[0].equals(read(tmp_path / "c", "train")[0])


def test_criteo_profile_shape_and_bayes_auc(tmp_path, small_chunks):
    generate("criteo", 20000, tmp_path / "d", seed=5, progress=False)
    test, m = read(tmp_path / "d", "test")
    assert test.column_names[:40] == ["label", *DENSE, *CATEGORICAL]
    # the manifest's Bayes AUC is the AUC of the true probabilities on the test rows
    exact = roc_auc_score(test.column("label").to_numpy(), test.column("bayes_p").to_numpy())
    assert m["bayes_optimal_auc"] == pytest.approx(exact, abs=1e-4)
    assert 0.75 < m["bayes_optimal_auc"] < 0.95
    train, _ = read(tmp_path / "d", "train")
    assert 0.15 < float(np.mean(train.column("label").to_numpy())) < 0.35  # Criteo-like click rate
    for j, c in enumerate(CATEGORICAL):
        ids = train.column(c).to_numpy()
        assert 0 <= ids.min() and ids.max() < m["columns"][c]["vocab_size"]
    assert m["columns"]["C3"]["vocab_size"] == 10131228  # Kaggle-shaped cardinalities: tens to millions
    assert m["columns"]["C9"]["vocab_size"] == 4
    assert m["planted"]["model"]["crosses"] == [["C6", "C9"], ["C14", "C17"], ["C22", "C23"]]
    # equal-frequency bucket edges of each dense column, for `buckets: auto` (the train rows' quantiles)
    i7 = train.column("I7").to_numpy()
    edges = m["columns"]["I7"]["bucket_edges"]
    assert len(edges) == synthetic.DENSE_BUCKETS - 1 and edges == sorted(edges)
    assert edges == pytest.approx(np.quantile(i7, np.arange(1, synthetic.DENSE_BUCKETS) / synthetic.DENSE_BUCKETS))


def test_zipf_frequencies():
    r = zipf_ranks(np.random.default_rng(0), 200_000, 1_000_000, 1.1)
    counts = np.bincount(r)
    assert r.min() >= 0 and r.max() < 1_000_000
    assert counts[0] > counts[9] > counts[99] > 0  # a heavy head and a long tail
    assert len(np.unique(r)) > 20_000


def test_movielens_profile_columns(tmp_path, small_chunks):
    generate("movielens", 6000, tmp_path / "ml", seed=1, valid_fraction=0.1, progress=False)
    train, m = read(tmp_path / "ml", "train")
    assert set(m["splits"]) == {"train", "valid", "test"}
    for c in ("user_id", "movie_id", "age_bucket", "gender", "occupation", "zip_prefix", "genres",
              "release_year", "release_decade", "label"):
        assert c in train.column_names
    genres_type = train.schema.field("genres").type
    assert pa.types.is_list(genres_type) and genres_type.value_type == pa.int64()
    assert m["columns"]["genres"]["kind"] == "multi_hot"
    lengths = [len(g) for g in train.column("genres").to_pylist()[:500]]
    assert min(lengths) >= 1 and max(lengths) <= 3
    # user attributes are a function of the user
    rows = train.select(["user_id", "gender", "age_bucket"]).to_pylist()
    seen = {}
    for r in rows:
        assert seen.setdefault(r["user_id"], (r["gender"], r["age_bucket"])) == (r["gender"], r["age_bucket"])
    assert 0.6 < m["bayes_optimal_auc"] < 0.95


def test_criteo_tsv_round_trip_through_prepare(tmp_path, small_chunks):
    generate("criteo", 4000, tmp_path / "pq", seed=9, progress=False)
    generate("criteo", 4000, tmp_path / "tsv", seed=9, fmt="criteo-tsv", progress=False)
    planted = json.loads((tmp_path / "tsv/planted.json").read_text())
    s = prepare_criteo([tmp_path / "tsv/day_0", tmp_path / "tsv/day_1"], tmp_path / "prep", hash_buckets=1 << 20,
                       progress=False)
    assert s["bad_lines"] == 0
    for split in ("train", "test"):
        a, ma = read(tmp_path / "pq", split)
        b, mb = read(tmp_path / "prep", split)
        assert a.num_rows == b.num_rows
        assert a.column("label").equals(b.column("label"))
        for c in DENSE:  # both hold log1p(max(x, 0)) of the same counts
            np.testing.assert_allclose(a.column(c).to_numpy(), b.column(c).to_numpy(), rtol=1e-6)
        for c in CATEGORICAL:  # missing in one iff missing in the other
            assert ((a.column(c).to_numpy() == 0) == (b.column(c).to_numpy() == 0)).all()
    assert mb["bayes_optimal_auc"] == planted["bayes_optimal_auc"] == ma["bayes_optimal_auc"]


def test_generate_refuses_existing_output_and_bad_arguments(tmp_path, capsys):
    generate("movielens", 500, tmp_path / "x", progress=False)
    rc = cli_main(["data", "generate", "--profile", "movielens", "--rows", "500", "--out", str(tmp_path / "x"),
                   "--no-progress"])
    assert rc == 2 and "already holds a data set" in capsys.readouterr().err
    with pytest.raises(DataError, match="criteo-tsv needs --profile criteo"):
        generate("movielens", 500, tmp_path / "y", fmt="criteo-tsv", progress=False)
    generate("criteo", 500, tmp_path / "t", fmt="criteo-tsv", progress=False)
    with pytest.raises(DataError, match="not empty"):
        generate("criteo", 500, tmp_path / "t", fmt="criteo-tsv", progress=False)
    generate("criteo", 600, tmp_path / "t", fmt="criteo-tsv", overwrite=True, progress=False)
    assert json.loads((tmp_path / "t/planted.json").read_text())["rows"] == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "x"]  # no temporary folders left


@pytest.mark.parametrize("profile", ["criteo", "movielens"])
def test_synthetic_configs_train(tmp_path, profile, capsys):
    """The shipped config as it is, one epoch, through `wdl train` in this process (the launch
    script itself runs in test_distributed)."""
    data = tmp_path / "data"
    generate(profile, 3000, data, seed=2, progress=False)
    config = ROOT / f"configs/synthetic-{profile}.yaml"
    assert config.read_text().startswith("# Launch: python launch/train.py --config")
    rc = cli_main(["train", "--config", str(config), "train.epochs=1", f"data.path={data}",
                   f"run.out_dir={tmp_path / 'runs'}", "train.progress=false", "run.device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "test AUC" in out.out
