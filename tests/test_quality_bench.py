"""benchmarks/scripts/quality.py on a tiny data set whose test split is the valid rows with every
label flipped: test AUC = 1 - valid AUC at every epoch, so the epoch that test would pick is the
one valid rejects, and a report that took its number from the wrong epoch is caught."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pytest
import yaml

from benchmarks.scripts.quality import main
from helpers import one_line_error, write_tiny_config
from wdl.cli import main as wdl_main
from wdl.data.column_stats import column_stats
from wdl.data.writer import DatasetWriter


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """2400 train rows, 600 valid rows and the same 600 rows as test, labels flipped."""
    out = tmp_path_factory.mktemp("quality") / "flipped"
    rng = np.random.default_rng(5)
    rows = 3000
    u, i = rng.integers(1, 41, rows), rng.integers(1, 61, rows)
    bias_u, bias_i = rng.normal(0, 1.5, 41), rng.normal(0, 1.5, 61)
    label = (rng.random(rows) < 1 / (1 + np.exp(-(bias_u[u] + bias_i[i])))).astype(np.int8)
    year = (1950 + i % 50).astype(np.float32)
    genres = [sorted(set(rng.integers(1, 6, 2).tolist())) for _ in range(rows)]

    def table(sl: slice, y: np.ndarray) -> pa.Table:
        return pa.table({"user_id": pa.array(u[sl], pa.int64()), "movie_id": pa.array(i[sl], pa.int64()),
                         "gender": pa.array(u[sl] % 2 + 1, pa.int64()),
                         "genres": pa.array(genres[sl], pa.list_(pa.int64())),
                         "release_year": pa.array(year[sl], pa.float32()), "label": pa.array(y, pa.int8())})

    valid = slice(2400, rows)
    with DatasetWriter(out, name="flipped", row_group_rows=256) as w:
        w.write("train", table(slice(0, 2400), label[:2400]))
        w.write("valid", table(valid, label[valid]))
        w.write("test", table(valid, (1 - label[valid]).astype(np.int8)))
        w.commit(source={"kind": "tiny"}, label="label",
                 columns={"user_id": {"kind": "categorical", "vocab_size": 41},
                          "movie_id": {"kind": "categorical", "vocab_size": 61},
                          "gender": {"kind": "categorical", "vocab_size": 3},
                          "genres": {"kind": "multi_hot", "vocab_size": 6},
                          "release_year": {"kind": "dense", **column_stats(year[:2400])}},
                 split={"kind": "head", "train_rows": 2400})
    return out


def ablation(tmp_path, data, **extra) -> str:
    config = write_tiny_config(tmp_path, data)
    spec = {"config": str(config), "data": {"path": str(data)}, "run_overrides": ["data.valid_split=valid"],
            "variants": {"base": [], "slow": ["optim.deep.lr=0.002"]}, "seeds": [3], "epochs": 2,
            "curve_rows": 1000, "references": {"lr_baseline": 0.6, "ceiling": 0.8}, **extra}
    path = tmp_path / "quality-tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_curves_and_the_validation_selected_test_auc(tmp_path, flipped, capsys):
    out = tmp_path / "out"
    assert main([ablation(tmp_path, flipped), "--out", str(out), "curve_rows=1000"]) == 0  # key=value after options
    err = capsys.readouterr().err
    assert err.count("epoch 1/2: valid AUC") == 2 and err.count("selected epoch") == 2  # progress per epoch and run

    r = json.loads((out / "results.json").read_text())
    assert [(x["variant"], x["seed"]) for x in r["runs"]] == [("base", 3), ("slow", 3)]
    for run in r["runs"]:
        epochs = run["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        for e in epochs:
            assert all(0 < e[f"{s}_{m}"] for s in ("train", "valid", "test") for m in ("auc", "logloss"))
            assert e["test_auc"] == pytest.approx(1 - e["valid_auc"], abs=1e-9)  # the flipped copy
        assert epochs[0]["valid_auc"] != epochs[1]["valid_auc"]
        best = max(epochs, key=lambda e: e["valid_auc"])
        assert run["selected_epoch"] == best["epoch"] and run["valid_auc"] == best["valid_auc"]
        # the reported number: the trainer's single test score of `best`, equal to the curve's there ...
        summary = json.loads((out / run["run"] / "summary.json").read_text())
        assert run["test_auc"] == summary["test"]["auc"] == pytest.approx(best["test_auc"], abs=1e-9)
        # ... and not the epoch test would have chosen
        assert run["test_auc"] < max(e["test_auc"] for e in epochs)
        assert not (out / run["run"] / "checkpoints").exists()

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and sum(row["selected"] == "True" for row in rows) == 2
    report = (out / "report.md").read_text()
    assert "| base |" in report and "gap to ceiling closed" in report and "![auc_vs_epoch.png]" in report
    assert (out / "auc_vs_epoch.png").stat().st_size > 1000 and (out / "logloss_vs_epoch.png").exists()
    s = {x["variant"]: x for x in r["summary"]}
    assert s["slow"]["test_auc_vs_first"] == pytest.approx(s["slow"]["test_auc"] - s["base"]["test_auc"])
    assert s["base"]["gap_closed_ceiling"] == pytest.approx((s["base"]["test_auc"] - 0.6) / 0.2)

    # Scoring the curves changes nothing: plain `wdl train` with the same overrides, the same valid AUCs
    base = r["runs"][0]
    overrides = r["run_overrides"] + [
        f"data.path={flipped}", "train.epochs=2", "run.seed=3", "train.threads=1", f"run.out_dir={tmp_path / 'plain'}"]
    assert wdl_main(["train", "--config", str(tmp_path / "tiny.yaml"), *overrides]) == 0
    plain = [json.loads(line) for line in (tmp_path / "plain" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [p["auc"] for p in plain if p.get("kind") == "epoch"] == [e["valid_auc"] for e in base["epochs"]]

    # a second call reuses the finished runs; --only picks variants (a key=value after it is an override)
    assert main([ablation(tmp_path, flipped), "--out", str(out), "--only", "slow", "epochs=2"]) == 0
    assert "slow seed 3: reusing" in capsys.readouterr().err
    assert [x["variant"] for x in json.loads((out / "results.json").read_text())["runs"]] == ["slow"]


def test_refuses_an_ablation_without_a_validation_split(tmp_path, flipped, capsys):
    assert main([ablation(tmp_path, flipped, run_overrides=[]), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys.readouterr().err, "no validation split to select on")
    assert main([ablation(tmp_path, flipped), "--only", "nope"]) == 2
    one_line_error(capsys.readouterr().err, "--only nope: no such variant")


def test_a_refit_variant_reports_the_refit_test_auc(tmp_path, flipped, capsys):
    """train.refit in a variant: the run is refitted as `wdl train` refits it, its test AUC in a column of its own."""
    out = tmp_path / "out"
    suite = ablation(tmp_path, flipped, run_overrides=["data.valid_fraction=0.2"], variants={"refit": ["train.refit=true"]})
    assert main([suite, "--out", str(out)]) == 0
    run, = json.loads((out / "results.json").read_text())["runs"]
    summary = json.loads((out / run["run"] / "summary.json").read_text())
    assert run["refit_test_auc"] == summary["refit"]["test"]["auc"] and summary["refit"]["epochs"] == run["selected_epoch"]
    assert run["test_auc"] == summary["test"]["auc"] != run["refit_test_auc"]
    assert not (out / run["run"] / "refit" / "checkpoints").exists()
    report = (out / "report.md").read_text()
    assert "refit test AUC |" in report and f"| {run['refit_test_auc']:.4f} |" in report
