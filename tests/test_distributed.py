"""Real multi-process runs of the training entry point under torchrun (CPU, gloo).

Each 2-process launch runs `launch/train.py` exactly as a user would, and costs about 20 s of
two CPUs (most of it importing torch and torchrec in each rank), so each one checks several
things: the two uninterrupted runs (one per backend) are made once a session (conftest.py's
two_rank_run; test_plan.py and test_continual.py read them too) and read by every test that
compares against them. What needs no second process (checking a 2-process checkpoint in one
process, errors at start) runs `wdl train` in this process; single-process error cases are in
test_run_safety.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (RUN_FUSED, RUN_TORCHREC, UNINTERRUPTED, ok, records, side_by_side, torchrun as launch,
                     write_tiny_config)
from wdl.cli import main
from wdl.errors import ConfigError
from wdl.model.embeddings import torchrec_available

# TorchRec's tables (the user table column-wise, the others table-wise; helpers.RUN_TORCHREC)
# where it is installed. Elsewhere (a torch-only machine) the same runs go through plain DDP,
# which must resume, reload and survive a kill just the same.
TORCHREC = RUN_TORCHREC if torchrec_available() else RUN_FUSED
# wdl's own fused tables, split row-wise over the ranks (any machine), dense layers in DDP.
FUSED = RUN_FUSED
BACKENDS = pytest.mark.parametrize("backend", [TORCHREC, FUSED] if torchrec_available() else [FUSED],
                                   ids=lambda b: b[0].split("=")[1])


def train_here(config: Path, *args: str) -> int:
    """`wdl train` in this process (one rank)."""
    return main(["train", "--config", str(config), *args])


def evaluated_in_one_process(config: Path, run: Path, name: str, backend: list[str]) -> dict:
    """The newest checkpoint of `run` (saved by 2 ranks) loaded whole into this one process and
    scored on the test split: its eval.json."""
    assert train_here(config, *backend, "train.eval_only=true", f"checkpoint.resume={run}", f"run.name={name}") == 0
    return json.loads((config.parent / "runs" / name / "eval.json").read_text())


def assert_same_epochs(whole: list[dict], resumed: list[dict]) -> None:
    """A cut or killed run that resumed logs the uninterrupted run's two epochs."""
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(whole, resumed):
        assert b["train_rows"] == a["train_rows"] == 2400
        assert b["auc"] == pytest.approx(a["auc"], abs=1e-6)
        assert b["logloss"] == pytest.approx(a["logloss"], abs=1e-6)


@pytest.mark.slow
@BACKENDS
def test_two_process_training(backend, two_rank_run):
    """Every row once per epoch across the ranks, a model that learns, tables split (none
    replicated), one console table."""
    run, proc = two_rank_run(backend)
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert r["train_rows"] == 2400  # every training row exactly once per epoch, across both ranks
        assert r["rows"] == 600  # every test row scored exactly once
        assert 0.6 < r["auc"] < 1.0 and r["logloss"] < 0.7
    plan = (run / "plan.txt").read_text()  # wdl plan's table (tests/test_plan.py compares the two)
    rows = {line.split()[0]: line.split() for line in plan.splitlines() if line[:1].isalpha()}
    # FTRL's wide tables are one fused table split row-wise over the ranks, not replicated
    assert rows["wide"][-3:-1] == ["wdl_row_blocks", "0-1"], plan
    if backend is TORCHREC and torchrec_available():
        assert rows["deep_user_id"][-3:-1] == ["column_wise", "0-1"], plan  # split over both
        assert rows["deep_movie_id"][-3] == "table_wise", plan
    else:  # wdl's deep tables are split too
        assert rows["deep"][-3:-1] == ["wdl_row_blocks", "0-1"], plan
    assert proc.stdout.count("best test AUC") == 1  # only rank 0 prints


@pytest.fixture(scope="module")
def broken_off(tmp_path_factory, tiny_data):
    """The two runs broken off mid-way, their launches side by side (independent of each other;
    much of a launch is one process importing torch on one core): `cut`, wdl's row-split tables
    stopped at step 6 (mid-epoch 1) by train.max_steps, then continued by a new launch; `killed`,
    TorchRec's sharded tables (or plain DDP without TorchRec), its last rank SIGKILLing itself
    after step 13 (mid-epoch 2; WDL_TEST_KILL_AT_STEP, set for that launch) and torchrun
    restarting the group once. {name: (config, run folder, its launches' outputs)}."""
    config = write_tiny_config(tmp_path_factory.mktemp("broken-off"), tiny_data)

    def cut() -> list[subprocess.CompletedProcess]:
        common = [*FUSED, *UNINTERRUPTED, "run.name=cut"]
        first = launch(config, 2, *common, "train.max_steps=6")
        return [first] if first.returncode else [first, launch(config, 2, *common, "--resume", "auto")]

    def killed() -> list[subprocess.CompletedProcess]:
        return [launch(config, 2, *TORCHREC, *UNINTERRUPTED, "run.name=killed", "--resume", "auto", max_restarts=1,
                       env={"WDL_TEST_KILL_AT_STEP": "13"})]

    return {name: (config, config.parent / "runs" / name, procs)
            for name, procs in zip(("cut", "killed"), side_by_side(cut, killed))}


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted(broken_off, two_rank_run):
    """wdl's row-split tables: a run cut at step 6 (mid-epoch 1) and resumed by a new launch logs
    the uninterrupted run's epochs; its 2-rank checkpoint reloads whole into one process and
    scores the same global AUC (one AUC, whatever the number of processes)."""
    config, run, procs = broken_off["cut"]
    for proc in procs:
        ok(proc)
    assert "step-00000006" in procs[1].stdout  # the newest complete checkpoint: mid-epoch 1
    full, cut = records(two_rank_run(FUSED)[0]), records(run)
    assert_same_epochs(full, cut)
    one = evaluated_in_one_process(config, run, "eval-cut", FUSED)
    assert one["rows"] == 600 and one["world_size"] == 1
    assert one["auc"] == pytest.approx(cut[-1]["auc"], abs=1e-6)
    assert one["logloss"] == pytest.approx(cut[-1]["logloss"], abs=1e-6)


@pytest.mark.slow
def test_killed_rank_restarts_and_finishes(broken_off, two_rank_run):
    """TorchRec's sharded tables (or plain DDP without TorchRec): the last rank SIGKILLs itself
    after step 13 (mid-epoch 2); torchrun restarts the group, which resumes from step 12 and logs
    the uninterrupted run's epochs. The checkpoint (a column-wise and table-wise sharded TorchRec
    state) reloads whole into one process with the same AUC."""
    config, run, (proc,) = broken_off["killed"]
    ok(proc)
    assert "exitcode: -9" in proc.stderr or "SIGKILL" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000012" in proc.stdout
    clean, killed = records(two_rank_run(TORCHREC)[0]), records(run)
    assert_same_epochs(clean, killed)
    one = evaluated_in_one_process(config, run, "eval-killed", TORCHREC)
    assert one["rows"] == 600 and one["auc"] == pytest.approx(killed[-1]["auc"], abs=1e-6)


@pytest.mark.slow
def test_one_process_checkpoint_continues_on_two_with_dot_interaction(tiny_config, tmp_path, capsys):
    """1 -> 2: an epoch-end checkpoint of a 1-process run resumes under 2 processes, its tables
    resharded. The model has a dot interaction and embedding dropout: explicit interactions are
    model code only, which sharded tables and DDP carry unchanged; and the checkpoint does not
    resume into a model without the interaction (another MLP input)."""
    model = [*TORCHREC, "model.deep.embeddings={user_id: 256, movie_id: 256, genres: 4}"]  # a pair: one dim
    dot = ["model.deep.interaction=dot", "model.deep.interaction_pairs=[[user_id, movie_id]]",
           "model.deep.embedding_dropout=0.1"]
    assert train_here(tiny_config, *model, *dot, "train.epochs=1", "run.name=one") == 0
    first = records(tmp_path / "runs" / "one")
    proc = launch(tiny_config, 2, *model, *dot, "train.epochs=2", "--resume", str(tmp_path / "runs" / "one"))
    ok(proc)
    assert "resumed from" in proc.stdout
    recs = records(tmp_path / "runs" / "one")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[0] == first[0]
    assert recs[1]["train_rows"] == 2400 and 0.6 < recs[1]["auc"] < 1.0
    capsys.readouterr()
    assert train_here(tiny_config, *model, "--resume", str(tmp_path / "runs" / "one")) == 2
    err = capsys.readouterr().err
    assert "incompatible config" in err and "interaction" in err, err


def test_the_memory_check_counts_every_rank_that_shares_the_hosts_memory():
    """On CPU the ranks of one host take their parts of the tables from the same memory: each
    part fitting is not enough (a rank would be killed for memory rather than told)."""
    from wdl.distributed.rows import available_bytes, check_memory

    cpu = torch.device("cpu")
    part = int(0.6 * available_bytes(cpu))
    check_memory(part, "wide dim 1", cpu, world_size=2)  # the part fits when it has the memory alone
    with pytest.raises(ConfigError, match=r"with 2 rank\(s\), 2 of them from this host's memory, .* use more hosts"):
        check_memory(part, "wide dim 1", cpu, world_size=2, sharing=2)
