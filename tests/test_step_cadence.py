"""The step is the unit: step records, evaluations and model selection on step cadences, exact
resume between evaluations, and a diverged run stopped (in-process runs of `wdl train` on the
tiny data set; the kill runs the real command in a new process)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, one_line_error
from wdl.cli import main
from wdl.errors import TrainingError
from wdl.train.divergence import Divergence

# 1920 train rows after the 20% held out: 15 steps of 128 rows in the one epoch
CADENCE = ["train.epochs=1", "data.valid_fraction=0.2", "train.log_every_steps=5", "train.eval_every_steps=5"]
# what differs between attempts: time, memory, and what an epoch record says of a resume
TIMING = {"train_seconds", "eval_seconds", "samples_per_second", "peak_rss_mb", "peak_rss_mb_per_rank", "steps",
          "resumed_at_batch"}


def train(config, *args: str) -> int:
    return main(["train", "--config", str(config), *args])


def lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_step_and_eval_records_and_selection_within_one_epoch(tiny_config, tmp_path, capsys):
    assert train(tiny_config, "run.name=c", *CADENCE) == 0
    run = tmp_path / "runs" / "c"
    recs = lines(run)
    assert [(r["kind"], r["step"]) for r in recs] == [("step", 5), ("eval", 5), ("step", 10), ("eval", 10),
                                                     ("step", 15), ("eval", 15), ("epoch", 15)]
    steps, evals, (epoch,) = (recs[0::2][:3], recs[1::2][:3], recs[-1:])
    assert [r["rows_seen"] for r in steps] == [640, 1280, 1920] and all(r["epoch"] == 1 for r in recs)
    # the interval losses, summed on the device, are the epoch's loss in parts (equal rows each)
    assert epoch["train_loss"] == pytest.approx(sum(r["train_loss"] for r in steps) / 3, rel=1e-12)
    assert [e["train_loss_since_last_eval"] for e in evals] == pytest.approx([s["train_loss"] for s in steps])
    assert all(e["eval_split"] == "valid" and e["rows"] == 480 and 0.5 < e["auc"] < 1 for e in evals)
    # selection among the three evaluations: best holds that step's model, the test split scored once with it
    best = max(evals, key=lambda e: e["auc"])
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_step"], summary["best_auc"], summary["test"]["step"]) == (best["step"], best["auc"], best["step"])
    assert json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["step"] == best["step"]
    out = capsys.readouterr().out
    assert out.count("test AUC of that model") == 1
    assert train(tiny_config, "run.name=check", "train.eval_only=true", "--resume", str(run / "checkpoints" / "best")) == 0
    again = json.loads((tmp_path / "runs" / "check" / "eval.json").read_text())
    assert again["step"] == best["step"] and again["auc"] == pytest.approx(summary["test"]["auc"], abs=1e-12)


def test_eval_max_rows_scores_a_fixed_sample(tiny_config, tmp_path):
    assert train(tiny_config, "run.name=s", *CADENCE, "train.eval_max_rows=200", "data.eval_batch_size=100") == 0
    evals = [r for r in lines(tmp_path / "runs" / "s") if r["kind"] == "eval"]
    assert [e["rows"] for e in evals] == [200, 200, 200]
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert summary["test"]["rows"] == 600  # the final score reads the whole test split


def test_an_epoch_not_a_multiple_of_the_log_interval_ends_with_a_shorter_record(tiny_config, tmp_path):
    """15 steps an epoch, a record every 4: the epoch's last steps are in a record of their own,
    so the step records hold every row read."""
    assert train(tiny_config, "run.name=r", *CADENCE, "train.log_every_steps=4", "train.epochs=2") == 0
    steps = [r for r in lines(tmp_path / "runs" / "r") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [4, 8, 12, 15, 16, 20, 24, 28, 30]
    assert [r["rows_seen"] for r in steps][-1] == 2 * 1920 and steps[3]["rows_seen"] == 1920


# dropout draws from the RNG, the warm-up and plateau decay change the rates between evaluations
EXACT = [*CADENCE, "train.log_every_steps=4", "model.deep.dropout=0.3", "optim.schedule.warmup_steps=6",
         "optim.schedule.plateau_factor=0.5", "optim.schedule.plateau_patience=1", "train.epochs=2"]


@pytest.fixture
def uncut(tiny_config, tmp_path):
    assert train(tiny_config, "run.name=whole", *EXACT) == 0
    run = tmp_path / "runs" / "whole"
    return lines(run), json.loads((run / "summary.json").read_text())


def assert_same_run(run, uncut) -> None:
    recs, summary = lines(run), json.loads((run / "summary.json").read_text())
    want, got = untimed(uncut[0]), untimed(recs)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for a, b in zip(want, got):
        assert b.keys() == a.keys(), (a, b)
        for k in a:
            same = b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12) if isinstance(a[k], float) else b[k] == a[k]
            assert same, (k, a, b)
    assert (summary["best_step"], summary["test"]["step"]) == (uncut[1]["best_step"], uncut[1]["test"]["step"])
    assert summary["test"]["auc"] == pytest.approx(uncut[1]["test"]["auc"], abs=1e-12)


def test_a_run_stopped_between_evaluations_resumes_exactly(tiny_config, tmp_path, uncut):
    """Stopped at step 7 (mid log and eval intervals; its interim evaluation is dropped on resume)."""
    assert train(tiny_config, "run.name=cut", *EXACT, "checkpoint.every_steps=3", "train.max_steps=7") == 0
    cut = tmp_path / "runs" / "cut"
    assert [r.get("interim") for r in lines(cut) if r["kind"] == "eval"] == [None, True]
    assert train(tiny_config, "run.name=cut", *EXACT, "--resume", "auto") == 0
    assert_same_run(cut, uncut)


def test_a_run_killed_between_evaluations_resumes_exactly(tiny_config, tmp_path, uncut):
    """The real command, SIGKILLed after step 13 (WDL_TEST_KILL_AT_STEP), resumes from step 12."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WDL_TEST_KILL_AT_STEP": "13"}
    proc = subprocess.run([sys.executable, "-m", "wdl.cli", "train", "--config", str(tiny_config), "run.name=killed",
                           *EXACT, "checkpoint.every_steps=3"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert train(tiny_config, "run.name=killed", *EXACT, "checkpoint.every_steps=3", "--resume", "auto") == 0
    assert_same_run(tmp_path / "runs" / "killed", uncut)


@pytest.mark.parametrize("log_every", [0, 2])
def test_a_diverged_run_stops_with_one_line_and_keeps_no_best(tiny_config, tmp_path, capsys, log_every):
    """lr 1e6: the loss stays finite (about 1e25) and validation AUC near 0.5; it once ran to the end, exit 0."""
    capsys.readouterr()
    assert train(tiny_config, "run.name=div", "optim.deep.lr=1e6", "optim.wide.lr=1e6", "data.valid_fraction=0.2",
                 f"train.log_every_steps={log_every}", "train.eval_every_steps=4", "checkpoint.every_steps=3") == 2
    line = one_line_error(capsys.readouterr().err, "training diverged", "of always predicting the label rate")
    assert ("steps 1-2 (epoch 1)" if log_every else "up to step 3") in line
    checkpoints = tmp_path / "runs" / "div" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_chance_auc_with_a_rising_loss_is_divergence():
    def check(auc, loss, before=0.70):
        d = Divergence(10.0, 0.5)  # the constant predictor's logloss: log 2 = 0.693
        d.check_chance(auc, loss, before, "valid", 40)

    check(0.503, 0.68)  # at chance, but the loss falls
    check(0.62, 0.9)  # the loss rises, but the model ranks
    check(0.5, 0.9, before=math.nan)  # the first evaluation
    check(math.nan, 0.9)  # one class: AUC undefined, not chance
    with pytest.raises(TrainingError, match="AUC 0.5030 at step 40 is chance's while the train loss rose to 0.9"):
        check(0.503, 0.9)


def test_json_outputs_hold_no_nan(tiny_config, tmp_path):
    """A split of one class has no AUC: null with a note, never NaN (strict JSON readers refuse it)."""
    from wdl.train.metrics import finite_json

    text = finite_json({"auc": math.nan, "logloss": 0.3, "per_rank": [math.inf, 1.0]})
    assert json.loads(text) == {"auc": None, "logloss": 0.3, "per_rank": [None, 1.0],
                                "auc_note": "undefined: every label of the split is the same"}
    assert train(tiny_config, "run.name=j", "train.epochs=1", "train.log_every_steps=5", "train.eval_every_steps=5") == 0
    for name in ("metrics.jsonl", "summary.json"):
        text = (tmp_path / "runs" / "j" / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
