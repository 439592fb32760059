"""The fm pairs `wdl data import` proposes from the data (wdl.ingest.fm_pairs): latent pairs are
proposed and pairs without interaction are not, list columns take part, the test is bounded and
deterministic, and the printed config embeds the proposed pairs' columns with fm over them."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wdl.cli import main
from wdl.config import load_config
from wdl.ingest import cross_proposal as X
from wdl.ingest import fm_pairs as P
from wdl.ingest.import_spec import TRAINING_DEFAULTS, fm_candidates, training_config

SIZES = {"user": 400, "item": 330, "shop": 350}
TAGS = 320


def latent_table(rows: int, seed: int = 0) -> pa.Table:
    """Two latent interactions, <u(user), v(item)> and the mean over a row's tags of <u'(user), w(tag)>,
    beside main effects of user, item and shop (whose pairs have no interaction). Ids from 1."""
    rng = np.random.default_rng(seed)
    user, item, shop = (rng.integers(0, k, rows) for k in SIZES.values())
    lengths = rng.integers(1, 4, rows)
    tags = rng.integers(0, TAGS, lengths.sum())
    row = np.repeat(np.arange(rows), lengths)
    g = np.random.default_rng(seed + 1)
    u, v, u2, w = (g.normal(0, 1, (k, 4)) for k in (SIZES["user"], SIZES["item"], SIZES["user"], TAGS))
    mains = [g.normal(0, 0.5, k) for k in SIZES.values()]
    logit = (mains[0][user] + mains[1][item] + mains[2][shop] + 0.8 * (u[user] * v[item]).sum(1)
             + 1.2 * np.bincount(row, (u2[user[row]] * w[tags]).sum(1), rows) / lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.table({"user": pa.array(user + 1), "item": pa.array(item + 1), "shop": pa.array(shop + 1),
                     "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tags + 1)),
                     "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8))})


def ranked(rows: int = 60_000, seed: int = 0) -> list[dict]:
    t = latent_table(rows)
    features = [X.Feature(n, "categorical", k + 1) for n, k in SIZES.items()] + [X.Feature("tags", "multi_hot", TAGS + 1, None, 2.0)]
    sample = X.TrainSample(features, "clicked", t.num_rows)
    sample.add(t)
    sample.rank()
    return P.ranked_pairs(sample, ["user", "item", "shop", "tags"], seed=seed)


@pytest.fixture(scope="module")
def scored() -> list[dict]:
    return ranked()


def test_latent_pairs_are_proposed_and_pairs_without_interaction_are_not(scored):
    z = {frozenset(s["columns"]): s["z"] for s in scored}
    assert len(z) == 6
    assert {frozenset(p) for p in P.proposed(scored)} == {frozenset(("user", "item")), frozenset(("user", "tags"))}
    planted = {frozenset(("user", "item")), frozenset(("user", "tags"))}
    assert min(z[k] for k in planted) > 2 * P.MIN_Z
    assert max(v for k, v in z.items() if k not in planted) < 2  # shop's pairs, item x tags: main effects only
    assert all(s["gain"] > 0 for s in scored if s.get("proposed"))


def test_the_test_is_deterministic_and_seeded(scored):
    assert ranked() == scored
    other = ranked(seed=1)
    assert {frozenset(p) for p in P.proposed(other)} == {frozenset(p) for p in P.proposed(scored)}
    assert [s["z"] for s in other] != [s["z"] for s in scored]


def test_columns_join_the_test_the_fewest_ids_first_within_the_budget(monkeypatch):
    split = {n: type("S", (), {"size": k})() for n, k in {"big": 5000, "a": 10, "b": 20, "c": 30}.items()}
    monkeypatch.setattr(P, "PARAM_BUDGET", P.RANK * 2 * (10 + 20 + 30))
    assert P._within_budget(split) == ["a", "b", "c"]  # in the columns' order; big would not fit
    monkeypatch.setattr(P, "PARAM_BUDGET", P.RANK * 2 * (10 + 20 + 30) - 1)
    assert P._within_budget(split) == ["a", "b"]


def test_a_constant_label_or_too_few_candidates_proposes_nothing():
    features = [X.Feature("user", "categorical", 5), X.Feature("item", "categorical", 5)]
    sample = X.TrainSample(features, "y", 100)
    sample.add(pa.table({"y": pa.array(np.ones(100, np.int8)), "user": pa.array(np.arange(100) % 5),
                         "item": pa.array(np.arange(100) % 3)}))
    sample.rank()
    assert P.ranked_pairs(sample, ["user", "item"]) == []
    assert P.ranked_pairs(sample, ["user"]) == []


def test_candidates_have_enough_ids_and_rows_per_id():
    few, per_id = TRAINING_DEFAULTS["min_ids_per_embedded_column"], TRAINING_DEFAULTS["min_rows_per_embedded_id"]
    columns = {"user": {"kind": "categorical", "vocab_size": few}, "item": {"kind": "categorical", "vocab_size": 4 * few},
               "category": {"kind": "categorical", "vocab_size": few - 1}, "tags": {"kind": "multi_hot", "vocab_size": 2 * few},
               "price": {"kind": "dense", "bucket_edges": [1.0]}}
    # item has too few train rows per id; category too few ids (a cross can learn its pairs)
    assert fm_candidates(columns, 2 * few * per_id) == ["user", "tags"]


def test_the_config_embeds_the_pairs_columns_only(tmp_path):
    columns = {"user": {"kind": "categorical", "vocab_size": 500}, "item": {"kind": "categorical", "vocab_size": 400},
               "shop": {"kind": "categorical", "vocab_size": 600}, "price": {"kind": "dense", "bucket_edges": [1.0]}}
    rows = {"train": 10**6, "test": 2}
    (tmp_path / "c.yaml").write_text(training_config(str(tmp_path), "y", columns, {}, rows, [], [["user", "item"]]))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.deep.embeddings == {"user": 16, "item": 16} and cfg.model.deep.interaction == "fm"
    assert cfg.model.deep.interaction_pairs == [["user", "item"]]
    assert cfg.model.wide.features == ["user", "item", "shop", "price"]
    (tmp_path / "c.yaml").write_text(training_config(str(tmp_path), "y", columns, {}, rows, []))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.deep.embeddings == {} and cfg.model.deep.interaction == "none" and cfg.model.kind == "wide_deep"
    del columns["price"]
    (tmp_path / "c.yaml").write_text(training_config(str(tmp_path), "y", columns, {}, rows, []))
    assert load_config(tmp_path / "c.yaml").model.kind == "wide"  # no pair and no number: nothing for a deep part


def test_the_import_proposes_the_latent_pair_and_the_printed_config_trains(tmp_path, capsys):
    t = latent_table(60_000).drop_columns(["tags"])
    pq.write_table(t, tmp_path / "log.parquet")
    out = tmp_path / "shop"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["data", "import", str(tmp_path / "log.parquet"), "--label", "clicked", "--valid-fraction", "0.1",
                   "--test-fraction", "0.1", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())["proposed_fm_pairs"]
    assert [set(p) for p in m["proposed"]] == [{"user", "item"}] and m["candidates"] == 3 and m["seconds"] > 0
    n = m["sample_rows"]
    assert abs(m["held_out_rows"] - P.HOLDOUT * n) < 4 * (n * P.HOLDOUT * (1 - P.HOLDOUT)) ** 0.5
    assert "proposed fm pairs (manifest: proposed_fm_pairs): user x item (z " in printed.getvalue()
    cfg = load_config(out / "train-config.yaml")
    assert set(cfg.model.deep.embeddings) == {"user", "item"} and len(cfg.model.deep.interaction_pairs) == 1
    rc = main(["train", "--config", str(out / "train-config.yaml"), f"run.out_dir={tmp_path / 'runs'}",
               "train.epochs=1", "train.threads=1", "train.progress=false"])
    assert rc == 0, capsys.readouterr().err
    assert 0.5 < json.loads((tmp_path / "runs" / "shop" / "summary.json").read_text())["test"]["auc"] <= 1
