"""Optimisers behind one interface, whichever embedding backend runs.

A model's parameters fall into three kinds, each with its own optimiser, all stepped and
checkpointed together by `Optimizers`:

- dense parameters (the MLP, the bias): a torch optimiser (or FTRL, below), by part;
- wdl's fused embedding groups: a `SparseTableOptimizer` per part, updating touched rows only;
- TorchRec's tables: FBGEMM's kernels applied in the backward pass (`fused_table_optimizer`
  names the class; the sharding module installs it before sharding, as TorchRec requires).

FTRL-Proximal is not in torch.optim; `FTRL` here is its dense form (for dense parameters whose
part is trained with FTRL), built on the same per-coordinate rule as the row optimiser.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from wdl.config import OptimConfig, OptimizerConfig
from wdl.errors import ConfigError
from wdl.train.sparse_optim import FtrlRule, SparseTableOptimizer, row_rule


class FTRL(torch.optim.Optimizer):
    """Per-coordinate FTRL-Proximal with L1 and L2 on dense parameters (see FtrlRule).

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
        for group in self.param_groups:  # state exists from the start, so a checkpoint can load into it
            for p in group["params"]:
                self.state[p] = {"z": torch.zeros_like(p), "n": torch.zeros_like(p)}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            rule = FtrlRule(group["lr"], group["l1"], group["l2"], group["beta"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                w, new = rule.update(p, p.grad, state)
                p.copy_(w)
                state["z"].copy_(new["z"])
                state["n"].copy_(new["n"])


def dense_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter], capturable: bool = False) -> torch.optim.Optimizer:
    """capturable: the step will be captured in a CUDA graph (Adam then keeps its step count on
    the device; the other optimisers here need nothing)."""
    if cfg.name == "ftrl":
        return FTRL(params, lr=cfg.lr, l1=cfg.l1, l2=cfg.l2, beta=cfg.beta)
    # torch's fused kernels update every parameter in one call, where its default on CPU is a
    # Python loop of ~6 ops per parameter (42 ops and 7 host reads of `step` per MovieLens step).
    devices = {p.device.type for p in params}
    fused = {"fused": True} if devices and devices <= {"cpu", "cuda"} else {}
    if cfg.name in ("adagrad", "rowwise_adagrad"):  # row-wise is a table layout; dense layers use plain AdaGrad
        # torch's fused AdaGrad is CPU-only before torch 2.13 (its first step on CUDA raises);
        # on CUDA, torch's default multi-tensor (foreach) AdaGrad is a few kernels anyway.
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   initial_accumulator_value=cfg.initial_accumulator_value,
                                   **(fused if devices == {"cpu"} else {}))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                **fused, **({"capturable": True} if capturable else {}))
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def fused_table_optimizer(cfg: OptimizerConfig, device_type: str, part: str) -> tuple[type, dict[str, Any]]:
    """The torch optimiser class TorchRec maps to an FBGEMM kernel for `part`'s tables, and its args."""
    where = f"optim.{part}.name={cfg.name}"
    if cfg.name == "ftrl":
        raise ConfigError(f"{where}: FBGEMM has no FTRL kernel for TorchRec tables; use model.embedding_backend=torch "
                          "(wdl's own tables run FTRL sparse and sharded)")
    if cfg.name == "adam" and device_type != "cuda":
        raise ConfigError(f"{where}: FBGEMM has no Adam for TorchRec tables on CPU; use model.embedding_backend=torch "
                          "(lazy Adam on wdl's own tables) or adagrad / rowwise_adagrad / sgd")
    # FBGEMM's kernels take lr and eps only.
    if cfg.weight_decay or cfg.l2 or (cfg.name in ("adagrad", "rowwise_adagrad") and cfg.initial_accumulator_value):
        raise ConfigError(f"{where} fused into TorchRec tables supports lr and eps only; set weight_decay, l2 and "
                          "initial_accumulator_value to 0 or use model.embedding_backend=torch")
    if cfg.name == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.name == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "eps": cfg.eps}
    return torch.optim.SGD, {"lr": cfg.lr}


class NamedOptimizer:
    """A torch optimiser over named parameters; its state is checkpointed by parameter name,
    so it loads into any world size and any wrapping (DDP, DMP). Hyperparameters come from the
    config, not from the checkpoint."""

    def __init__(self, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.named, self.optimizer = named, optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        self._materialise_state()
        return {name: dict(self.optimizer.state[p]) for name, p in self.named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """DCP has filled the tensors of `state_dict()` in place; copy in case it replaced any."""
        for name, p in self.named.items():
            for k, v in state[name].items():
                cur = self.optimizer.state[p][k]
                if isinstance(cur, torch.Tensor) and cur is not v:
                    cur.copy_(v)

    @torch.no_grad()
    def _materialise_state(self) -> None:
        """torch optimisers create state at their first step; make it exist (a zero-lr step on
        zero gradients changes no parameter) so a checkpoint can be loaded into it."""
        params = list(self.named.values())
        if all(p in self.optimizer.state and self.optimizer.state[p] for p in params):
            return
        grads = [p.grad for p in params]
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


class Optimizers:
    """Several named optimisers stepped together; state is checkpointed by name. Each has
    `param_groups` whose "lr" it reads at every step (TorchRec's fused optimiser too, when it
    hands the rate to FBGEMM), so `scale_lr` reaches every part."""

    def __init__(self, optimizers: dict[str, Any]) -> None:
        self.optimizers = {k: v for k, v in optimizers.items() if v is not None}
        self._base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()
                         if _follows_schedule(o)}

    def rates(self) -> tuple[float, ...]:
        """Every learning rate now in force (a step captured as a CUDA graph holds them as constants)."""
        return tuple(float(g["lr"]) for o in self.optimizers.values() for g in o.param_groups)

    def scale_lr(self, scale: float) -> None:
        """Every learning rate = the configured one x `scale` (the schedule's multiplier),
        except FTRL's (see _follows_schedule)."""
        for k, base in self._base_lr.items():
            for group, lr in zip(self.optimizers[k].param_groups, base):
                group["lr"] = lr * scale

    def compile(self) -> None:
        """The row optimisers' arithmetic through torch.compile (train.compile)."""
        for o in self.optimizers.values():
            if isinstance(o, SparseTableOptimizer):
                o.compile()

    def zero_grad(self) -> None:
        for o in self.optimizers.values():
            o.zero_grad()

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


def _follows_schedule(optimizer: Any) -> bool:
    """FTRL's rate is part of its closed-form weights, w = -(z - sign(z) l1) / ((beta + sqrt(n)) / lr
    + l2): scaling it would rescale at once every weight learned so far (a plateau decay of 0.5
    halves the wide model). FTRL already anneals per coordinate, so it keeps its configured rate."""
    inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "rule", None)
    return not isinstance(inner, (FTRL, FtrlRule))


def build_optimizers(model: nn.Module, cfg: OptimConfig, fused: Any = None, capturable: bool = False,
                     steps_per_pass: int = 0) -> Optimizers:
    """One optimiser per part (wide, deep) for dense parameters and one per part for wdl's
    embedding groups; `fused` is TorchRec's in-backward optimiser for its tables, if any;
    `capturable`: steps will be captured in a CUDA graph; `steps_per_pass`: the steps of an
    epoch, so that the tables' l2 counts once per pass (wdl.train.sparse_optim).

    model: the WideDeep (unwrapped; DDP and DMP keep its parameter objects).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, Any] = {}
    for part, p in model.parts().items():
        ocfg: OptimizerConfig = getattr(cfg, part)
        if p.dense:
            out[part] = NamedOptimizer({names[id(x)]: x for x in p.dense}, dense_optimizer(ocfg, p.dense, capturable))
        if p.tables:
            out[f"{part}_tables"] = SparseTableOptimizer({group_names[id(g)]: g for g in p.tables},
                                                          row_rule(ocfg, steps_per_pass))
    if fused is not None:
        out["fused"] = fused
    return Optimizers(out)
