"""Optimisers: the paper's FTRL-Proximal for the wide part, AdaGrad/Adam/SGD from torch.

FTRL-Proximal (McMahan et al., "Ad Click Prediction: a View from the Trenches", 2013) is not
in torch.optim, so it is written here; it accepts dense and sparse (nn.EmbeddingBag
sparse=True) gradients and, for sparse ones, touches only the rows in the batch.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from wdl.config import OptimizerConfig


class FTRL(torch.optim.Optimizer):
    """Per-coordinate FTRL-Proximal with L1 and L2.

    With g the gradient, for every coordinate:
        sigma = (sqrt(n + g^2) - sqrt(n)) / lr
        z    += g - sigma * w
        n    += g^2
        w     = 0                                                  if |z| <= l1
              = -(z - sign(z) * l1) / ((beta + sqrt(n)) / lr + l2)  otherwise
    Parameters must start at 0 (the weights are a function of z and n).

    The gradients here are of the batch-MEAN loss, about 1/batch_size of the per-example ones
    the paper's settings assume, so sqrt(n) stays small: beta ~1 then dominates the step size
    and the wide part barely learns. Use a small beta (configs/movielens-100k.yaml: 0.001), and
    read l1/l2 as acting on that scale too.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.05, l1: float = 0.0, l2: float = 0.0,
                 beta: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"FTRL lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, l1=l1, l2=l2, beta=beta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, l1, l2, beta = group["lr"], group["l1"], group["l2"], group["beta"]
            dense: list[tuple[Tensor, dict]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = torch.zeros_like(p)
                    state["n"] = torch.zeros_like(p)
                    state["step"] = torch.zeros((), dtype=torch.int64)
                state["step"] += 1
                if p.grad.is_sparse:
                    z, n = state["z"], state["n"]
                    g = p.grad.coalesce()
                    rows, gv = g.indices()[0], g.values()
                    w_rows = _ftrl_rows(p[rows], z[rows], n[rows], gv, lr, l1, l2, beta, z, n, rows)
                    p.index_copy_(0, rows, w_rows)
                else:
                    dense.append((p, state))
            if dense:
                _ftrl_dense_many(dense, lr, l1, l2, beta)


def _ftrl_dense_many(items: list[tuple[Tensor, dict]], lr: float, l1: float, l2: float, beta: float) -> None:
    """The FTRL update for many dense tensors at once with torch's multi-tensor (_foreach) ops:
    a wide part has a table per feature, and one kernel per op and table dominated the step."""
    ps = [p for p, _ in items]
    gs = [p.grad for p, _ in items]
    zs = [s["z"] for _, s in items]
    ns = [s["n"] for _, s in items]
    sqrt_old = torch._foreach_sqrt(ns)
    torch._foreach_addcmul_(ns, gs, gs)  # n += g^2
    sqrt_new = torch._foreach_sqrt(ns)
    sigma = torch._foreach_sub(sqrt_new, sqrt_old)
    torch._foreach_div_(sigma, lr)
    torch._foreach_add_(zs, gs)  # z += g - sigma * w
    torch._foreach_sub_(zs, torch._foreach_mul(sigma, ps))
    # w = -(z - clamp(z, -l1, l1)) / ((beta + sqrt(n)) / lr + l2): zero where |z| <= l1
    shrunk = torch._foreach_sub(zs, torch._foreach_clamp_max(torch._foreach_clamp_min(zs, -l1), l1))
    denom = torch._foreach_add(sqrt_new, beta)
    torch._foreach_div_(denom, lr)
    torch._foreach_add_(denom, l2)
    w = torch._foreach_div(shrunk, denom)
    torch._foreach_neg_(w)
    torch._foreach_copy_(ps, w)


def _ftrl_solve(z: Tensor, n: Tensor, lr: float, l1: float, l2: float, beta: float) -> Tensor:
    w = -(z - torch.sign(z) * l1) / ((beta + n.sqrt()) / lr + l2)
    return torch.where(z.abs() <= l1, torch.zeros_like(w), w)


def _ftrl_rows(w: Tensor, z_r: Tensor, n_r: Tensor, g: Tensor, lr: float, l1: float, l2: float, beta: float,
               z: Tensor, n: Tensor, rows: Tensor) -> Tensor:
    n_new = n_r + g * g
    sigma = (n_new.sqrt() - n_r.sqrt()) / lr
    z_new = z_r + g - sigma * w
    z.index_copy_(0, rows, z_new)
    n.index_copy_(0, rows, n_new)
    return _ftrl_solve(z_new, n_new, lr, l1, l2, beta)


def build_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "ftrl":
        return FTRL(params, lr=cfg.lr, l1=cfg.l1, l2=cfg.l2, beta=cfg.beta)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   initial_accumulator_value=cfg.initial_accumulator_value)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Optimizers:
    """Several named optimisers stepped together; state is checkpointed by name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = {k: v for k, v in optimizers.items() if v is not None}

    def zero_grad(self) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])
