"""Model selection on a validation split: best epoch kept, early stopping, the test split scored
once with the selected model (single process, in-process runs on the tiny data set)."""

from __future__ import annotations

import json

import pytest

from wdl.cli import main
from wdl.config import EarlyStoppingConfig, load_config
from wdl.errors import ConfigError
from wdl.train.selection import Selection


def test_selection_by_auc_and_by_logloss_with_min_delta():
    s = Selection(EarlyStoppingConfig(metric="auc", patience=2, min_delta=0.01))  # (step, epoch, value)
    assert s.update(10, 1, 0.70) and not s.update(20, 1, 0.705) and s.update(30, 2, 0.72)  # 0.005 is within min_delta
    assert not s.should_stop() and not s.update(40, 2, float("nan"))
    again = Selection(s.cfg)  # the state a checkpoint holds: the next evaluation acts the same
    again.load_state_dict(s.state_dict())
    for sel in (s, again):
        assert not sel.update(50, 3, 0.71) and sel.should_stop()
        assert (sel.best_step, sel.best_epoch, sel.best_value) == (30, 2, 0.72)
    fresh = Selection(s.cfg)
    fresh.load_state_dict(Selection(s.cfg).state_dict())  # nothing selected yet survives the round trip
    assert fresh.best_value is None and fresh.best_step is None
    s = Selection(EarlyStoppingConfig(metric="logloss"))
    assert s.update(1, 1, 0.6) and s.update(2, 2, 0.5) and not s.update(3, 3, 0.55)
    assert s.best_epoch == 2 and not s.should_stop()  # patience 0: never stops


@pytest.mark.parametrize("overrides, message", [
    (["data.valid_split=valid", "data.valid_fraction=0.1"], "give one"),
    (["data.valid_fraction=1.5"], "data.valid_fraction: must be in"),
    (["data.valid_split=test"], "also the train or eval split"),
    (["train.early_stopping.patience=2"], "needs a validation split"),
])
def test_selection_config_errors(overrides, message, tiny_config):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config, overrides)


@pytest.mark.parametrize("in_memory", [True, False])
def test_early_stopping_keeps_best_and_scores_test_once(tiny_config, tmp_path, capsys, in_memory):
    args = ["train", "--config", str(tiny_config), "run.name=sel", "data.valid_fraction=0.2", "train.epochs=12",
            "train.early_stopping.patience=2", f"data.in_memory={str(in_memory).lower()}"]
    assert main(args) == 0
    run = tmp_path / "runs" / "sel"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    aucs = [r["auc"] for r in recs]
    best = max(range(len(aucs)), key=aucs.__getitem__) + 1
    assert all(r["eval_split"] == "valid" for r in recs)
    assert len(recs) == best + 2 < 12  # stopped two epochs after the best
    assert summary["best_epoch"] == best and summary["selected_on"] == "valid"
    if in_memory:  # rows held out one by one; streaming holds out whole row groups
        assert recs[0]["train_rows"] == 1920 and recs[0]["rows"] == 480
    else:
        assert recs[0]["train_rows"] + recs[0]["rows"] == 2400 and recs[0]["rows"] >= 480
    out = capsys.readouterr().out
    assert f"best valid AUC {aucs[best - 1]:.4f} at epoch {best}; test AUC of that model" in out
    # the test score is that of the best epoch's model, whatever came after it
    assert main(["train", "--config", str(tiny_config), "run.name=check", "train.eval_only=true",
                 "--resume", str(run / "checkpoints" / "best")]) == 0
    again = json.loads((tmp_path / "runs" / "check" / "eval.json").read_text())
    assert again["epoch"] == best and again["auc"] == pytest.approx(summary["test"]["auc"], abs=1e-12)
    # resuming a stopped run stops again at once, with the same selection
    assert main(args + ["--resume", "auto"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(recs)
    assert json.loads((run / "summary.json").read_text())["test"]["auc"] == pytest.approx(summary["test"]["auc"])


def _naive_ranking(scores, labels, groups, k):
    import math

    ndcg, recall = [], []
    for g in sorted(set(groups.tolist())):
        rows = [i for i in range(len(groups)) if groups[i] == g]
        positives = sum(labels[i] for i in rows)
        if not positives:
            continue
        ranked = sorted(rows, key=lambda i: (-scores[i], i))[:k]
        dcg = sum(labels[i] / math.log2(r + 2) for r, i in enumerate(ranked))
        ideal = sum(1 / math.log2(r + 2) for r in range(min(int(positives), k)))
        ndcg.append(dcg / ideal)
        recall.append(sum(labels[i] for i in ranked) / positives)
    return sum(ndcg) / len(ndcg), sum(recall) / len(recall)


def test_ranking_metrics_equal_a_per_group_reference():
    import numpy as np

    from wdl.train.evaluate import ranking_metrics

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, 500)
    labels = (rng.random(500) < 0.3).astype(np.float64)
    scores = np.round(rng.random(500), 2)  # ties
    for k in (1, 3, 10):
        m = ranking_metrics(scores, labels, groups, k)
        ndcg, recall = _naive_ranking(scores, labels, groups, k)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12) and m[f"recall@{k}"] == pytest.approx(recall, abs=1e-12)


def test_ranking_metrics_in_a_run(tiny_config, tmp_path):
    assert main(["train", "--config", str(tiny_config), "run.name=rank", "train.epochs=1",
                 "train.ranking_group=user_id", "train.ranking_k=5"]) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "runs" / "rank" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rec["ndcg@5"] <= 1 and 0 < rec["recall@5"] <= 1
    with pytest.raises(ConfigError, match="must be a categorical column the model reads"):
        load_config(tiny_config, ["train.ranking_group=release_year"])
