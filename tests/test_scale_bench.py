"""The `scale` benchmark (benchmarks/scripts/scale.py) at a tiny size: a planted Criteo-shaped set
of 20k rows streamed once by 2 torchrun processes, the last rank SIGKILLed from outside half-way,
resumed with --resume auto, and every train row counted once across the kill."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from benchmarks.scripts.scale_report import count_rows, expected_rows
from helpers import side_by_side
from wdl.ingest.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
HASHED = ["C3", "C4", "C10", "C12", "C16", "C21", "C24", "C26"]  # 131072 buckets in the config: small here
TINY = ["sample_seconds=0.5", "data.batch_size=256", "train.log_every_steps=2", "train.eval_every_steps=10",
        "train.eval_max_rows=1000", "checkpoint.every_steps=6", *[f"features.columns.{c}.hash_buckets=1024" for c in HASHED]]


def scale(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "benchmarks.scripts.scale", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_killed_and_resumed_pass_reads_every_row_once(tmp_path):
    data = tmp_path / "data"
    # row groups of 512 rows: the 2k-row valid split must feed both ranks
    generate("criteo", 20_000, data, valid_fraction=0.1, test_fraction=0.1, seed=2021, row_group_rows=512,
             progress=False)
    out = tmp_path / "out"
    proc = scale("--out", str(out), f"data.path={data}", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    first, second = r["attempts"]
    assert first["exit"] != 0 and first["killed"]["signal"] == "SIGKILL" and first["killed"]["rank"] == 1
    assert second["exit"] == 0 and "--resume" in second["command"]

    rows, train = r["rows"], json.loads((data / "manifest.json").read_text())["splits"]["train"]["rows"]
    assert rows["each_row_once"] and rows["rows_counted"] == rows["epoch_record_train_rows"] == train
    assert rows["steps_per_epoch"] == rows["last_step"] == 32  # ceil(8024 rows per rank / 256)
    # resumed from the newest checkpoint at or before the kill; the steps after it were trained again
    assert rows["resumed_at_step"] % 6 == 0 and 0 < rows["resumed_at_step"] <= rows["killed_after_step"]
    assert rows["intervals_as_partitioned"] == rows["intervals"] == 16
    assert rows["attempt_1_rows_kept"] + rows["attempt_2_rows"] == train

    # RSS of both ranks in both attempts, AUC evaluations, the three plots and the report
    assert {(s["attempt"], s["rank"]) for s in r["rss"]} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    # (a sample right after a rank's exec may read a few MB: the largest of each is a trainer's)
    assert all(max(s["rss_mb"] for s in r["rss"] if (s["attempt"], s["rank"]) == k) > 100 for k in [(1, 0), (2, 1)])
    evals = [x for a in r["attempts"] for x in a["records"] if x.get("kind") == "eval"]
    assert evals and all(0.5 < e["auc"] < r["manifest"]["bayes_optimal_auc"] for e in evals)
    assert {"rows_per_second_vs_time.png", "rss_vs_time.png", "auc_vs_step.png"} <= {p.name for p in out.iterdir()}
    assert "Each train row read once: **yes**" in (out / "report.md").read_text()
    assert (out / "results.csv").read_text().count("\nrss,") == len(r["rss"])

    # The same records as if the resume had skipped, or repeated, one step's rows (2 x 256): the count says so
    for shift in (-512, 512):
        changed = copy.deepcopy(r)
        for rec in changed["attempts"][1]["records"]:
            if rec.get("kind") == "step":
                rec["rows_seen"] += shift
        assert not count_rows(changed, 256, 2)["each_row_once"]
    assert count_rows(copy.deepcopy(r), 256, 2)["each_row_once"]


def test_loader_partition_counts():
    # 10 rows over 2 parts of 5, batches of 2: per part 2, 2, 1 rows
    assert expected_rows(10, 2, 2, 0, 3) == 10
    assert expected_rows(10, 2, 2, 1, 2) == 4 and expected_rows(10, 2, 2, 2, 3) == 2


def test_bad_input_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    items = ("kill_at=1.5", "world_size=1")

    def through_bench(item: str) -> subprocess.CompletedProcess:  # through `wdl bench run` as well
        return subprocess.run([sys.executable, "-m", "benchmarks", "run", "scale", "--out", str(tmp_path / "o"), item],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    # three refusals, independent of each other: at once
    proc, *refused = side_by_side(lambda: scale("--out", str(tmp_path / "out"), f"data.path={tmp_path / 'none'}", timeout=60),
                                  *(partial(through_bench, item) for item in items))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no data set at" in proc.stderr
    assert not (tmp_path / "out").exists()
    for item, proc in zip(items, refused):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: suite 'scale': {item.split('=')[0]}=")
