"""Explicit interactions (dot, fm) and embedding dropout in the deep part: values and gradients
against a per-pair reference, config errors, both backends, eval mode, checkpoint signature."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from wdl.config import DeepConfig, ModelConfig, WideConfig, load_config
from wdl.errors import ConfigError
from wdl.model.embeddings import torchrec_available
from wdl.model.interactions import PairwiseInteraction
from wdl.model.wide_deep import WideDeep, WideDeepTrain

from helpers import TOY_SIZES, toy_batch

DIMS = {"a": 4, "b": 3, "c": 4, "d": 4, "e": 3}


def naive(vectors: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> torch.Tensor:
    """One dot product per pair in a Python loop: [B, P]."""
    return torch.stack([(vectors[a] * vectors[b]).sum(dim=1) for a, b in pairs], dim=1)


def split(x: torch.Tensor, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    return dict(zip(dims, x.split(list(dims.values()), dim=1)))


@pytest.mark.parametrize("case", ["all", "pairs"])
@pytest.mark.parametrize("kind", ["dot", "fm"])
def test_values_and_gradients_match_a_per_pair_reference(kind, case):
    if case == "all":
        dims = {f: 4 for f in "abcd"}
        pairs = list(itertools.combinations(dims, 2))
        given = None
    else:  # two dimensions, pairs not in feature order, a feature in several pairs
        dims = DIMS
        pairs = [("c", "a"), ("b", "e"), ("a", "d"), ("d", "c")]
        given = pairs
    inter = PairwiseInteraction(dims, given, kind)
    x = torch.randn(5, sum(dims.values()), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = naive(split(x2, dims), pairs)
    # pairs come out grouped by dimension (4: c.a, a.d, d.c; then 3: b.e)
    order = [pairs.index(p) for p in pairs if dims[p[0]] == 4] + [pairs.index(p) for p in pairs if dims[p[0]] == 3]
    ref = ref[:, order] if kind == "dot" else ref.sum(dim=1)
    out = inter(x1)
    assert out.shape == ((5, len(pairs)) if kind == "dot" else (5,))
    assert inter.num_outputs == (len(pairs) if kind == "dot" else 0)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)


def _cfg(*overrides: str):
    base = ["features.columns={u: {vocab_size: 10}, m: {vocab_size: 7}, g: {kind: multi_hot, vocab_size: 5}}",
            "model.wide.features=[u, m]", "model.deep.embeddings={u: 8, m: 8, g: 4}"]
    return load_config(None, [*base, *overrides])


def test_config_errors_name_features_and_dims():
    with pytest.raises(ConfigError, match=r"^model.deep.interaction=dot over all pairs needs one embedding dimension, "
                                          r"got u 8, m 8, g 4; make them equal"):
        _cfg("model.deep.interaction=dot")
    with pytest.raises(ConfigError, match=r"interaction_pairs\[0\]: u \(dim 8\) and g \(dim 4\) need the same"):
        _cfg("model.deep.interaction=fm", "model.deep.interaction_pairs=[[u, g]]")
    with pytest.raises(ConfigError, match=r"interaction_pairs\[0\]: x not in model.deep.embeddings"):
        _cfg("model.deep.interaction=dot", "model.deep.interaction_pairs=[[u, x]]")
    with pytest.raises(ConfigError, match=r"interaction=none"):
        _cfg("model.deep.interaction_pairs=[[u, m]]")
    with pytest.raises(ConfigError, match=r"embedding_dropout: must be in \[0, 1\)"):
        _cfg("model.deep.embedding_dropout=1.0")
    with pytest.raises(ConfigError, match=r"not one of none, dot, fm"):
        _cfg("model.deep.interaction=cross")
    cfg = _cfg("model.deep.interaction=dot", "model.deep.interaction_pairs=[[u, m]]")
    assert cfg.model.deep.interaction_pairs == [["u", "m"]]
    _cfg("model.deep.interaction=fm", "model.deep.embeddings={u: 8, m: 8, g: 8}")


def model(backend: str, interaction: str, pairs=(), embedding_dropout: float = 0.0):
    cfg = ModelConfig(kind="wide_deep", embedding_backend=backend, wide=WideConfig(features=["u", "m", "x"]),
                      deep=DeepConfig(embeddings={"u": 4, "m": 4, "g": 2}, dense=["d0", "d1"], hidden=[8, 4],
                                      init_std=0.3, interaction=interaction, interaction_pairs=[list(p) for p in pairs],
                                      embedding_dropout=embedding_dropout))
    m = WideDeep(cfg, TOY_SIZES, dense_dim=2)
    m.init_parameters(seed=5)
    return m


@pytest.mark.parametrize("interaction,pairs", [("dot", [("u", "m")]), ("fm", [("m", "u")])])
def test_deep_part_with_interaction(interaction, pairs):
    m = model("torch", interaction, pairs)
    lin = m.deep.mlp[0]
    assert lin.in_features == 4 + 4 + 2 + 2 + (1 if interaction == "dot" else 0)
    x = toy_batch(b=16, seed=1)
    base = model("torch", "none")
    if interaction == "fm":  # the same MLP weights: the logits differ by exactly <u, m>
        p = base.deep.embeddings(x)
        assert torch.allclose(m(x), base(x) + (p["u"] * p["m"]).sum(1), atol=1e-6)
    loss, _ = WideDeepTrain(m)(x)
    loss.backward()
    assert all(p.grad is not None for p in m.deep.mlp.parameters())


@pytest.mark.skipif(not torchrec_available(), reason="torchrec not installed")
@pytest.mark.parametrize("interaction,pairs", [("dot", [("u", "m")]), ("fm", [])])
def test_both_backends_give_the_same_logits(interaction, pairs):
    if interaction == "fm":  # all pairs need one dimension
        def build(backend):
            cfg = ModelConfig(kind="deep", embedding_backend=backend,
                              deep=DeepConfig(embeddings={"u": 4, "m": 4, "g": 4}, dense=["d0", "d1"], hidden=[8],
                                              init_std=0.3, interaction="fm"))
            out = WideDeep(cfg, TOY_SIZES, dense_dim=2)
            out.init_parameters(seed=5)
            return out
        a, b = build("torch"), build("torchrec")
    else:
        a, b = model("torch", interaction, pairs), model("torchrec", interaction, pairs)
    x = toy_batch(b=32, seed=3)
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_embedding_dropout_trains_only():
    m = model("torch", "dot", [("u", "m")], embedding_dropout=0.5)
    plain = model("torch", "dot", [("u", "m")])
    x = toy_batch(b=64, seed=2)
    m.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(m(x), plain(x))  # eval: no dropout, the same function
    m.train()
    plain.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(m(x), plain(x))


def test_checkpoint_signature_includes_the_interaction():
    from wdl.train.build import model_signature

    spec = SimpleNamespace(crosses={}, dense_dim=0, missing_columns=[], num_embeddings=lambda f: 10)  # what model_signature reads
    none = _cfg().model
    dot = _cfg("model.deep.interaction=dot", "model.deep.interaction_pairs=[[u, m]]").model
    fm = _cfg("model.deep.interaction=fm", "model.deep.interaction_pairs=[[u, m]]").model
    sigs = [model_signature(c, spec) for c in (none, dot, fm)]
    assert "interaction" not in sigs[0]  # checkpoints from before interactions existed still load
    assert sigs[0] != sigs[1] != sigs[2] != sigs[0]
