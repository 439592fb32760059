"""TorchRec's train pipeline (train.pipeline=sparse_dist) gives the plain loop's run, on CPU with gloo.

The pipeline reads two batches ahead and starts the next batch's input distribution before this
step's forward; the runs below check that nothing else changes: every step's loss, the
evaluations between steps (the pipeline pauses for them), the final checkpoint, and a mid-epoch
resume. One process runs in this process; two go through torchrun as a user launches them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, one_line_error
from wdl.cli import main
from wdl.config import DeepConfig, ModelConfig, TrainConfig
from wdl.errors import ConfigError
from wdl.model.embeddings import torchrec_available
from wdl.train.pipeline import wants_pipeline

needs_torchrec = pytest.mark.skipif(not torchrec_available(), reason="TorchRec is not installed")

# A table of each CPU sharding type over two ranks (column shards are at least 128 wide).
TORCHREC = ["model.embedding_backend=torchrec", "optim.deep.name=adagrad", "optim.deep.lr=0.05",
            "model.deep.embeddings={user_id: 256, movie_id: 8, genres: 4}",
            "distributed.sharding=table_wise", "distributed.tables={deep_user_id: column_wise}"]
# A step record every step; evaluations and checkpoints mid-epoch; dropout (the RNG's draws must
# come in the same order) and a warm-up (the rates change every step, set before each one).
RUN = [*TORCHREC, "train.epochs=2", "train.log_every_steps=1", "train.eval_every_steps=7",
       "checkpoint.every_steps=5", "model.deep.dropout=0.3", "optim.schedule.warmup_steps=6"]
LOOP, PIPE = ["train.pipeline=none"], ["train.pipeline=sparse_dist"]


def train_here(config: Path, *args: str) -> int:
    return main(["train", "--config", str(config), *args])


def launch(config: Path, nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "launch" / "train.py"), "--config", str(config), "run.collective_timeout_s=90", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def logged(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """A run's (step, train loss) per step and (step, auc, logloss) per evaluation, interim ones left out."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [(r["step"], r["train_loss"]) for r in recs if r["kind"] == "step"]
    evals = [(r["step"], r["auc"], r["logloss"]) for r in recs if r["kind"] == "eval" and not r.get("interim")]
    return steps, evals


def final_state(run: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's newest checkpoint (model, optimisers, counters), whole, by path."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    dcp_to_torch_save(newest, scratch)
    flat: dict[str, torch.Tensor] = {"step": torch.tensor(int(newest.name.split("-")[1]))}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(scratch, weights_only=True))
    return flat


def assert_same(pipe: Path, loop: Path, steps: int, tmp_path: Path) -> None:
    (got, got_evals), (want, want_evals) = logged(pipe), logged(loop)
    assert [s for s, _ in want] == list(range(1, steps + 1))
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-6)
    assert len(want_evals) >= 3 and [e[0] for e in got_evals] == [e[0] for e in want_evals]
    assert [x for e in got_evals for x in e[1:]] == pytest.approx([x for e in want_evals for x in e[1:]], abs=1e-6)
    a, b = final_state(pipe, tmp_path / "pipe.pt"), final_state(loop, tmp_path / "loop.pt")
    assert a.keys() == b.keys() and any("ebc" in k or "embedding_bags" in k for k in a), sorted(a)[:20]
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k].double(), b[k].double(), atol=1e-6, rtol=0, equal_nan=True), k


@pytest.mark.slow
@needs_torchrec
def test_one_process_pipeline_matches_the_loop_and_resumes_mid_epoch(tiny_config, tmp_path):
    """19 steps an epoch, 38 in all; the cut run stops at step 9 (mid-epoch, between evaluations
    and checkpoints) and a new run resumes it. The MLP in bf16: its autocast is traced too."""
    runs, run = tmp_path / "runs", [*RUN, "model.deep.precision=bf16"]
    assert train_here(tiny_config, *run, *LOOP, "run.name=loop") == 0
    assert train_here(tiny_config, *run, *PIPE, "run.name=pipe") == 0
    assert_same(runs / "pipe", runs / "loop", 38, tmp_path)
    assert train_here(tiny_config, *run, *PIPE, "run.name=cut", "train.max_steps=9") == 0
    assert train_here(tiny_config, *run, *PIPE, "run.name=cut", "--resume", "auto") == 0
    assert_same(runs / "cut", runs / "loop", 38, tmp_path)


@pytest.mark.slow
@needs_torchrec
def test_two_processes_pipeline_matches_the_loop_across_a_mid_epoch_resume(tiny_config, tmp_path):
    """torchrun, 2 ranks, tables column- and table-wise: 10 steps an epoch, 20 in all; the
    pipelined run is cut at step 6 (mid-epoch 1) and resumed by a new launch."""
    runs = tmp_path / "runs"
    launch(tiny_config, 2, *RUN, *LOOP, "run.name=loop")
    launch(tiny_config, 2, *RUN, *PIPE, "run.name=pipe", "train.max_steps=6")
    launch(tiny_config, 2, *RUN, *PIPE, "run.name=pipe", "--resume", "auto")
    assert_same(runs / "pipe", runs / "loop", 20, tmp_path)


def test_sparse_dist_needs_torchrec_tables(tiny_config, capsys):
    """Refused in one line before any data is read."""
    assert train_here(tiny_config, "model.embedding_backend=torch", *PIPE) == 2
    line = one_line_error(capsys.readouterr().err, "train.pipeline=sparse_dist", "model.embedding_backend=torch")
    assert "torchrec" in line


def test_auto_pipelines_torchrec_tables_on_several_gpus_only():
    cfg, model = TrainConfig(), ModelConfig(deep=DeepConfig(embeddings={"user_id": 8}))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wants_pipeline(cfg, model, "torchrec", cuda, 2)
    assert not wants_pipeline(cfg, model, "torchrec", cuda, 1)  # no input distribution to hide
    assert not wants_pipeline(cfg, model, "torchrec", cpu, 2)  # no streams to overlap on
    assert not wants_pipeline(cfg, model, "torch", cuda, 2)  # wdl's own tables: nothing for TorchRec to feed
    assert not wants_pipeline(TrainConfig(pipeline="none"), model, "torchrec", cuda, 2)
    assert not wants_pipeline(TrainConfig(compile="default"), model, "torchrec", cuda, 2)
    assert wants_pipeline(TrainConfig(pipeline="sparse_dist"), model, "torchrec", cpu, 1)
    with pytest.raises(ConfigError, match="train.compile=default"):
        wants_pipeline(TrainConfig(pipeline="sparse_dist", compile="default"), model, "torchrec", cpu, 1)
    with pytest.raises(ConfigError, match="no TorchRec tables"):
        wants_pipeline(TrainConfig(pipeline="sparse_dist"), ModelConfig(kind="wide", deep=model.deep), "torchrec", cpu, 1)
