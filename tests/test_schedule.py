"""The learning-rate schedule (warm-up, decay on a validation plateau) and the MLP's bf16
precision: unit checks, and in-process runs on the tiny data set."""

from __future__ import annotations

import json

import pytest
import torch

from wdl.cli import main
from wdl.config import DeepConfig, ScheduleConfig, load_config
from wdl.data.batch import Batch, Jagged
from wdl.errors import ConfigError
from wdl.model.wide_deep import DeepArch
from wdl.train.optim import FTRL, NamedOptimizer, Optimizers
from wdl.train.schedule import LrSchedule
from wdl.train.sparse_optim import FtrlRule, SGDRule, SparseTableOptimizer


def test_warm_up_then_plateau_decay_down_to_the_floor():
    s = LrSchedule(ScheduleConfig(warmup_steps=4, plateau_factor=0.5, plateau_patience=2, min_scale=0.2))
    assert [s.scale(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [s.warming_up(k) for k in (0, 3, 4)] == [True, True, False]
    # gains reset the count; two evaluations without one decay, and counting starts again after a decay
    history = (True, False, True, False, False, False, False, False, False, False)
    decays = [s.evaluated(g) for g in history]
    # 0.5, 0.25, then 0.2 (not 0.125), where it stays
    assert decays == [False, False, False, False, True, False, True, False, True, False]
    assert s.decay == 0.2 and s.scale(10) == 0.2
    again = LrSchedule(s.cfg)  # the state a checkpoint holds: the next evaluation acts the same
    again.load_state_dict(s.state_dict())
    assert again.decay == s.decay and again.evaluated(False) == s.evaluated(False) is False
    assert again.evaluated(False) == s.evaluated(False) is False  # at the floor already


def test_no_schedule_is_a_constant_one():
    s = LrSchedule(ScheduleConfig())
    assert s.scale(0) == 1.0 and not s.warming_up(0)
    assert not any(s.evaluated(False) for _ in range(5)) and s.decay == 1.0


class _Group:
    """The part of an EmbeddingGroup that SparseTableOptimizer reads: rows and one pending step."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.rows = type("Rows", (), {"weight": weight, "push": lambda self, ctx, g: (ctx, g)})()
        self.pending = None

    def take_pending(self):
        p, self.pending = self.pending, None
        return p


def test_scale_lr_reaches_dense_and_row_optimisers():
    w = torch.nn.Parameter(torch.ones(3))
    table = _Group(torch.ones(5, 2))
    opts = Optimizers({"dense": NamedOptimizer({"w": w}, torch.optim.SGD([w], lr=0.1)),
                       "tables": SparseTableOptimizer({"t": table}, SGDRule(0.1))})
    for scale, expect in ((1.0, 0.9), (0.5, 0.85), (0.0, 0.85)):
        opts.scale_lr(scale)
        w.grad = torch.ones(3)
        working = torch.zeros(1, 2, requires_grad=True)
        working.grad = torch.ones(1, 2)
        table.pending = (torch.tensor([2]), working)
        opts.step()
        assert w.detach().tolist() == pytest.approx([expect] * 3)
        assert table.rows.weight[2].tolist() == pytest.approx([expect] * 2)
        assert table.rows.weight[0].tolist() == [1.0, 1.0]  # untouched rows stay


def test_ftrl_keeps_its_rate_because_the_rate_is_part_of_its_weights():
    w = torch.nn.Parameter(torch.zeros(2))
    opts = Optimizers({"wide": NamedOptimizer({"w": w}, FTRL([w], lr=0.1)),
                       "wide_tables": SparseTableOptimizer({"t": _Group(torch.zeros(4, 1))}, FtrlRule(0.2))})
    opts.scale_lr(0.5)
    assert opts.optimizers["wide"].param_groups[0]["lr"] == 0.1
    assert opts.optimizers["wide_tables"].param_groups[0]["lr"] == 0.2


def _runs(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


SCHEDULE = ["data.valid_fraction=0.2", "optim.schedule.warmup_steps=20", "optim.schedule.plateau_factor=0.5",
            "optim.schedule.plateau_patience=1", "optim.deep.lr=0.05"]


def test_schedule_in_training_and_exact_after_resume(tiny_config, tmp_path, capsys):
    assert main(["train", "--config", str(tiny_config), "run.name=whole", "train.epochs=6", *SCHEDULE]) == 0
    whole = _runs(tmp_path, "whole")
    scales = [r["lr_scale"] for r in whole]
    # 15 steps an epoch: epoch 2 starts inside the warm-up (step 15 of 20)
    assert scales[0] == pytest.approx(1 / 20) and scales[1] == pytest.approx(16 / 20)
    # after the warm-up the multiplier halves after each epoch without a better valid AUC
    aucs, decay, best = [r["auc"] for r in whole], 1.0, -1.0
    for r, auc, scale in zip(whole[1:], aucs, scales[1:]):
        decay = decay if auc > best else decay * 0.5
        best = max(best, auc)
        assert scale == pytest.approx(decay * min(1.0, (r["epoch"] - 1) * 15 / 20 + 1 / 20))
    assert decay < 1.0, "the tiny run should plateau at least once: the check above would prove little"
    assert "learning rates x0.5 of the configured ones" in capsys.readouterr().out

    # cut after epoch 3 and resumed: the decay comes back from the checkpoint, the epochs are the same
    assert main(["train", "--config", str(tiny_config), "run.name=cut", "train.epochs=3", *SCHEDULE]) == 0
    assert main(["train", "--config", str(tiny_config), "run.name=cut", "train.epochs=6", *SCHEDULE,
                 "--resume", "auto"]) == 0
    cut = _runs(tmp_path, "cut")
    assert [r["lr_scale"] for r in cut] == scales
    assert [r["auc"] for r in cut] == pytest.approx(aucs, abs=1e-9)


@pytest.mark.parametrize("overrides, message", [
    (["optim.schedule.plateau_factor=0.5"], "needs a validation split"),
    (["optim.schedule.plateau_factor=0"], "must be in \\(0, 1\\]"),
    (["optim.schedule.warmup_steps=-1"], "must be >= 0"),
    (["optim.schedule.plateau_patience=0"], "must be >= 1"),
    (["model.deep.precision=fp16"], "not one of fp32, bf16"),
])
def test_schedule_and_precision_config_errors(overrides, message, tiny_config):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config, overrides)


def _batch(b: int = 64) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = {f: Jagged(torch.randint(0, 50, (b,), generator=g), torch.ones(b, dtype=torch.int32), True)
           for f in ("user_id", "movie_id")}
    return Batch(torch.randn(b, 1, generator=g), ids, torch.randint(0, 2, (b,), generator=g).float())


def test_bf16_mlp_is_close_to_fp32_with_fp32_weights_and_gradients():
    cfg = DeepConfig(embeddings={"user_id": 8, "movie_id": 8}, dense=["year"], hidden=[32, 16], interaction="fm")
    torch.manual_seed(0)
    fp32 = DeepArch(cfg, {"user_id": 50, "movie_id": 50}, 1, "torch")
    bf16 = DeepArch(DeepConfig(**{**cfg.__dict__, "precision": "bf16"}), {"user_id": 50, "movie_id": 50}, 1, "torch")
    bf16.load_state_dict(fp32.state_dict())
    for m in (fp32, bf16):
        m.embeddings.reset_parameters(seed=1)
        m.eval()
    batch = _batch()
    a, b = fp32(batch), bf16(batch)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # bf16 arithmetic really ran
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    b.sum().backward()
    grads = [p.grad for p in bf16.mlp.parameters()]
    assert all(p.dtype == torch.float32 for p in bf16.mlp.parameters())
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("backend", ["torch", "torchrec"])
def test_bf16_trains_with_both_backends(tiny_config, tmp_path, backend):
    pytest.importorskip("torchrec") if backend == "torchrec" else None
    deep = ["optim.deep.name=adagrad"] if backend == "torchrec" else []  # FBGEMM on CPU has no Adam
    args = ["train", "--config", str(tiny_config), f"run.name={backend}", "train.epochs=2",
            "model.deep.precision=bf16", f"model.embedding_backend={backend}", *deep]
    assert main(args) == 0
    recs = _runs(tmp_path, backend)
    assert len(recs) == 2 and all(0.5 < r["auc"] <= 1 for r in recs)
    assert recs[1]["train_loss"] < recs[0]["train_loss"]


def test_scale_lr_reaches_torchrec_fused_tables(tiny_config):
    """FBGEMM updates TorchRec's tables inside backward, with the rate its optimiser's param
    groups hold at zero_grad: a scale of 0 must leave those tables as they were."""
    pytest.importorskip("torchrec")
    from wdl.distributed.env import init_distributed
    from wdl.train.trainer import Trainer

    cfg = load_config(tiny_config, ["model.embedding_backend=torchrec", "optim.deep.name=adagrad"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        def tables():
            state = trainer.placed.state_module.state_dict()
            return {k: v.local_shards()[0].tensor.clone() for k, v in state.items()
                    if "embedding_bags" in k and k.endswith(".weight")}

        def step(scale):
            trainer.optimizer.scale_lr(scale)
            trainer.train_step(next(iter(trainer.train_loader)))

        before = tables()
        assert before, "the config should give TorchRec tables"
        step(0.0)
        assert all(torch.equal(before[k], v) for k, v in tables().items())
        step(1.0)
        assert any(not torch.equal(before[k], v) for k, v in tables().items())
    finally:
        trainer.close()
