"""wdl's fused tables and row optimisers against the plain per-table, dense-gradient math."""

import pytest
import torch
import torch.nn.functional as F

from wdl.config import OptimizerConfig
from wdl.data.batch import Batch, Jagged
from wdl.model.embeddings import EmbeddingGroup, FusedEmbeddingBags, TableSpec, dedupe
from wdl.model.init import normal_block
from wdl.train.optim import FTRL
from wdl.train.sparse_optim import SparseTableOptimizer, row_rule

from helpers import ROOT, needs_compiler

ROWS = {"u": 30, "m": 20, "g": 8}


def batch(seed: int, b: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (b,), generator=g, dtype=torch.int32)
    one = torch.ones(b, dtype=torch.int32)
    return Batch(
        dense=torch.zeros(b, 0),
        sparse={
            # skewed ids, so rows repeat within a batch and some rows are never touched
            "u": Jagged(torch.randint(0, 10, (b,), generator=g), one, single=True),
            "m": Jagged(torch.randint(0, 12, (b,), generator=g), one, single=True),
            "g": Jagged(torch.randint(0, 8, (int(lengths.sum()),), generator=g), lengths),
        },
        labels=torch.randint(0, 2, (b,), generator=g).float(),
    )


def tables(dim: int) -> list[TableSpec]:
    return [TableSpec(f, n, dim, f"t_{f}", init_std=0.0 if dim == 1 else 0.1) for f, n in ROWS.items()]


def loss_of(pooled: dict, labels: torch.Tensor, dim: int) -> torch.Tensor:
    proj = torch.linspace(-1.0, 1.0, dim)
    logit = sum((pooled[f] * proj).sum(1) * (i + 1) for i, f in enumerate(ROWS))
    return F.binary_cross_entropy_with_logits(logit, labels)


def reference(specs: list[TableSpec], seed: int) -> dict[str, torch.nn.EmbeddingBag]:
    """The unfused math: one nn.EmbeddingBag per feature, dense gradients."""
    bags = {}
    for t in specs:
        bags[t.feature] = torch.nn.EmbeddingBag(t.num_embeddings, t.dim, mode="sum")
        with torch.no_grad():
            normal_block(bags[t.feature].weight, seed, t.name, t.init_std, 0, 0, t.dim)
    return bags


def dense_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.3)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=0.3, initial_accumulator_value=0.1)
    return FTRL(params, lr=0.3, l1=0.001, l2=0.01, beta=0.5)


CONFIGS = {"sgd": OptimizerConfig(name="sgd", lr=0.3),
           "adagrad": OptimizerConfig(name="adagrad", lr=0.3, initial_accumulator_value=0.1, eps=1e-10),
           "ftrl": OptimizerConfig(name="ftrl", lr=0.3, l1=0.001, l2=0.01, beta=0.5)}


@pytest.mark.parametrize("static_shapes", [False, True], ids=["compact", "static"])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl"])
@pytest.mark.parametrize("dim", [1, 4])
def test_fused_sparse_training_equals_per_table_dense_training(name, dim, static_shapes):
    """static: the CUDA path (no host sync, padded shapes), forced here on the CPU."""
    specs = tables(dim)
    if name == "ftrl":  # FTRL's weights are a function of its state, which starts at zero
        specs = [TableSpec(t.feature, t.num_embeddings, t.dim, t.name, 0.0) for t in specs]
    ref = reference(specs, seed=3)
    ref_opt = dense_optimizer(name, [b.weight for b in ref.values()])
    fused = FusedEmbeddingBags(specs)
    fused.reset_parameters(seed=3)
    groups = {f"g{i}": g for i, g in enumerate(fused.groups)}
    for g in groups.values():
        g.rows.static_shapes = static_shapes
    opt = SparseTableOptimizer(groups, row_rule(CONFIGS[name]))
    for step in range(6):
        x = batch(step)
        ref_loss = loss_of({f: bag(x.sparse[f].values, x.sparse[f].offsets()) for f, bag in ref.items()}, x.labels, dim)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        loss = loss_of(fused(x), x.labels, dim)
        loss.backward()
        opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for f, w in fused.weights().items():
        assert torch.allclose(w, ref[f].weight, atol=1e-6), f


@pytest.mark.parametrize("static_shapes", [False, True], ids=["compact", "static"])
@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad", "adam", "ftrl", "sgd"])
def test_untouched_rows_and_their_state_never_change(name, static_shapes):
    fused = FusedEmbeddingBags(tables(4))
    fused.reset_parameters(seed=1)
    (group,) = fused.groups
    group.rows.static_shapes = static_shapes
    cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.01 if name != "ftrl" else 0.0)
    opt = SparseTableOptimizer({"g": group}, row_rule(cfg))
    before_w = group.rows.weight.clone()
    before_s = {k: v.clone() for k, v in opt.state["g"].items()}
    touched = torch.zeros(group.num_rows, dtype=torch.bool)
    for step in range(4):
        x = batch(step)
        for f, lo in zip(group.keys, group.offsets):
            touched[x.sparse[f].values + lo] = True
        loss_of(fused(x), x.labels, 4).backward()
        opt.step()
    assert touched.any() and not touched.all()
    assert torch.equal(group.rows.weight[~touched], before_w[~touched])
    assert not torch.equal(group.rows.weight[touched], before_w[touched])
    for k in opt.rule.per_row:
        assert torch.equal(opt.state["g"][k][~touched], before_s[k][~touched]), k
        assert not torch.equal(opt.state["g"][k][touched], before_s[k][touched]), k


@needs_compiler
@pytest.mark.parametrize("name", ["adam", "ftrl"])
def test_compiled_row_rules_compute_the_eager_update(name):
    """train.compile runs each rule's arithmetic through torch.compile: same rows, same state,
    whatever the number of rows touched (dynamic shapes) and after a learning-rate change."""
    cfg = OptimizerConfig(name=name, lr=0.1, l1=0.001 if name == "ftrl" else 0.0, l2=0.01 if name == "ftrl" else 0.0)
    g = torch.Generator().manual_seed(0)
    weight, grad_of = torch.randn(50, 4, generator=g), lambda n: torch.randn(n, 4, generator=g)
    eager, compiled = row_rule(cfg), row_rule(cfg)
    compiled.compiled = torch.compile(compiled.update, dynamic=True)
    states = [r.init_state(50, 4, weight.device) for r in (eager, compiled)]
    weights = [weight.clone(), weight.clone()]
    for step, n in enumerate([7, 12, 3]):
        rows, grad = torch.randperm(50, generator=g)[:n], grad_of(n)
        for r, w, st in zip((eager, compiled), weights, states):
            r.lr = 0.1 / (step + 1)
            r.apply(w, st, rows, grad)
        assert torch.allclose(weights[0], weights[1], atol=1e-6)
        for k in states[0]:
            assert torch.allclose(states[0][k], states[1][k], atol=1e-6), k


def test_lazy_adam_equals_torch_sparse_adam():
    specs = tables(4)
    ref = reference(specs, seed=5)
    for bag in ref.values():
        bag.sparse = True
    ref_opt = torch.optim.SparseAdam([b.weight for b in ref.values()], lr=0.05)
    fused = FusedEmbeddingBags(specs)
    fused.reset_parameters(seed=5)
    opt = SparseTableOptimizer({"g": fused.groups[0]}, row_rule(OptimizerConfig(name="adam", lr=0.05)))
    for step in range(5):
        x = batch(step)
        ref_opt.zero_grad()
        loss_of({f: bag(x.sparse[f].values, x.sparse[f].offsets()) for f, bag in ref.items()}, x.labels, 4).backward()
        ref_opt.step()
        loss_of(fused(x), x.labels, 4).backward()
        opt.step()
    for f, w in fused.weights().items():
        assert torch.allclose(w, ref[f].weight, atol=1e-6), f


def test_rowwise_adagrad_keeps_one_accumulator_per_row():
    group = EmbeddingGroup([TableSpec("u", 5, 2, "t_u")])
    with torch.no_grad():
        group.rows.weight.fill_(1.0)
    opt = SparseTableOptimizer({"g": group}, row_rule(OptimizerConfig(name="rowwise_adagrad", lr=0.5, eps=0.0)))
    x = Batch(torch.zeros(2, 0), {"u": Jagged(torch.tensor([3, 3]), torch.ones(2, dtype=torch.int32), True)},
              torch.zeros(2))
    out = group(x)  # [1, 2, 2]
    (out * torch.tensor([3.0, 4.0])).sum().backward()  # row 3's gradient: 2 * [3, 4] = [6, 8]
    opt.step()
    acc = (36 + 64) / 2  # mean of the squared gradient over the row
    assert opt.state["g"]["sum"].tolist() == [0, 0, 0, acc, 0]
    expected = 1.0 - 0.5 * torch.tensor([6.0, 8.0]) / acc ** 0.5
    assert torch.allclose(group.rows.weight[3], expected)
    assert torch.equal(group.rows.weight[[0, 1, 2, 4]], torch.ones(4, 2))


@pytest.mark.parametrize("compact", [True, False])
def test_dedupe(compact):
    ids = torch.tensor([7, 3, 7, 9, 3, 3, 1])
    slots = torch.full((10,), -5, dtype=torch.int32)  # stale scratch: dedupe never reads what it did not write
    uniq, inv, src = dedupe(ids, slots, compact)
    assert torch.equal(uniq[inv], ids)
    empty = dedupe(ids[:0], slots, compact)  # a batch whose only multi-hot feature is empty everywhere
    assert all(t is None or t.numel() == 0 for t in empty)
    assert sorted(uniq[: 4].tolist()) == [1, 3, 7, 9]
    if compact:
        assert uniq.numel() == 4 and src is None
        return
    # static shapes (no host sync on CUDA): padding slots repeat ids[0] and update from its slot
    assert uniq.shape == ids.shape and uniq[4:].tolist() == [7, 7, 7]
    assert src[:4].tolist() == [0, 1, 2, 3] and src[4:].tolist() == [int(inv[0])] * 3
    grad = torch.zeros(7).index_add_(0, inv, torch.ones(7))
    w = torch.zeros(10)
    w.index_copy_(0, uniq, w[uniq] - grad[src])
    assert w[[1, 3, 7, 9]].tolist() == [-1, -3, -2, -1]


def test_initial_values_do_not_depend_on_how_a_table_is_split():
    full = normal_block(torch.empty(50, 6), seed=4, name="t", std=0.5, row0=0, col0=0, dim=6)
    block = normal_block(torch.empty(20, 3), seed=4, name="t", std=0.5, row0=17, col0=2, dim=6)
    assert torch.equal(block, full[17:37, 2:5])
    big = normal_block(torch.empty(4000, 50), seed=4, name="t", std=0.5, row0=0, col0=0, dim=50)
    assert abs(big.mean().item()) < 0.01 and big.std().item() == pytest.approx(0.5, rel=0.02)
    other = normal_block(torch.empty(50, 6), seed=4, name="u", std=0.5, row0=0, col0=0, dim=6)
    assert not torch.equal(other, full)


OPTIMISER_PAIRS = [("ftrl", "adagrad"), ("adagrad", "rowwise_adagrad"), ("rowwise_adagrad", "sgd"), ("sgd", "adam"),
                   ("adam", "ftrl")]


@pytest.mark.parametrize("wide, deep", OPTIMISER_PAIRS, ids=lambda x: x)
@pytest.mark.parametrize("backend", ["torch", "torchrec"])
def test_every_optimiser_trains_either_part_with_either_backend(tiny_config, tmp_path, backend, wide, deep):
    """The whole trainer, in process, a few steps: sparse updates for every optimiser; what
    FBGEMM cannot run on TorchRec's tables is a one-line configuration error."""
    from wdl.config import load_config
    from wdl.distributed.env import init_distributed
    from wdl.errors import ConfigError
    from wdl.model.embeddings import torchrec_available
    from wdl.train.trainer import Trainer

    if backend == "torchrec" and not torchrec_available():
        pytest.skip("torchrec not installed")
    cfg = load_config(tiny_config, [f"model.embedding_backend={backend}", f"optim.wide.name={wide}",
                                    f"optim.deep.name={deep}", "optim.deep.lr=0.05", "train.max_steps=4",
                                    "checkpoint.at_epoch_end=false", f"run.name={backend}-{wide}-{deep}"])
    if backend == "torchrec" and deep in ("adam", "ftrl"):
        with pytest.raises(ConfigError, match=f"optim.deep.name={deep}"):
            Trainer(cfg, init_distributed("cpu"))
        return
    trainer = Trainer(cfg, init_distributed("cpu"))
    wide_rows = trainer.wide_deep.wide.embeddings.rows.weight
    before = wide_rows.clone()
    summary = trainer.train()
    assert summary["steps"] == 4 and 0.0 < summary["final"]["train_loss"] < 1.0
    changed = (wide_rows != before).squeeze(1)
    assert changed.any() and not changed.all()  # touched rows moved, the others did not


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_row_prior_is_frequency_aware(name):
    """optim.*.l2 outside FTRL: a touched row's gradient gains l2 * k * w / (steps that touched it),
    k = max(1, steps / steps per pass), so over t steps every row, rare or frequent, is shrunk by
    about l2 * w per pass."""
    l2, lr, per_pass = 0.5, 0.1, 2
    rule = row_rule(OptimizerConfig(name=name, lr=lr, l2=l2), steps_per_pass=per_pass)
    plain = row_rule(OptimizerConfig(name=name, lr=lr))
    assert "touches" in rule.per_row and "touches" not in plain.per_row
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.25, 4.0]])
    state, w_plain, s_plain = rule.full_state(3, 2, weight.device), weight.clone(), plain.full_state(3, 2, weight.device)
    grad = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    expect_touches = torch.zeros(3)
    for step, rows in enumerate([[0, 1], [0, 2], [0, 1]]):
        idx = torch.tensor(rows)
        # the prior as a plain gradient term on the same rule without it
        expect_touches[idx] += 1
        passes = max(1.0, (step + 1) / per_pass)
        prior = l2 * passes * w_plain.index_select(0, idx) / expect_touches[idx].unsqueeze(1)
        plain.apply(w_plain, s_plain, idx, grad + prior)
        rule.apply(weight, state, idx, grad.clone())
        assert torch.equal(state["touches"], expect_touches), step
        torch.testing.assert_close(weight, w_plain)
    assert expect_touches.tolist() == [3.0, 2.0, 1.0]


def test_ftrl_l2_counts_once_per_pass():
    """FTRL's l2 is scaled by the passes over the data made so far: the same as FTRL whose l2 is
    set to l2 * max(1, steps / steps per pass) at each step."""
    cfg = OptimizerConfig(name="ftrl", lr=0.3, l1=0.001, l2=0.2, beta=0.5)
    rule, ref = row_rule(cfg, steps_per_pass=2), row_rule(cfg)
    w, w_ref = torch.zeros(3, 2), torch.zeros(3, 2)
    s, s_ref = rule.full_state(3, 2, w.device), ref.full_state(3, 2, w.device)
    g = torch.tensor([[0.5, -0.25], [1.0, 0.75]])
    for step, rows in enumerate([[0, 1], [1, 2], [0, 2], [0, 1]]):
        ref.l2 = 0.2 * max(1.0, (step + 1) / 2)
        idx = torch.tensor(rows)
        rule.apply(w, s, idx, g)
        ref.apply(w_ref, s_ref, idx, g)
        torch.testing.assert_close(w, w_ref)
    assert float(s["step"]) == 4


def test_row_prior_checks():
    from wdl.config import load_config
    from wdl.errors import ConfigError
    from wdl.train.optim import fused_table_optimizer

    # l2 on adagrad is a row prior now; l1 stays FTRL's
    assert load_config(ROOT / "configs" / "movielens-100k.yaml", ["optim.deep.l2=0.01"]).optim.deep.l2 == 0.01
    with pytest.raises(ConfigError, match="l1 is FTRL's"):
        load_config(ROOT / "configs" / "movielens-100k.yaml", ["optim.deep.l1=0.01"])
    # FBGEMM's kernels cannot apply it: refused, not ignored
    with pytest.raises(ConfigError, match="l2"):
        fused_table_optimizer(OptimizerConfig(name="adagrad", lr=0.1, l2=0.01), "cpu", "deep")
