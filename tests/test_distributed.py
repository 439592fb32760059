"""Real multi-process runs of the training entry point under torchrun (CPU, gloo).

Each test launches `launch/train.py` exactly as a user would; the tiny data set keeps every
run to a few seconds (most of it is importing torch and torchrec).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wdl.model.embeddings import torchrec_available

ROOT = Path(__file__).resolve().parents[1]
needs_torchrec = pytest.mark.skipif(not torchrec_available(), reason="torchrec + fbgemm-gpu-cpu not installed")

# TorchRec sharding where it is installed; elsewhere (a torch-only machine) the same runs go
# through plain DDP, which must resume, reload and survive a kill just the same.
TORCHREC = (["model.embedding_backend=torchrec", "optim.deep.name=adagrad", "optim.deep.lr=0.05"]
            if torchrec_available() else ["model.embedding_backend=torch"])
# wdl's own fused tables, split row-wise over the ranks (any machine).
FUSED = ["model.embedding_backend=torch"]
BACKENDS = pytest.mark.parametrize("backend", [TORCHREC, FUSED] if torchrec_available() else [FUSED],
                                   ids=lambda b: b[0].split("=")[1])


def launch(config: Path, nproc: int, *args: str, max_restarts: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc > 0:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--max-restarts={max_restarts}"]
    # a stuck collective fails with a traceback well before the test's own timeout
    cmd += [str(ROOT / "launch" / "train.py"), "--config", str(config), "run.collective_timeout_s=90", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # show where it stood, not just that it timed out
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd[-6:])}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


UNINTERRUPTED = ["train.epochs=2", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    """An uninterrupted 2-process run per backend (2 epochs, a checkpoint every 4 steps), made
    once and shared by the tests that compare a cut, killed or reloaded run against it."""
    from conftest import TINY_CONFIG

    root = tmp_path_factory.mktemp("uninterrupted")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(path=config, runs=root / "runs", data=tiny_data))
    done: dict[str, Path] = {}

    def run(backend: list[str]) -> Path:
        key = backend[0]
        if key not in done:
            ok(launch(config, 2, *backend, *UNINTERRUPTED, f"run.name=full-{len(done)}"))
            done[key] = root / "runs" / f"full-{len(done)}"
        return done[key]

    return run


@needs_torchrec
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_two_process_sharded_training(tiny_config, tmp_path, sharding):
    proc = launch(tiny_config, 2, *TORCHREC, f"distributed.sharding={sharding}", "run.name=ddp")
    ok(proc)
    run = tmp_path / "runs" / "ddp"
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert r["train_rows"] == 2400  # every training row exactly once per epoch, across both ranks
        assert r["rows"] == 600  # every test row scored exactly once
        assert 0.6 < r["auc"] < 1.0 and r["logloss"] < 0.7
    plan = (run / "plan.txt").read_text()
    assert f"deep_user_id" in plan and sharding in plan
    # FTRL's wide tables are one fused table split row-wise over the ranks, not replicated
    assert "wdl fused wide table" in plan and "rows split over 2 ranks" in plan
    # only rank 0 prints the table
    assert proc.stdout.count("best test AUC") == 1


def test_same_auc_for_one_and_two_processes_on_same_state(tiny_config, tmp_path, uninterrupted):
    """A 2-process checkpoint evaluated by 1 and by 2 processes: one global AUC (2 -> 1 reload)."""
    ckpt = uninterrupted(TORCHREC)
    logged = records(ckpt)[-1]
    one = launch(tiny_config, 0, *TORCHREC, "train.eval_only=true", f"checkpoint.resume={ckpt}", "run.name=eval1")
    ok(one)
    two = launch(tiny_config, 2, *TORCHREC, "train.eval_only=true", f"checkpoint.resume={ckpt}", "run.name=eval2")
    ok(two)
    e1 = json.loads((tmp_path / "runs" / "eval1" / "eval.json").read_text())
    e2 = json.loads((tmp_path / "runs" / "eval2" / "eval.json").read_text())
    assert e1["rows"] == e2["rows"] == 600
    assert e1["auc"] == pytest.approx(logged["auc"], abs=1e-6)
    assert e2["auc"] == pytest.approx(logged["auc"], abs=1e-6)
    assert e1["logloss"] == pytest.approx(e2["logloss"], abs=1e-6)


def test_one_process_checkpoint_continues_on_two(tiny_config, tmp_path):
    """1 -> 2: an epoch-end checkpoint of a 1-process run resumes under 2 processes."""
    ok(launch(tiny_config, 0, *TORCHREC, "train.epochs=1", "run.name=one"))
    first = records(tmp_path / "runs" / "one")
    proc = launch(tiny_config, 2, *TORCHREC, "train.epochs=2", "--resume", str(tmp_path / "runs" / "one"))
    ok(proc)
    assert "resumed from" in proc.stdout
    recs = records(tmp_path / "runs" / "one")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[0] == first[0]
    assert recs[1]["train_rows"] == 2400 and recs[1]["auc"] > 0.6


@BACKENDS
def test_resume_mid_epoch_matches_uninterrupted(tiny_config, tmp_path, backend, uninterrupted):
    common = [*backend, *UNINTERRUPTED]
    ok(launch(tiny_config, 2, *common, "run.name=cut", "train.max_steps=6"))
    proc = launch(tiny_config, 2, *common, "run.name=cut", "--resume", "auto")
    ok(proc)
    assert "step-00000006" in proc.stdout  # the newest complete checkpoint: mid-epoch 1
    full, cut = records(uninterrupted(backend)), records(tmp_path / "runs" / "cut")
    assert [r["epoch"] for r in cut] == [1, 2]
    for a, b in zip(full, cut):
        assert b["train_rows"] == a["train_rows"] == 2400
        assert b["auc"] == pytest.approx(a["auc"], abs=1e-6)
        assert b["logloss"] == pytest.approx(a["logloss"], abs=1e-6)
    # the tables (split over 2 ranks, with their optimiser state) reload whole into 1 process
    ok(launch(tiny_config, 0, *backend, "train.eval_only=true", f"checkpoint.resume={tmp_path / 'runs' / 'cut'}",
              "run.name=eval1"))
    e1 = json.loads((tmp_path / "runs" / "eval1" / "eval.json").read_text())
    assert e1["auc"] == pytest.approx(cut[-1]["auc"], abs=1e-6)


def test_killed_rank_restarts_and_finishes(tiny_config, tmp_path, uninterrupted):
    common = [*TORCHREC, *UNINTERRUPTED]
    # The last rank SIGKILLs itself after step 13 (mid-epoch 2); torchrun restarts the group.
    proc = launch(tiny_config, 2, *common, "run.name=killed", "train.kill_at_step=13", "--resume", "auto",
                  max_restarts=1)
    ok(proc)
    assert "exitcode: -9" in proc.stderr or "SIGKILL" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000012" in proc.stdout
    clean, killed = records(uninterrupted(TORCHREC)), records(tmp_path / "runs" / "killed")
    assert [r["epoch"] for r in killed] == [1, 2]
    for a, b in zip(clean, killed):
        assert b["train_rows"] == a["train_rows"] == 2400
        assert abs(b["auc"] - a["auc"]) < 0.002


@needs_torchrec
def test_row_wise_on_cpu_is_a_clear_error(tiny_config):
    proc = launch(tiny_config, 0, *TORCHREC, "distributed.tables={deep_user_id: row_wise}")
    assert proc.returncode == 2
    assert "row_wise needs CUDA" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one line


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = launch(tiny_config, 0, "--resume", str(empty))
    assert proc.returncode == 2
    assert "no complete checkpoint" in proc.stderr


def test_incompatible_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    ok(launch(tiny_config, 0, "train.epochs=1", "run.name=small"))
    proc = launch(tiny_config, 0, "model.deep.embeddings={user_id: 16, movie_id: 8, genres: 4}",
                  "--resume", str(tmp_path / "runs" / "small"))
    assert proc.returncode == 2
    assert "incompatible config" in proc.stderr and "deep_tables" in proc.stderr
    # a cross over other columns, same bucket count: same shape, other meaning
    proc = launch(tiny_config, 0, "features.crosses.gender_movie.columns=[user_id, movie_id]",
                  "--resume", str(tmp_path / "runs" / "small"))
    assert proc.returncode == 2
    assert "incompatible config" in proc.stderr and "crosses" in proc.stderr


def test_plain_ddp_with_pure_pytorch_backend(tiny_config, tmp_path):
    proc = launch(tiny_config, 2, "model.embedding_backend=torch", "run.name=plain")
    ok(proc)
    recs = records(tmp_path / "runs" / "plain")
    assert all(r["train_rows"] == 2400 for r in recs)
    plan = (tmp_path / "runs" / "plain" / "plan.txt").read_text()
    assert "rows split over 2 ranks" in plan and "DDP over 2 ranks" in plan  # tables split, not replicated


def test_mid_epoch_resume_with_another_batch_size_is_refused(tiny_config, tmp_path):
    """A mid-epoch read position is a batch count: with another batch size it would repeat or
    skip rows, so the resume stops with one line (an epoch-end checkpoint loads with any)."""
    ok(launch(tiny_config, 0, "run.name=cut", "checkpoint.every_steps=4", "train.max_steps=6"))
    proc = launch(tiny_config, 0, "run.name=cut", "data.batch_size=64", "--resume", "auto")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "\n" not in err and "saved mid-epoch with data.batch_size=128" in err and "data.batch_size=64 now" in err, err
    assert "best test AUC" not in proc.stdout  # nothing trained, nothing logged


def test_diverged_training_stops_with_one_line(tiny_config, tmp_path):
    proc = launch(tiny_config, 0, "run.name=div", "optim.deep.lr=1e30", "optim.wide.lr=1e30", "train.epochs=1")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "\n" not in err and "training diverged" in err and "epoch 1" in err, err
    assert not (tmp_path / "runs" / "div" / "metrics.jsonl").exists()  # no epoch with a non-finite loss logged


def test_two_process_run_with_dot_interaction(tiny_config, tmp_path):
    """Explicit interactions are model code only: sharded tables and DDP carry them unchanged, and
    a checkpoint of a dot model does not resume into a model without it (another MLP input)."""
    dot = ["model.deep.interaction=dot", "model.deep.interaction_pairs=[[user_id, movie_id]]",
           "model.deep.embedding_dropout=0.1"]
    ok(launch(tiny_config, 2, *TORCHREC, *dot, "train.epochs=1", "run.name=dot"))
    recs = records(tmp_path / "runs" / "dot")
    assert len(recs) == 1 and recs[0]["train_rows"] == 2400 and 0.6 < recs[0]["auc"] < 1.0
    proc = launch(tiny_config, 0, *TORCHREC, "--resume", str(tmp_path / "runs" / "dot"))
    assert proc.returncode == 2
    assert "incompatible config" in proc.stderr and "interaction" in proc.stderr
