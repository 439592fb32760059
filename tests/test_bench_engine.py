"""The engine benchmarks: hardware-floor arithmetic on a hand-made batch, the machine micro-
benchmarks, the bare MLP floor, the new suite axes (backends x table rows, memory skips), and the
report sections they feed. CPU, tiny, real; the CUDA launch counter runs where a GPU is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import floors
from benchmarks.report import _mlp_floor, _peers, _planted, _scaling, render, table_rows_ratios
from benchmarks.results import summarise
from benchmarks.run import run_suite
from benchmarks.throughput import axes, estimate_table_bytes
from benchmarks.suite import load_suite
from wdl.config import OptimizerConfig, load_config
from wdl.data.batch import Batch, Jagged
from wdl.model.wide_deep import WideDeep
from wdl.data.tables import state_bytes

SIZES = {"user_id": 51, "movie_id": 81, "gender": 3, "genres": 7, "gender_movie": 500, "gender_genres": 50}


def _jag(values: list[int], lengths: list[int] | None = None) -> Jagged:
    lengths = lengths or [1] * len(values)
    return Jagged(torch.tensor(values), torch.tensor(lengths, dtype=torch.int32), single=set(lengths) == {1})


def _batch() -> Batch:
    """4 rows; distinct ids per feature: user 3, movie 2, gender 2, genres 3, gender_movie 3, gender_genres 3."""
    g = [2, 0, 1, 1]
    return Batch(dense=torch.zeros(4, 1), labels=torch.zeros(4), sparse={
        "user_id": _jag([1, 1, 2, 3]), "movie_id": _jag([5, 5, 5, 6]), "gender": _jag([1, 2, 1, 2]),
        "genres": _jag([1, 2, 2, 3], g), "gender_movie": _jag([10, 11, 10, 12]), "gender_genres": _jag([4, 5, 4, 6], g)})


def test_state_tensors_agree_with_the_optimisers():
    expected = {"ftrl": lambda d: [4 * d, 4 * d], "adagrad": lambda d: [4 * d], "rowwise_adagrad": lambda d: [4],
                "adam": lambda d: [4 * d, 4 * d], "sgd": lambda d: []}
    for name, sizes in expected.items():
        for dim in (1, 4, 16):
            assert floors.state_tensor_bytes(name, dim) == sizes(dim)
            assert state_bytes(OptimizerConfig(name=name), dim) == sum(sizes(dim))


def test_hardware_floor_arithmetic(tiny_config):
    cfg = load_config(tiny_config)  # wide: ftrl; deep: adam; deep dims user/movie 8, genres 4; MLP 21-32-16-1
    model = WideDeep(cfg.model, SIZES, 1, device=torch.device("cpu"))
    groups = floors.table_groups(model, cfg.optim)
    assert [(g["part"], g["dim"], g["optimizer"]) for g in groups] == [("wide", 1, "ftrl"), ("deep", 8, "adam"),
                                                                       ("deep", 4, "adam")]
    assert groups[0]["offsets"][:3] == [0, 51, 132]  # features of a fused table at their row offsets
    t = floors.embedding_traffic(_batch(), groups, 64)
    # A touched row: weight read + write, each state tensor read + write, each a 64-byte line at least.
    # wide: 16 distinct ids + the bias row, 24 ids: 17 x (2 x 64 + 2 x 2 x 64) + 8 x 24
    # deep d8: 5 distinct, 8 ids: 5 x (2 x 64 + 2 x 2 x 64) + 64; deep d4 (genres): 3 distinct, 4 ids
    assert [(d["distinct"], d["ids"], d["bytes"]) for d in t["groups"]] == [(17, 24, 6720), (5, 8, 1984), (3, 4, 1184)]
    assert t["bytes"] == 6720 + 1984 + 1184
    # With 32-byte sectors (CUDA) a d8 row (32 bytes) is one sector: 5 x (2 x 32 + 4 x 32) + 64
    assert floors.embedding_traffic(_batch(), groups, 32)["groups"][1]["bytes"] == 5 * 192 + 64

    assert floors.mlp_linear_sizes(model) == [(21, 32), (32, 16), (16, 1)]
    assert floors.mlp_flops([(21, 32), (32, 16), (16, 1)], 4) == 6 * 4 * 1200
    hw = {"memory_bandwidth_gbs": 1.0, "peak_gflops": 2.0}
    f = floors.hardware_floor(model, cfg.optim, [_batch(), _batch()], torch.device("cpu"), hw)
    params = 21 * 32 + 32 + 32 * 16 + 16 + 16  # the last layer has no bias
    other = 4 * 4 + 4 * 4 + 4 * params * (6 + 2 * 2)  # dense, labels, Adam-trained MLP
    assert f["embedding_bytes_per_step"] == 9888 and f["other_bytes_per_step"] == other
    assert f["memory_seconds"] == pytest.approx((9888 + other) / 1e9)
    assert f["compute_seconds"] == pytest.approx(6 * 4 * 1200 / 2e9)
    assert f["samples_per_second"] == pytest.approx(4 / (f["memory_seconds"] + f["compute_seconds"]))
    assert f["distinct_rows_per_step"] == {"wide_d1": 17, "deep_d8": 5, "deep_d4": 3}


def test_machine_micro_benchmarks_and_mlp_floor_run():
    hw = floors.machine(torch.device("cpu"), copy_mib=4, matmul_n=64, reps=1)
    assert hw["memory_bandwidth_gbs"] > 0 and hw["peak_gflops"] > 0 and hw["granule_bytes"] == 64
    recs = floors.mlp_floor(input_dim=80, hidden=[16, 8], batch_size=32, steps=2, epochs=2, device=torch.device("cpu"))
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(r["train_seconds"] > 0 and r["samples_per_second"] > 0 and r["steps"] == 2 for r in recs)


def test_suites_with_the_new_axes_parse():
    s = load_suite("throughput")
    ts = next(x for x in s["systems"] if x["name"] == "table-size")
    assert ts["table_rows"] == [131072, 4194304, 20971520] and ts["backends"] == ["torch", "torchrec"]
    points = axes(ts)
    assert len(points) == 6
    parts, over, fields = points[1]  # torch, 4M rows
    assert parts == ["torch", "r4194304"] and fields["table_rows"] == 4194304
    assert "model.embedding_backend=torch" in over and "data.batch_size=1024" in over
    assert {f"features.columns.{c}.hash_buckets=4194304" for c in ("C3", "C4", "C12", "C16", "C21")} <= set(over)
    load_config("configs/synthetic-criteo-full.yaml", over)  # the overrides are valid config keys

    s = load_suite("throughput", ["systems.0.enabled=false", "systems.1.backends=[torch]", "systems.1.table_rows=[4194304]"])
    assert s["systems"][0]["enabled"] is False and len(axes(s["systems"][1])) == 1

    f = load_suite("movielens-floor", ["threads=2"])
    floors_ = [x for x in f["systems"] if x["kind"] == "mlp_floor"]
    assert len(floors_) == 2 and all(x["input_dim"] == 80 and x["steps"] == 79 and x["batch_size"] == 1024
                                     and x["hidden"] == [256, 128, 64] for x in floors_)
    assert f["threads"] == 2 and any(x["kind"] == "wdl" for x in f["systems"])
    assert {x["batch_size"] for x in load_suite("ml1m-sized")["systems"]} == {8192, 1024}


def _hashed_config(tmp_path: Path, tiny_config: Path) -> Path:
    """The tiny config with movie_id hashed, so its table size is an axis."""
    text = tiny_config.read_text().replace("movie_id: {kind: categorical, vocab_size: auto}",
                                           "movie_id: {kind: categorical, hash_buckets: 100}")
    path = tmp_path / "hashed.yaml"
    path.write_text(text)
    return path


def test_table_size_axis_runs_and_skips_what_does_not_fit(tmp_path, tiny_config, tiny_data):
    config = _hashed_config(tmp_path, tiny_config)
    cfg = load_config(config, ["features.columns.movie_id.hash_buckets=4096"])
    small = estimate_table_bytes(load_config(config), "torch")
    # 3996 more rows of movie_id: wide (4 + 8 FTRL + 4 scratch) + deep d8 (32 + 64 Adam + 4 scratch)
    assert estimate_table_bytes(cfg, "torch") - small == 3996 * (16 + 100)

    axis = {"name": "table-size", "kind": "throughput", "backends": ["torch"], "table_rows": [128, 4096],
            "large_columns": ["movie_id"], "batch_sizes": [64], "warmup_steps": 1, "steps": 3,
            "overrides": ["data.in_memory=false"]}
    suite = {"name": "tiny-axes", "config": str(config), "data": {"path": str(tiny_data)}, "systems": [
        axis, {**axis, "name": "too-big", "table_rows": [10**6], "memory_fraction": 1e-9},
        {"name": "floor", "kind": "mlp_floor", "input_dim": 8, "hidden": [8], "batch_size": 16, "steps": 2, "epochs": 2},
        {"name": "off", "kind": "wdl", "enabled": False}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    result = run_suite(load_suite(str(path), ["threads=1"]), out)
    s = result["summary"]
    for g in ("ours", "compute_floor", "hardware_floor"):
        for rows in (128, 4096):
            v = s[f"{g}@torch-r{rows}-bs64"]
            assert v["samples_per_second"]["mean"] > 0 and v["table_rows"] == rows and v["backend"] == "torch"
    ours = [m for m in result["measurements"] if m["group"] == "ours"]
    assert all(m["kernels_per_step"] is None and m["syncs_per_step"] is None for m in ours)  # CPU: not counted
    hard = [m for m in result["measurements"] if m["group"] == "hardware_floor"]
    assert all(m["embedding_bytes_per_step"] > 0 and m["flops_per_step"] > 0 for m in hard)
    assert result["hardware"]["memory_bandwidth_gbs"] > 0
    reasons = {x["system"]: x["reason"] for x in result["skipped"]}
    assert "memory_fraction" in reasons["too-big@torch-r1000000-bs64"] and "disabled" in reasons["off"]
    ratios = table_rows_ratios(s)
    assert [r["table_rows"] for r in ratios] == [128, 4096] and ratios[0]["ours_ratio"] == 1.0
    report = (out / "report.md").read_text()
    assert "Vocabulary scaling" in report and "hardware floor" in report and "skipped too-big" in report
    assert json.loads((out / "results.json").read_text())["skipped"]
    assert (out / "samples_vs_table_rows.png").read_bytes()[:4] == b"\x89PNG"


def test_report_ratio_to_the_mlp_floor():
    ms = [{"system": name, "group": name, "kind": kind, "rep": 0, "epoch": e, "warmup": e == 1,
           "train_seconds": t, **({"auc": a} if a else {})}
          for name, kind, rows in (("floor", "mlp_floor", [(1, 9.0, None), (2, 1.0, None), (3, 1.0, None)]),
                                   ("wdl", "wdl", [(1, 9.0, 0.70), (2, 1.3, 0.79), (3, 1.3, 0.78)]))
          for e, t, a in rows]
    lines = _mlp_floor(summarise(ms))
    row = next(x for x in lines if x.startswith("| wdl"))
    assert "| 1.30 |" in row and "0.79" in row  # ours / floor = 1.3, best AUC 0.79
    assert render({"suite": "x", "started": "", "finished": "", "command": "", "suite_config": {}, "summary": summarise(ms),
                   "measurements": ms, "machine": {"kind": "k", "cpu_model": "c", "cpu_cores": 2, "gpus": [],
                                                   "torch": "t", "python": "p"}}).count("bare MLP floor") >= 1


def _epochs(system: str, kind: str, aucs: list[float], selected: int | None = None, test_auc: float = 0.0,
            **extra) -> list[dict]:
    """One repetition's records; with `selected`, scored on validation and that epoch's model on test."""
    return [{"system": system, "group": system, "kind": kind, "rep": 0, "epoch": e, "warmup": e == 1, "auc": a,
             "logloss": 0.6, "train_seconds": 1.0, **extra,
             **({} if selected is None else {"eval_split": "valid"}),
             **({"selected": True, "test_auc": test_auc, "test_logloss": 0.55} if e == selected else {})}
            for e, a in enumerate(aucs, 1)]


def test_sections_report_the_test_auc_of_the_validation_selected_epoch():
    ms = (_epochs("wide", "planted", [0.70, 0.76, 0.74], selected=2, test_auc=0.73, bayes_auc=0.8)
          + _epochs("deep", "planted", [0.60, 0.65], bayes_auc=0.8))
    s = summarise(ms)
    assert s["wide"]["protocol"] == "validation" and s["wide"]["selected_epoch"] == [2]
    assert s["wide"]["valid_auc"]["mean"] == 0.76 and s["wide"]["test_auc"]["mean"] == 0.73
    assert s["wide"]["test_logloss"]["mean"] == 0.55 and "auc" not in s["wide"] and "best_auc" not in s["wide"]
    assert s["deep"]["auc"]["mean"] == 0.65 and s["deep"]["best_auc"] == 0.65 and "protocol" not in s["deep"]

    mixed = _planted({"summary": s, "measurements": ms})
    assert "| model | final AUC; * test AUC, epoch chosen on valid | gap to Bayes |" in mixed
    assert "| wide | 0.73 * | 0.07 |" in mixed and "| deep | 0.65 | 0.15 |" in mixed
    only = _planted({"summary": {"wide": s["wide"]}, "measurements": ms})
    assert "| model | test AUC (epoch chosen on valid) | gap to Bayes |" in only and "| wide | 0.73 | 0.07 |" in only

    ws = [m for w in (1, 2) for m in _epochs(f"strong@ws{w}", "wdl", [0.7, 0.75], selected=2, test_auc=0.7 + w / 100,
                                                 world_size=w, samples_per_second=1000.0 * w)]
    for m in ws:
        m["group"] = "strong"
    lines = _scaling(summarise(ws), [])
    assert any("| efficiency | test AUC (epoch chosen on valid) |" in x for x in lines)
    assert any(x.startswith("| 2 |") and "| 0.72 |" in x for x in lines)


def test_floor_and_peer_tables_say_when_ours_held_out_a_validation_split():
    floor = [{"system": "floor", "group": "floor", "kind": "mlp_floor", "rep": 0, "epoch": e, "warmup": e == 1,
              "train_seconds": 1.0, "steps": 79, "batch_size": 1024} for e in (1, 2)]
    whole = _epochs("wdl", "wdl", [0.7, 0.75], train_rows=80000, steps=79)
    held = _epochs("wdl", "wdl", [0.7, 0.76], selected=2, test_auc=0.74, train_rows=72000, steps=71)
    assert not [x for x in _mlp_floor(summarise(floor + whole)) if "like with like" in x]
    (note,) = [x for x in _mlp_floor(summarise(floor + held)) if "like with like" in x]
    assert "71 steps (72000 rows, a validation split held out), the floor's 79 steps" in note

    lr = [{"system": "lr", "group": "lr", "kind": "sklearn_lr", "rep": 0, "epoch": 1, "warmup": False, "auc": 0.72,
           "train_seconds": 2.0}]
    lines = _peers({"summary": summarise(held + lr)})
    assert any(x.startswith("| wdl | lr |") and "| +0.0200 * |" in x for x in lines)  # 0.74 on test - 0.72
    assert any(x.startswith("* ours chose its epoch on a validation split") for x in lines)
    assert not any("*" in x for x in _peers({"summary": summarise(whole + lr)}) if x.startswith("| wdl"))


def test_results_json_is_written_once(tmp_path, monkeypatch):
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({"name": "ref", "config": "configs/movielens-100k.yaml", "systems": [
        {"name": "published", "kind": "reference", "records": [{"epoch": 1, "auc": 0.6}, {"epoch": 2, "auc": 0.7}]}]}))
    written, write_text = [], Path.write_text

    def spy(self, *args, **kwargs):
        written.append(self.name)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", spy)
    result = run_suite(load_suite(str(path)), tmp_path / "out")
    assert written.count("results.json") == 1 and written.count("report.md") == 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["plots"] == result["plots"] == ["auc_vs_epoch.png"] and saved["notes"] == result["notes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_launches_are_counted():
    lin = torch.nn.Linear(64, 64, device="cuda")
    x = [torch.randn(32, 64, device="cuda") for _ in range(3)]

    def step(b):
        lin(b).sum().backward()
        _ = lin.weight.grad.sum().item()  # one host sync per step

    c = floors.cuda_launches(step, x, steps=3)
    assert c["kernels_per_step"] >= 3 and c["syncs_per_step"] >= 1
