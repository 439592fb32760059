"""The step replayed as a CUDA graph (train.cuda_graph), checked on the CPU: batches padded to
fixed shapes train exactly as unpadded ones, and GraphedStep, with a capture that has CUDA
graphs' semantics (tests/replay_capture.py: the step's Python runs once, replays re-run its
recorded ops on fixed tensors), trains exactly as the eager step, recapturing when the learning
rates change and stepping odd-shaped batches eagerly. (CUDA's own capture needs a GPU:
benchmarks/run_gpu.sh runs it.)"""

from __future__ import annotations

import pytest
import torch

from wdl.config import load_config
from wdl.distributed.env import init_distributed
from wdl.errors import ConfigError
from wdl.train.graphed_step import GraphedStep
from wdl.train.trainer import Trainer

from replay_capture import HostReads, ReplayCapture


def trainer(config, tmp_path, name, *overrides):
    cfg = load_config(config, [f"run.out_dir={tmp_path / name}", "model.deep.dropout=0.3", *overrides])
    tr = Trainer(cfg, init_distributed("cpu"))
    tr.model.train()
    for g in tr.wide_deep.fused_groups():
        g.rows.static_shapes = True  # the CUDA path: no host sync, fixed shapes
    return tr


def batches(tr, epochs):
    for epoch in range(epochs):
        tr.train_loader.set_epoch(epoch)
        tr.train_loader.load_state_dict({"epoch": epoch, "batches_done": 0})
        yield from tr.train_loader


def state(tr):
    out = {f"model.{k}": v.clone() for k, v in tr.wide_deep.state_dict().items()}
    for part, st in tr.optimizer.state_dict().items():
        for name, tensors in st.items():
            out.update({f"{part}.{name}.{k}": v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)})
    return out


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_padded_batches_train_exactly_as_unpadded(tiny_config, tmp_path, in_memory):
    read = f"data.in_memory={str(in_memory).lower()}"
    plain, padded = trainer(tiny_config, tmp_path, "plain", read), trainer(tiny_config, tmp_path, "padded", read)
    padded.train_loader.fix_shapes()
    seen_sizes = set()
    for step, (x, y) in enumerate(zip(batches(plain, 2), batches(padded, 2))):
        genres = y.sparse["genres"]
        if len(y) == padded.cfg.data.batch_size:
            # every full batch: a fixed number of ids, in one more "row" of padding
            assert genres.padded and genres.lengths.numel() == len(y) + 1
            assert torch.equal(genres.lengths[:-1], x.sparse["genres"].lengths)
            seen_sizes.add(genres.values.numel())
        else:
            assert not genres.padded  # the epoch's last, smaller batch
        torch.manual_seed(step)  # the same dropout masks for both
        a = plain.train_step(x)
        torch.manual_seed(step)
        b = padded.train_step(y)
        assert float(a) == pytest.approx(float(b), abs=1e-6)
    assert len(seen_sizes) == 1
    assert_same_state(plain, padded)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_graphed_step_trains_as_the_eager_step(tiny_config, tmp_path, in_memory):
    read = f"data.in_memory={str(in_memory).lower()}"
    eager, graphed = trainer(tiny_config, tmp_path, "eager", read), trainer(tiny_config, tmp_path, "graphed", read)
    for tr in (eager, graphed):
        tr.train_loader.fix_shapes()
    capture = ReplayCapture()
    step = GraphedStep(graphed._step, graphed.optimizer.rates, warmup=2, capture=capture)
    steps_per_epoch = eager.train_loader.steps_per_epoch
    for i, (x, y) in enumerate(zip(batches(eager, 2), batches(graphed, 2))):
        if i == 25:  # a plateau decay: the captured rates no longer hold
            eager.optimizer.scale_lr(0.5)
            graphed.optimizer.scale_lr(0.5)
        torch.manual_seed(i)
        a = eager.train_step(x)
        torch.manual_seed(i)
        b = step(y)
        assert float(a) == pytest.approx(float(b), abs=1e-6), i
    assert_same_state(eager, graphed)
    total = 2 * steps_per_epoch
    # captured at the start and after the decay (2 eager steps before each); each epoch's last,
    # smaller batch eagerly, the graph kept for the next epoch
    assert step.counters() == {"graph_captures": 2, "eager_steps": 2 + 2 + 2, "graph_replays": total - 6}
    assert capture.recorded_ops > 100  # forward, backward and every optimiser update were recorded
    assert step.shortfall() is None


def test_cuda_graph_needs_a_cuda_device_and_wdl_tables(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graph=true needs one process on a CUDA device"):
        Trainer(load_config(tiny_config, [f"run.out_dir={tmp_path}", "train.cuda_graph=true"]), init_distributed("cpu"))
    with pytest.raises(ConfigError, match="model.embedding_backend=torch and train.compile=none"):
        load_config(tiny_config, ["train.cuda_graph=true", "train.compile=default"])


def test_the_step_reads_nothing_back_to_the_host(tiny_config, tmp_path):
    """What capture needs and what the step promises (no host sync): on the CUDA path (static
    shapes, padded batches), no wdl code in a step reads a tensor's value back (.item(), int(),
    bool() of a tensor, nonzero). Seen by a dispatch mode, forward and backward, whatever the
    torch version's profiler records."""
    tr = trainer(tiny_config, tmp_path, "sync")
    tr.train_loader.fix_shapes()
    it = batches(tr, 1)
    for _ in range(2):
        tr.train_step(next(it))
    x = next(it)
    with HostReads() as seen:
        tr.train_step(x)
    assert seen.reads == []
    for g in tr.wide_deep.fused_groups():  # the CPU path sizes its row updates on the host
        g.rows.static_shapes = False
    with HostReads() as seen:
        tr.train_step(x)
    assert any("/wdl/" in r for r in seen.reads)  # so the check sees wdl's reads


def test_a_step_that_cannot_be_captured_trains_on_eagerly(tiny_config, tmp_path, capsys):
    eager, graphed = trainer(tiny_config, tmp_path, "eager"), trainer(tiny_config, tmp_path, "graphed")
    graphed.train_loader.fix_shapes()

    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    step = GraphedStep(graphed._step, graphed.optimizer.rates, warmup=2, capture=refuse)
    for i, (x, y) in enumerate(zip(batches(eager, 1), batches(graphed, 1))):
        torch.manual_seed(i)
        a = eager.train_step(x)
        torch.manual_seed(i)
        assert float(step(y)) == pytest.approx(float(a), abs=1e-6), i
    assert_same_state(eager, graphed)  # the batch of the failed capture was trained on, once
    n = eager.train_loader.steps_per_epoch
    assert step.counters() == {"graph_replays": 0, "eager_steps": n, "graph_captures": 0,
                               "graph_failure": "operation not permitted when stream is capturing"}
    err = capsys.readouterr().err
    assert err.count("could not be captured as a CUDA graph") == 1


def test_steps_that_mostly_miss_the_graph_are_said(tiny_config, tmp_path):
    """Unpadded multi-valued batches differ in shape every step: the graph is never replayed,
    and shortfall() says so once per call (the trainer prints it after each epoch)."""
    tr = trainer(tiny_config, tmp_path, "unpadded")
    step = GraphedStep(tr._step, tr.optimizer.rates, warmup=2, capture=ReplayCapture())
    for x in batches(tr, 1):
        step(x)
    line = step.shortfall()
    n = tr.train_loader.steps_per_epoch
    assert line is not None and f"{n} of {n} steps ran without the graph" in line
    assert step.shortfall() is None  # nothing new since


def test_a_failed_recapture_leaves_the_run_eager(tiny_config, tmp_path, capsys):
    """A capture that fails after an earlier one succeeded (e.g. out of memory while recapturing
    for new rates) drops the old graph too: later steps run eagerly, none replays a dropped graph."""
    eager, graphed = trainer(tiny_config, tmp_path, "eager"), trainer(tiny_config, tmp_path, "graphed")
    graphed.train_loader.fix_shapes()
    real, calls = ReplayCapture(), []

    def capture(fn):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("out of memory while capturing")
        return real(fn)

    scale = [1.0]
    step = GraphedStep(graphed._step, lambda: (*graphed.optimizer.rates(), scale[0]), warmup=1, capture=capture)
    for i, (x, y) in enumerate(zip(batches(eager, 1), batches(graphed, 1))):
        scale[0] = 0.5 if i in (6, 7) else 1.0  # two steps at other "rates": a recapture, which fails
        torch.manual_seed(i)
        a = eager.train_step(x)
        torch.manual_seed(i)
        assert float(step(y)) == pytest.approx(float(a), abs=1e-6), i
    assert_same_state(eager, graphed)
    counters = step.counters()
    assert counters["graph_captures"] == 1 and counters["graph_failure"] == "out of memory while capturing"
    assert counters["graph_replays"] == 5  # steps 1-5; from step 7 on, all eager
    assert capsys.readouterr().err.count("could not be captured") == 1
