"""The benchmark harness on the tiny data set: a short suite writes valid results.json, CSV,
report and plots; `compare` flags a planted regression and nothing on identical results; the
validation protocol reports the selected epoch's one test score; `wdl bench` loads the harness
from the source tree, which is not installed; the scripts measure what they say."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.cli import main as bench_main
from benchmarks.machine import ROOT
from benchmarks.results import compare, format_compare, summarise
from benchmarks.suite import KINDS, SuiteRun, list_suites, load_suite
from wdl.errors import ConfigError


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
            {"name": "wdl-valid", "kind": "wdl", "valid_fraction": 0.25},  # the validation protocol
            {"name": "sklearn lr", "kind": "sklearn_lr"},
            {"name": "published", "kind": "reference", "note": "made-up numbers",
             "records": [{"epoch": 1, "auc": 0.6, "train_seconds": 9.0}]},
            {"name": "throughput", "kind": "throughput", "batch_sizes": [64, 128], "warmup_steps": 2, "steps": 5,
             "reader_rows": 1000, "reader_workers": 2, "overrides": ["data.in_memory=false"]},
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


@pytest.mark.slow
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
    readers = {r["system"]: r for r in result["measurements"] if r.get("kind") == "reader"}
    assert s["reader x2 workers"]["rows_per_second"]["mean"] > 0  # the same rows, by 2 loader processes
    assert readers["reader x2 workers"]["rows"] == readers["reader"]["rows"] == readers["bare_pyarrow"]["rows"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(result["measurements"]) and "train_seconds" in rows[0]
    report = (out / "report.md").read_text()
    assert "Ours vs the others" in report and "compute floor" in report and "bare pyarrow" in report
    for png in ("auc_vs_epoch.png", "seconds_per_epoch.png", "samples_vs_batch_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in result["plots"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_validation_protocol_reports_the_selected_epoch_and_its_test_score(tiny_result):
    result = json.loads((tiny_result / "results.json").read_text())
    ours = [r for r in result["measurements"] if r["system"] == "wdl-valid"]
    assert [r["eval_split"] for r in ours] == ["valid"] * 3
    selected = [r for r in ours if r.get("selected")]
    run = json.loads((tiny_result / "runs" / "wdl-valid-r0" / "summary.json").read_text())
    assert len(selected) == 1 and selected[0]["epoch"] == run["best_epoch"] == run["test"]["epoch"]
    assert selected[0]["test_auc"] == run["test"]["auc"] and selected[0]["test_split"] == "test"
    s = result["summary"]["wdl-valid"]
    assert s["protocol"] == "validation" and s["selected_epoch"] == [run["best_epoch"]]
    assert s["test_auc"]["values"] == [run["test"]["auc"]] and s["valid_auc"]["values"] == [selected[0]["auc"]]
    assert not {"auc", "logloss", "best_auc"} & set(s)  # validation scores are never reported as test ones
    old = result["summary"]["wdl"]  # a run without validation: reported as before
    assert "protocol" not in old and "test_auc" not in old and old["best_auc"] >= old["auc"]["mean"]

    report = (tiny_result / "report.md").read_text()
    systems, selected_table = report.split("## Systems selected on validation")
    assert "| wdl |" in systems and "| wdl-valid" not in systems.split("## Systems")[1]
    row = next(line for line in selected_table.splitlines() if line.startswith("| wdl-valid"))
    assert f"| {run['best_epoch']} | {run['test']['auc']:.4g} |" in row

    # compare never sets a validation-selected test AUC against a last-epoch one
    b = copy.deepcopy(result)
    b["summary"]["wdl"] = b["summary"]["wdl-valid"]
    rows, notes = compare(result, b)
    assert any(n.startswith("wdl: A chose its epoch on the test split, B on a validation split") for n in notes)
    assert not [r for r in rows if r["system"] == "wdl" and "auc" in r["metric"]]
    rows, _ = compare(b, b)
    assert {"test_auc", "test_logloss"} <= {r["metric"] for r in rows if r["system"] == "wdl-valid"}


def test_valid_fraction_setting(tmp_path, capsys):
    from benchmarks.runners import _protocol

    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"name": "v", "config": "configs/movielens-100k.yaml", "systems": [
        {"name": "wdl", "kind": "wdl"}, {"name": "floor", "kind": "mlp_floor"}, {"name": "t", "kind": "tune"}]}))
    suite = load_suite(str(path))
    assert [_protocol(SuiteRun(suite, tmp_path), s) for s in suite["systems"][:1]] == [[]]  # unset: the config decides
    suite = load_suite(str(path), ["valid_fraction=0.1", "systems.0.valid_fraction=0.2"])
    run = SuiteRun(suite, tmp_path)
    assert _protocol(run, suite["systems"][0]) == ["data.valid_fraction=0.2"]  # the system's own first
    assert _protocol(run, suite["systems"][2]) == ["data.valid_fraction=0.1"]  # else the suite's
    suite = load_suite(str(path), ["valid_fraction=0"])  # the whole train split, whatever the config holds out
    assert _protocol(SuiteRun(suite, tmp_path), suite["systems"][0]) == ["data.valid_fraction=0", "train.refit=false"]
    suite = load_suite(str(path), ["valid_fraction=0", "config=configs/example-import.yaml"])  # names data.valid_split
    assert _protocol(SuiteRun(suite, tmp_path), suite["systems"][0]) == [
        "data.valid_fraction=0", "data.valid_split=", "train.refit=false"]
    for items, why in ((["systems.1.valid_fraction=0.1"], "not to kind mlp_floor"),
                       (["valid_fraction=1.5"], "must be in [0, 1)"), (["valid_fraction=a"], "must be a number"),
                       (["systems.2.valid_fraction=0"], "a tune system always selects on validation")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_suite(str(path), items)
    # ours on fewer rows than a peer or scikit-learn in the same suite: refused for the whole suite
    assert bench_main(["run", "peers-movielens-100k", "valid_fraction=0.1"]) == 2
    err = capsys.readouterr().err
    assert "fewer rows" in err and err.count("\n") == 1
    load_suite("peers-movielens-100k", ["systems.0.valid_fraction=0.1"])  # one of ours, knowingly: allowed
    # ... and refused when the config (configs/movielens-100k.yaml holds out 10%) or an override holds them out
    beside = tmp_path / "beside.yaml"
    beside.write_text(yaml.safe_dump({"name": "b", "config": "configs/movielens-100k.yaml", "systems": [
        {"name": "wdl", "kind": "wdl"}, {"name": "lr", "kind": "sklearn_lr"}]}))
    for items in ([], ["valid_fraction=0", "data.valid_fraction=0.1"]):
        assert bench_main(["run", str(beside), *items]) == 2
        err = capsys.readouterr().err
        assert "'wdl' would hold out a validation split (data.valid_fraction=0.1" in err and err.count("\n") == 1
    load_suite(str(beside), ["valid_fraction=0"])
    load_suite(str(beside), ["systems.0.valid_fraction=0.1"])


def test_shipped_suites_train_on_the_rows_they_say():
    """With configs/movielens-100k.yaml holding out 10% for validation: the suites timed against
    stored results or peers train ours on every train row; the tune suites hold out 10% once."""
    from benchmarks.suite import protocol_overrides, system_config, valid_fraction
    from wdl.config import load_config

    assert load_config("configs/movielens-100k.yaml").data.valid_fraction == 0.1
    for name in ("movielens-100k", "movielens-floor", "peers-movielens-100k", "scaling", "planted", "ml1m-sized"):
        suite = load_suite(name)
        for s in (s for s in suite["systems"] if s["kind"] in ("wdl", "planted")):
            data = load_config(*system_config(suite, s, protocol_overrides(suite, s))).data
            assert (name, data.valid_fraction, data.valid_split) == (name, 0, "")
    for name in ("tuning-movielens-100k", "interactions-movielens-100k"):
        suite = load_suite(name)
        (s,) = suite["systems"]
        over = protocol_overrides(suite, s, valid_fraction({}, s))
        data = load_config(*system_config(suite, s, over)).data
        assert over == ["data.valid_fraction=0.1"] and (data.valid_fraction, data.valid_split) == (0.1, "")


@pytest.mark.slow
def test_protocol_is_read_from_the_run_not_the_suite(tmp_path, tiny_config, tiny_data, capsys):
    """The config holds out a validation split and the suite says nothing: reported as selected on
    validation. `valid_fraction: 0` trains on every train row and scores every epoch on test."""
    config = tmp_path / "holds-out.yaml"
    config.write_text(tiny_config.read_text().replace("in_memory: true}", "in_memory: true, valid_fraction: 0.25}"))
    suite = {"name": "tiny-protocol", "config": str(config), "data": {"path": str(tiny_data)}, "epochs": 2,
             "warmup_epochs": 1, "systems": [{"name": "wdl", "kind": "wdl"},
                                             {"name": "wdl-whole", "kind": "wdl", "valid_fraction": 0}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    assert bench_main(["run", str(path), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    ms, s = result["measurements"], result["summary"]

    held = [m for m in ms if m["system"] == "wdl"]  # 2400 train rows, 600 held out by the config
    run = json.loads((out / "runs" / "wdl-r0" / "summary.json").read_text())
    assert run["selected_on"] == "valid" and run["test"]["epoch"] == run["best_epoch"]
    assert [(m["eval_split"], m["protocol"], m["train_rows"]) for m in held] == [("valid", "validation", 1800)] * 2
    (sel,) = [m for m in held if m.get("selected")]
    assert sel["epoch"] == run["best_epoch"] and sel["test_auc"] == run["test"]["auc"]
    assert s["wdl"]["protocol"] == "validation" and s["wdl"]["test_auc"]["values"] == [run["test"]["auc"]]
    assert s["wdl"]["valid_auc"]["values"] == [sel["auc"]] and s["wdl"]["train_rows"] == 1800
    assert not {"auc", "logloss", "best_auc"} & set(s["wdl"])

    whole = [m for m in ms if m["system"] == "wdl-whole"]
    assert [(m["eval_split"], m["protocol"], m["train_rows"]) for m in whole] == [("test", "test", 2400)] * 2
    assert "protocol" not in s["wdl-whole"] and s["wdl-whole"]["best_auc"] >= s["wdl-whole"]["auc"]["mean"]
    assert "data.valid_fraction=0 " in (out / "logs" / "wdl-whole-r0.log").read_text().splitlines()[0]
    assert "data.valid_fraction" not in (out / "logs" / "wdl-r0.log").read_text().splitlines()[0]

    report = (out / "report.md").read_text()
    systems, selected = report.split("## Systems selected on validation")
    assert "| wdl-whole |" in systems and "| wdl |" not in systems
    row = next(line for line in selected.splitlines() if line.startswith("| wdl |"))
    assert f"| {run['best_epoch']} | {run['test']['auc']:.4g} |" in row

    # compare: another protocol and other rows per epoch; neither AUCs nor seconds per epoch set side by side
    a, b = copy.deepcopy(result), copy.deepcopy(result)
    a["summary"]["x"], b["summary"]["x"] = s["wdl-whole"], s["wdl"]
    rows, notes = compare(a, b)
    assert any(n.startswith("x: A chose its epoch on the test split, B on a validation split") for n in notes)
    assert "x: an epoch of A trained on 2400 rows, of B on 1800: seconds per epoch not compared (samples/s is)" in notes
    assert {r["metric"] for r in rows if r["system"] == "x"} == {"samples_per_second", "peak_rss_mb"}


def test_suites_parse_and_bad_input_is_one_line(capsys):
    from benchmarks.run import SYSTEMS

    assert set(SYSTEMS) == set(KINDS)  # every kind a suite may name has its function
    names = {n for n, _ in list_suites()}
    assert {"movielens-100k", "peers-movielens-100k", "throughput", "scaling", "planted"} <= names
    for n in names:
        s = load_suite(n, ["epochs=2", "train.max_steps=3"])
        assert s["epochs"] == 2 and s["trainer_overrides"] == ["train.max_steps=3"]
    assert bench_main(["run", "no-such-suite"]) == 2
    assert "no benchmark suite" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_selects_on_validation_and_scores_test_once(tmp_path, tiny_config, tiny_data):
    from benchmarks.tune import trials

    grid = {"name": "t", "space": {"optim.deep.lr": [0.01, 0.1], "optim.wide.lr": [1, 2]}, "candidates": {"a": []}}
    assert trials(grid)[:2] == [("a,optim.deep.lr=0.01,optim.wide.lr=1", ["optim.deep.lr=0.01", "optim.wide.lr=1"]),
                                ("a,optim.deep.lr=0.01,optim.wide.lr=2", ["optim.deep.lr=0.01", "optim.wide.lr=2"])]
    picked = trials({**grid, "candidates": {"a": [], "b": ["x=1"]}, "search": "random", "trials": 2, "seed": 3})
    assert len(picked) == 4 and picked[2][1][0] == "x=1"  # every candidate at each sampled point
    assert picked == trials({**grid, "candidates": {"a": [], "b": ["x=1"]}, "search": "random", "trials": 2, "seed": 3})

    # The config holds out a validation split of its own: the tune system's share replaces it (1920 of
    # the 2400 train rows train), never holds out a second one (1440)
    config = tiny_config.parent / "holds-out.yaml"
    config.write_text(tiny_config.read_text().replace("in_memory: true}", "in_memory: true, valid_fraction: 0.25}"))
    suite = {"name": "tiny-tune", "config": str(config), "data": {"path": str(tiny_data)}, "epochs": 2,
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
    assert trial["train_rows"] == final["train_rows"] == 1920
    assert final["test_split"] == "test" and final["valid_auc"] is not None
    assert "## Tuning" in (tmp_path / "out" / "report.md").read_text()


def test_wdl_bench_loads_the_harness_from_the_source_tree(tmp_path, capsys):
    from wdl.cli import bench_main as wdl_bench, build_parser, main as wdl_main
    from wdl.cli import run_guarded

    assert wdl_main(["bench", "list"]) == 0 and "movielens-100k" in capsys.readouterr().out
    # options after `bench` belong to the harness
    assert wdl_main(["bench", "run", "no-such-suite", "--out", str(tmp_path / "o")]) == 2
    assert "no benchmark suite" in capsys.readouterr().err
    # wdl installed without its source tree: one line, exit 2
    assert run_guarded(wdl_bench, argparse.Namespace(bench_args=["list"]), tmp_path) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and err.count("\n") == 1
    # building wdl's parser (every command) imports nothing of the harness
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "benchmarks"}
    try:
        build_parser()
        assert not [k for k in sys.modules if k.split(".")[0] == "benchmarks"]
    finally:
        sys.modules.update(saved)


def test_only_the_wdl_package_is_installed():
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_namespace_packages(where=str(ROOT), include=find["include"],
                                                  exclude=find.get("exclude", ()))
    assert {"wdl", "wdl.train", "wdl.data"} <= set(packages)
    assert [p for p in packages if p.split(".")[0] != "wdl"] == []


def test_measure_counts_the_whole_process_tree():
    from benchmarks.scripts.measure import measure

    child = "import time; x = b'x' * (96 * 2**20); time.sleep(0.5)"  # 96 MiB, written, in a grandchild
    m = measure([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"])
    assert m["peak_rss_tree_sum_mb"] > 96 and m["peak_rss_largest_process_mb"] > 96 and m["seconds"] > 0.5
    with pytest.raises(SystemExit, match="command failed"):
        measure([sys.executable, "-c", "raise SystemExit(3)"])


def test_prepare_script_measures_wdl_data_prepare(tmp_path):
    from benchmarks.scripts import prepare_criteo
    from wdl.ingest import synthetic

    synthetic.generate("criteo", 2000, tmp_path / "work" / "criteo-tsv-2000", fmt="criteo-tsv", progress=False)
    args = ["--rows", "2000", "--workers", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert prepare_criteo.main(args) == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["machine"]["kind"] and r["machine"]["cpu_cores"] and r["command"].endswith(" ".join(args))
    (run,) = r["runs"]
    assert run["workers"] == 1 and run["rows_per_second"] > 0 and run["peak_rss_tree_sum_mb"] > 0
    assert (tmp_path / "work" / "prepared-2000-w1" / "manifest.json").is_file()


def test_results_json_holds_no_nan(tmp_path):
    """A strict JSON reader refuses NaN: an undefined AUC (a split of one class) is written as null, with why."""
    from benchmarks.results import write_results

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))

    write_results(tmp_path, {"summary": {"s": {"auc": {"mean": float("nan"), "std": float("inf")}}},
                             "measurements": [{"system": "s", "auc": float("nan")}]})
    got = strict((tmp_path / "results.json").read_text())
    assert got["measurements"][0]["auc"] is None and "every label" in got["measurements"][0]["auc_note"]
    assert got["summary"]["s"]["auc"] == {"mean": None, "std": None}


def test_an_unknown_suite_key_is_one_line():
    """`wdl bench run continual bogus=1` once ran the whole 8-minute suite, ignoring the key."""
    from benchmarks.suite import load_suite

    with pytest.raises(ConfigError, match="unknown suite key 'bogus'"):
        load_suite("continual", ["bogus=1"])
    assert load_suite("continual", ["days=3", "data.path=x"])["days"] == 3  # suite and trainer keys still go
