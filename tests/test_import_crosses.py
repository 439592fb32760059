"""The crosses `wdl data import` proposes from the data, and the training config it prints and
writes: a planted pair is proposed and independent ones are not, the manifest records the
ranking, and the printed config loads and trains as printed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from wdl.cli import main
from wdl.config import load_config
from wdl.ingest import cross_proposal as X
from wdl.ingest.import_spec import TRAINING_DEFAULTS, batch_size, row_prior, training_config


def planted_table(rows: int = 30_000, seed: int = 0) -> pa.Table:
    """A label with two pure interactions, a x b and d x tags (no main effect of b, d or tags),
    beside main effects of the user and c. age and occupation are functions of the user: their
    joint label rate is not their margins' (each cell averages a few users' effects), but the
    user id explains it."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 300, rows)
    a, b, c, d = (rng.integers(0, k, rows) for k in (8, 6, 5, 7))
    lengths = rng.integers(1, 3, rows)
    tags = rng.integers(0, 10, lengths.sum())
    row = np.repeat(np.arange(rows), lengths)
    g = np.random.default_rng(seed + 1)
    user_effect, c_effect = g.normal(0, 0.8, 300), g.normal(0, 0.5, 5)
    ab, d_tag = g.normal(0, 1, (8, 6)), g.normal(0, 1, (7, 10))
    logit = user_effect[user] + c_effect[c] + ab[a, b] + np.bincount(row, d_tag[d[row], tags], rows) / lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({
        "user_id": pa.array(user), "age": pa.array(user % 5), "occupation": pa.array((user * 7 + 3) % 6),
        "a": pa.array(a), "b": pa.array(b), "c": pa.array(c), "d": pa.array(d),
        "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array([f"t{t}" for t in tags])),
        "price": pa.array(rng.lognormal(2, 1, rows)),
        "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)),
    })


def pairs(crosses) -> set[frozenset]:
    return {frozenset(x["columns"] if isinstance(x, dict) else x) for x in crosses}


def test_the_sample_proposes_planted_pairs_and_no_independent_one():
    t = planted_table(20_000)
    ids = {n: pa.array(np.asarray(t.column(n)) + 1) for n in ("user_id", "age", "occupation", "a", "b", "c", "d")}
    tags = pa.ListArray.from_arrays(t.column("tags").chunk(0).offsets,
                                    pa.array([int(v[1:]) + 1 for v in pc.list_flatten(t.column("tags")).to_pylist()]))
    encoded = pa.table({"clicked": t.column("clicked"), **ids, "tags": tags})
    sizes = {"user_id": 301, "age": 6, "occupation": 7, "a": 9, "b": 7, "c": 6, "d": 8}
    features = [X.Feature(n, "categorical", k) for n, k in sizes.items()] + [X.Feature("tags", "multi_hot", 11, None, 1.5)]
    sample = X.TrainSample(features, "clicked", encoded.num_rows)
    for start in range(0, encoded.num_rows, 7000):  # table by table, as the import adds them
        sample.add(encoded.slice(start, 7000))
    assert sample.rows == 20_000
    ranked = sample.rank()
    proposed = X.proposed(ranked)
    assert pairs(proposed) == {frozenset(("a", "b")), frozenset(("d", "tags"))}
    assert all(x["z"] >= X.MIN_Z and x["hash_buckets"] >= 2 * x["joint_cardinality"] for x in proposed)
    z = {frozenset(s["columns"]): s["z"] for s in ranked}
    assert z[frozenset(("c", "d"))] < 3 and z[frozenset(("age", "occupation"))] < 3  # independent; the user's
    assert min(x["z"] for x in proposed) > 10


def test_the_sample_is_bounded_by_rows_and_ids(monkeypatch):
    monkeypatch.setattr(X, "SAMPLE_ROWS", 1000)
    monkeypatch.setattr(X, "SAMPLE_IDS", 1000)
    features = [X.Feature(f"c{i}", "categorical", 3) for i in range(4)]
    sample = X.TrainSample(features, "y", 10_000)
    assert sample.rate == pytest.approx(1000 / 4 / 10_000)  # 4 ids a row: 250 rows
    t = pa.table({"y": pa.array(np.arange(10_000) % 2, pa.int8()), **{f"c{i}": pa.array(np.ones(10_000, np.int64)) for i in range(4)}})
    sample.add(t)
    assert 150 < sample.rows < 350
    monkeypatch.setattr(X, "PAIR_CELLS_MAX", 8)
    monkeypatch.setattr(X, "MAX_CANDIDATES", 2)
    wide = [X.Feature("big", "categorical", 5), *features[:3], X.Feature("m", "multi_hot", 2), X.Feature("n", "multi_hot", 2)]
    got = X.candidates(wide)
    assert got == [("c0", "m"), ("c0", "n")]  # the fewest cells first, never two multi_hot, at most 2


def test_features_from_the_manifest():
    """Dense columns by their distinct edges (none: no buckets to cross), lists by their mean length."""
    got = X.features_of({"p": {"kind": "dense", "bucket_edges": []}, "q": {"kind": "dense", "bucket_edges": [1.0, 1.0, 2.0]},
                         "t": {"kind": "multi_hot", "vocab_size": 5}}, {"t": 30}, 10)
    assert [(f.name, f.kind, f.size, f.ids_per_row) for f in got] == [("q", "buckets", 4, 1.0), ("t", "multi_hot", 5, 3.0)]
    assert got[0].edges.tolist() == [1.0, 2.0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("crosses")
    pq.write_table(planted_table(), d / "log.parquet")
    out = d / "shop"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["data", "import", str(d / "log.parquet"), "--label", "clicked", "--valid-fraction", "0.1",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, printed.getvalue()


def test_the_manifest_records_the_ranked_pairs(imported):
    out, printed = imported
    m = json.loads((out / "manifest.json").read_text())["proposed_crosses"]
    assert pairs(m["proposed"]) == {frozenset(("a", "b")), frozenset(("d", "tags"))}
    assert m["sample_rows"] == json.loads((out / "manifest.json").read_text())["splits"]["train"]["rows"]
    ranked = m["ranked"]
    assert len(ranked) == min(X.RANKED_KEPT, m["candidates"]) and [s.get("proposed", False) for s in ranked[:3]] == [True, True, False]
    assert all({"columns", "z", "df", "cells"} <= set(s) for s in ranked) and "hash_buckets" in ranked[0]
    assert "proposed crosses (manifest: proposed_crosses): a x b (z " in printed


def test_the_printed_config_is_the_written_one_and_trains_as_printed(imported, tmp_path, capsys):
    out, printed = imported
    path = out / "train-config.yaml"
    assert printed.endswith(path.read_text()) and f"training config: {path}" in printed
    cfg = load_config(path)
    assert cfg.data.path == str(out) and cfg.data.valid_split == "valid" and cfg.data.eval_split == "test"
    assert set(cfg.features.crosses) == {"a_x_b", "d_x_tags"} and cfg.features.columns["price"].buckets == "auto"
    assert {"a_x_b", "d_x_tags", "price", "user_id", "tags"} <= set(cfg.model.wide.features)
    # no column has min_ids_per_embedded_column ids (every pair of them could be crossed): no fm pair
    assert cfg.model.deep.embeddings == {} and cfg.model.deep.interaction == "none"
    assert "proposed fm pairs (manifest: proposed_fm_pairs): none" in printed
    assert cfg.model.deep.dense == ["price"] and cfg.model.deep.hidden == TRAINING_DEFAULTS["model"]["deep"]["hidden"]
    assert cfg.optim.wide.l2 == row_prior(cfg.data.batch_size, "wide") > 0
    assert cfg.optim.deep.l2 == row_prior(cfg.data.batch_size, "deep") > 0
    assert cfg.train.early_stopping.patience == 2
    rc = main(["train", "--config", str(path), f"run.out_dir={tmp_path}", "train.epochs=1", "train.threads=1",
               "train.progress=false"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "shop" / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.5 < summary["test"]["auc"] <= 1


@pytest.mark.parametrize("rows, want", [
    ({"train": 800, "valid": 100, "test": 100}, {"valid_split": "valid", "eval_split": "test"}),
    ({"train": 800, "test": 200}, {"valid_fraction": 0.1, "eval_split": "test"}),
    ({"train": 800, "valid": 200}, {"valid_fraction": 0.1, "eval_split": "valid"}),
    ({"train": 10**9, "test": 10}, {"valid_fraction": 0.1, "eval_split": "test", "in_memory": False}),
])
def test_the_config_fits_the_splits(tmp_path, rows, want):
    columns = {"user": {"kind": "categorical", "vocab_size": 10}, "item": {"kind": "categorical", "vocab_size": 7},
               "price": {"kind": "dense", "bucket_edges": [1.0, 2.0]}, "age": {"kind": "dense", "bucket_edges": []}}
    text = training_config(str(tmp_path / "ds"), "y", columns, {"price": "log1p"}, rows, [])
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    data = yaml.safe_load(text)["data"]
    assert data == {"path": str(tmp_path / "ds"), **want, "batch_size": batch_size(rows["train"])}
    assert cfg.features.columns["price"].buckets == "auto" and cfg.features.columns["age"].buckets is None  # no edges
    assert cfg.model.wide.features == ["user", "item", "price"] and cfg.model.deep.dense == ["price", "age"]


@pytest.mark.parametrize("train, size", [(10**9, 4096), (64 * 4096, 4096), (64 * 4096 - 1, 2048), (2000, 256)])
def test_the_batch_size_fits_the_train_rows_and_l2_follows_it(tmp_path, train, size):
    """Batches of the default size unless an epoch would have too few steps; l2 = 2 * lambda / batch."""
    columns = {"user": {"kind": "categorical", "vocab_size": 10}, "price": {"kind": "dense", "bucket_edges": [1.0]}}
    text = training_config(str(tmp_path), "y", columns, {}, {"train": train, "test": 2}, [])
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.batch_size == size and f"data.batch_size ({size})" in text
    for part in ("wide", "deep"):
        l2 = getattr(cfg.optim, part).l2
        assert l2 == pytest.approx(2 * TRAINING_DEFAULTS["prior_lambda"][part] / size, rel=0.05)
