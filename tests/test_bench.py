"""The benchmark harness on the tiny data set: a short suite writes valid results.json, CSV,
report and plots; `compare` flags a planted regression and nothing on identical results."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml

from benchmarks.cli import main as bench_main
from benchmarks.results import compare, format_compare, summarise
from benchmarks.suite import list_suites, load_suite


def _tiny_suite(tmp_path: Path, tiny_config: Path, tiny_data: Path) -> Path:
    suite = {
        "name": "tiny",
        "description": "the harness on the tiny data set",
        "config": str(tiny_config),
        "data": {"path": str(tiny_data)},
        "epochs": 3,
        "warmup_epochs": 1,
        "repetitions": 2,
        "systems": [
            {"name": "wdl", "kind": "wdl"},
            {"name": "sklearn lr", "kind": "sklearn_lr"},
            {"name": "published", "kind": "reference", "note": "made-up numbers",
             "records": [{"epoch": 1, "auc": 0.6, "train_seconds": 9.0}]},
            {"name": "throughput", "kind": "throughput", "batch_sizes": [64, 128], "warmup_steps": 2, "steps": 5,
             "reader_rows": 1000, "overrides": ["data.in_memory=false"]},
        ],
    }
    path = tmp_path / "tiny-suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("bench")
    from conftest import TINY_CONFIG

    config = tmp / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(path=config, runs=tmp / "runs", data=tiny_data))
    out = tmp / "out"
    rc = bench_main(["run", str(_tiny_suite(tmp, config, tiny_data)), "--out", str(out), "repetitions=1"])
    assert rc == 0
    return out


def test_suite_writes_results_csv_report_and_plots(tiny_result):
    out = tiny_result
    result = json.loads((out / "results.json").read_text())
    m = result["machine"]
    for key in ("kind", "cpu_model", "cpu_cores", "gpus", "torch", "torchrec", "git"):
        assert key in m
    assert result["suite_config"]["repetitions"] == 1  # the command-line override took effect
    ours = [r for r in result["measurements"] if r["system"] == "wdl"]
    assert [r["epoch"] for r in ours] == [1, 2, 3]
    assert [r["warmup"] for r in ours] == [True, False, False]
    assert all(0.0 <= r["auc"] <= 1.0 and r["train_seconds"] > 0 and r["peak_rss_mb"] > 0 for r in ours)
    s = result["summary"]
    assert s["wdl"]["train_seconds"]["n"] == 1 and s["sklearn lr"]["auc"]["mean"] > 0.5
    assert s["ours@bs64"]["samples_per_second"]["mean"] > 0 and s["compute_floor@bs128"]["step_p90_ms"]["mean"] > 0
    assert s["reader"]["rows_per_second"]["mean"] > 0 and s["bare_pyarrow"]["rows_per_second"]["mean"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(result["measurements"]) and "train_seconds" in rows[0]
    report = (out / "report.md").read_text()
    assert "Ours vs the others" in report and "compute floor" in report and "bare pyarrow" in report
    for png in ("auc_vs_epoch.png", "seconds_per_epoch.png", "samples_vs_batch_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in result["plots"]


def test_compare_flags_a_planted_regression(tiny_result, tmp_path, capsys):
    a = json.loads((tiny_result / "results.json").read_text())
    rows, _ = compare(a, a)
    assert rows and not any(r["flag"] for r in rows)  # identical results: nothing flagged

    # Known timings (the tiny run's own are at the mercy of a shared machine): A has 2% noise.
    for r in a["measurements"]:
        if r["system"] == "wdl":
            r["train_seconds"] = {1: 5.0, 2: 1.0, 3: 1.02}[r["epoch"]]
            r["samples_per_second"] = 2400 / r["train_seconds"]
    a["summary"] = summarise(a["measurements"])

    def scaled(factor: float) -> dict:
        b = copy.deepcopy(a)
        for r in b["measurements"]:
            if r["system"] == "wdl":
                r["train_seconds"] *= factor
                r["samples_per_second"] /= factor
        b["summary"] = summarise(b["measurements"])
        return b

    rows, _ = compare(a, scaled(1.01))  # within the noise
    assert not any(r["flag"] for r in rows if r["system"] == "wdl")
    b = scaled(3.0)  # planted: three times slower
    rows, _ = compare(a, b)
    flagged = {(r["system"], r["metric"]) for r in rows if r["flag"] == "WORSE"}
    assert ("wdl", "train_seconds") in flagged and ("wdl", "samples_per_second") in flagged
    assert ("wdl", "auc") not in flagged
    assert "WORSE" in format_compare(rows, [])

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(a))
    assert bench_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--fail-on-regression"]) == 1
    assert "regression(s) beyond noise" in capsys.readouterr().out


def test_suites_parse_and_bad_input_is_one_line(capsys):
    names = {n for n, _ in list_suites()}
    assert {"movielens-100k", "peers-movielens-100k", "throughput", "scaling", "planted"} <= names
    for n in names:
        s = load_suite(n, ["epochs=2", "train.max_steps=3"])
        assert s["epochs"] == 2 and s["trainer_overrides"] == ["train.max_steps=3"]
    assert bench_main(["run", "no-such-suite"]) == 2
    assert "no benchmark suite" in capsys.readouterr().err


def test_tune_selects_on_validation_and_scores_test_once(tmp_path, tiny_config, tiny_data):
    from benchmarks.tune import trials

    grid = {"name": "t", "space": {"optim.deep.lr": [0.01, 0.1], "optim.wide.lr": [1, 2]}, "candidates": {"a": []}}
    assert trials(grid)[:2] == [("a,optim.deep.lr=0.01,optim.wide.lr=1", ["optim.deep.lr=0.01", "optim.wide.lr=1"]),
                                ("a,optim.deep.lr=0.01,optim.wide.lr=2", ["optim.deep.lr=0.01", "optim.wide.lr=2"])]
    picked = trials({**grid, "candidates": {"a": [], "b": ["x=1"]}, "search": "random", "trials": 2, "seed": 3})
    assert len(picked) == 4 and picked[2][1][0] == "x=1"  # every candidate at each sampled point
    assert picked == trials({**grid, "candidates": {"a": [], "b": ["x=1"]}, "search": "random", "trials": 2, "seed": 3})

    suite = {"name": "tiny-tune", "config": str(tiny_config), "data": {"path": str(tiny_data)}, "epochs": 2,
             "systems": [{"name": "tune", "kind": "tune", "valid_fraction": 0.2,
                          "overrides": ["model.deep.interaction_pairs=[[user_id, movie_id]]"],
                          "space": {"model.deep.interaction": ["none", "fm"]}}]}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert bench_main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    # none + pairs is refused by the config: skipped with its reason, not run
    assert [s["system"] for s in result["skipped"]] == ["tune: interaction=none"]
    trial, final = result["measurements"]
    assert trial["kind"] == "tune_trial" and 0 < trial["valid_auc"] <= 1 and "auc" not in trial
    assert final["kind"] == "tune" and final["trial"] == "interaction=fm" and 0 < final["auc"] <= 1
    assert final["test_split"] == "test" and final["valid_auc"] is not None
    assert "## Tuning" in (tmp_path / "out" / "report.md").read_text()
