import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from wdl.config import DeepConfig, ModelConfig, WideConfig
from wdl.model.embeddings import torchrec_available
from wdl.model.wide_deep import WideDeep, WideDeepTrain
from wdl.train.evaluate import binary_metrics
from wdl.train.optim import FTRL

from helpers import ROOT, TOY_SIZES, needs_compiler, toy_batch


def model(kind="wide_deep", backend="torch"):
    cfg = ModelConfig(kind=kind, embedding_backend=backend,
                      wide=WideConfig(features=["u", "m", "g", "x"]),
                      deep=DeepConfig(embeddings={"u": 4, "m": 4, "g": 2}, dense=["d0", "d1"], hidden=[8, 4],
                                      init_std=0.1))
    m = WideDeep(cfg, TOY_SIZES, dense_dim=2)
    m.init_parameters(seed=11)
    return m


@pytest.mark.parametrize("kind", ["wide_deep", "wide", "deep"])
def test_shapes_and_ablations(kind):
    m = model(kind)
    out = m(toy_batch())
    assert out.shape == (6,)
    assert (m.wide is None) == (kind == "deep") and (m.deep is None) == (kind == "wide")
    # every parameter belongs to exactly one part: dense ones, or the rows of a fused table
    parts = m.parts().values()
    listed = [p for part in parts for p in part.dense] + [g.rows.weight for part in parts for g in part.tables]
    assert sorted(map(id, listed)) == sorted(map(id, m.parameters()))


def test_wide_part_is_a_sparse_linear_model():
    m = model("wide")
    with torch.no_grad():
        for f, w in m.wide.embeddings.weights().items():
            w.copy_(torch.arange(w.shape[0], dtype=torch.float32).unsqueeze(1) * (1 + len(f)))
        m.wide.embeddings.rows.weight[m.wide.embeddings.bias_row] = 0.5  # the bias: a row every example reads
    b = toy_batch()
    expected = 0.5 + sum(
        torch.zeros(6).index_add_(0, torch.repeat_interleave(torch.arange(6), b.sparse[f].lengths.long()),
                                  b.sparse[f].values.float() * (1 + len(f)))
        for f in ["u", "m", "g", "x"]
    )
    assert torch.allclose(m(b), expected)


@pytest.mark.skipif(not torchrec_available(), reason="torchrec not installed")
def test_backends_compute_the_same_function_from_the_same_seed():
    a, b = model(backend="torch"), model(backend="torchrec")
    x = toy_batch(b=32, seed=3)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    # and the same gradients, so the same training trajectory under the same optimiser: wdl's
    # tables put them on the working set of touched rows, TorchRec's (unsharded) on the weights
    la, lb = WideDeepTrain(a)(x)[0], WideDeepTrain(b)(x)[0]
    la.backward()
    lb.backward()
    gb = {f: w.grad for f, w in b.deep.embeddings.weights().items()}
    for g in a.deep.embeddings.groups:
        (rows, _), working = g.take_pending()
        full = torch.zeros(g.num_rows, g.dim).index_add_(0, rows, working.grad)
        for f, lo, hi in zip(g.keys, g.offsets, g.offsets[1:]):
            assert torch.allclose(full[lo:hi], gb[f], atol=1e-6)


def test_ftrl_matches_hand_worked_example():
    # One coordinate, alpha=0.5, beta=1, l1=0.1, l2=0.2; gradients 1.0 then -0.5.
    w = torch.nn.Parameter(torch.zeros(1))
    opt = FTRL([w], lr=0.5, l1=0.1, l2=0.2, beta=1.0)
    # step 1: n=0 -> sigma=(sqrt(1)-0)/0.5=2, z=1-2*0=1, n=1,
    #         w=-(1-0.1)/((1+1)/0.5+0.2) = -0.9/4.2
    w.grad = torch.tensor([1.0])
    opt.step()
    assert w.item() == pytest.approx(-0.9 / 4.2)
    # step 2: sigma=(sqrt(1.25)-1)/0.5, z=1-0.5-sigma*w, n=1.25, w=-(z-0.1)/((1+sqrt(1.25))/0.5+0.2)
    w_prev = -0.9 / 4.2
    sigma = (math.sqrt(1.25) - 1) / 0.5
    z = 1 - 0.5 - sigma * w_prev
    w.grad = torch.tensor([-0.5])
    opt.step()
    assert w.item() == pytest.approx(-(z - 0.1) / ((1 + math.sqrt(1.25)) / 0.5 + 0.2))
    # |z| <= l1 gives exactly zero (sparsity)
    v = torch.nn.Parameter(torch.zeros(1))
    o = FTRL([v], lr=0.5, l1=2.0)
    v.grad = torch.tensor([1.0])
    o.step()
    assert v.item() == 0.0


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 1e-6, 1 - 1e-6)
    m = binary_metrics(p, y)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["logloss"] == pytest.approx(log_loss(y, p))
    assert m["calibration"] == pytest.approx(p.mean() / y.mean())
    assert m["rows"] == 500


def test_train_module_owns_the_loss():
    m = model()
    x = toy_batch()
    loss, (detached, logits, labels) = WideDeepTrain(m)(x)
    assert loss.requires_grad and not detached.requires_grad
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))


def test_byte_dropout_drops_p_and_rescales():
    from wdl.model.wide_deep import ByteDropout

    torch.manual_seed(0)
    d = ByteDropout(0.5)
    x = torch.ones(1000, 100)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.5) < 0.01
    assert torch.all((y == 0) | (y == 2.0))  # kept units are scaled by 1 / (1 - p)
    assert abs(y.mean().item() - 1.0) < 0.02
    d.eval()
    assert torch.equal(d(x), x)
    x.requires_grad_(True)
    d.train()
    out = d(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2.0)  # the gradient goes through the same mask



@pytest.mark.slow
@needs_compiler
def test_compiled_head_computes_the_eager_function():
    """train.compile: the deep part's head through torch.compile gives the eager logits and
    gradients (this model has no dropout, so both compute the same function); evaluation uses
    the eager head."""
    m = model("deep")
    batch = toy_batch(32)
    eager = m(batch)
    eager.sum().backward()
    grads = [p.grad.clone() for p in m.deep.mlp.parameters()]
    m.zero_grad()
    m.deep.compile_head()
    compiled = m(batch)
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-6)
    for g, p in zip(grads, m.deep.mlp.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-6)
    m.eval()
    assert m.deep._compiled_head is not None and torch.allclose(m(batch), eager, atol=1e-6)

    # Compiled, ByteDropout hands over to the compiler's own dropout, at the same rate.
    from wdl.model.wide_deep import ByteDropout

    y = torch.compile(ByteDropout(0.5))(torch.ones(1000, 100))
    assert abs((y == 0).float().mean().item() - 0.5) < 0.01 and torch.all((y == 0) | (y == 2.0))


def test_a_training_batch_sizes_look_up_tables_outlive_many_other_sizes():
    """A step captured as a CUDA graph reads the per-bag index tensors of its batch size with no
    reference of its own: evaluating batches of many other sizes must not drop them."""
    m = model()
    m.train()
    m(toy_batch(6))
    group = m.wide.embeddings
    kept = dict(group._bag_cache)
    m.eval()
    with torch.no_grad():
        for b in range(1, 20):
            m(toy_batch(b + 6))
    for key, tensors in kept.items():
        assert all(a is b for a, b in zip(group._bag_cache[key], tensors))
    assert len(group._bag_cache) <= 10


def test_mean_pooling_averages_a_rows_ids_in_both_parts():
    """model.pooling {g: mean}: the wide weight and the deep vector of a multi-hot feature are the
    mean of its ids' rows (0 for a row with none), the other features still summed; TorchRec's
    tables (PoolingType.MEAN) compute the same function."""
    import dataclasses

    b = toy_batch(b=32, seed=5)
    plain = model("wide")
    with torch.no_grad():
        for f, w in plain.wide.embeddings.weights().items():
            w.normal_(generator=torch.Generator().manual_seed(len(f)))
    wide = ModelConfig(kind="wide", wide=WideConfig(features=["u", "m", "g", "x"]))
    mean = WideDeep(dataclasses.replace(wide, pooling={"g": "mean"}), TOY_SIZES, dense_dim=2)
    mean.load_state_dict(plain.state_dict())
    lengths = b.sparse["g"].lengths.long()
    rows = torch.repeat_interleave(torch.arange(32), lengths)
    g_w = plain.wide.embeddings.weights()["g"].squeeze(1)
    g_sum = torch.zeros(32).index_add_(0, rows, g_w[b.sparse["g"].values])
    assert lengths.max() > 1 and wide.pooling == {}
    torch.testing.assert_close(mean(b), plain(b) - g_sum + g_sum / lengths.clamp(min=1))
    if torchrec_available():
        deep = {backend: WideDeep(ModelConfig(kind="deep", embedding_backend=backend, pooling={"g": "mean"},
                                              deep=DeepConfig(embeddings={"u": 4, "g": 4}, hidden=[8], init_std=0.1)),
                                  TOY_SIZES, dense_dim=0) for backend in ("torch", "torchrec")}
        for m in deep.values():
            m.init_parameters(seed=3)
        torch.testing.assert_close(deep["torch"](b), deep["torchrec"](b), atol=1e-6, rtol=1e-5)


def test_pooling_applies_to_multi_valued_features_only():
    from wdl.config import load_config
    from wdl.errors import ConfigError

    config = ROOT / "configs" / "movielens-100k.yaml"
    assert load_config(config, ["model.pooling={genres: mean, gender_genres: mean}"]).model.pooling["genres"] == "mean"
    with pytest.raises(ConfigError, match="model.pooling: 'user_id' is not a multi_hot column"):
        load_config(config, ["model.pooling={user_id: mean}"])
