"""Row optimisers for wdl's fused embedding groups: a step reads and writes only the rows the
batch touched (see wdl.model.embeddings), so its cost is O(batch), whatever the table size.

Each rule is the per-row form of a known optimiser, written for a block of gathered rows:

    sgd              w -= lr * (g + wd * w)
    adagrad          s += g^2;                 w -= lr * g / (sqrt(s) + eps)       (torch.optim.Adagrad)
    rowwise_adagrad  s += mean(g^2) per row;   w -= lr * g / (sqrt(s) + eps)       (FBGEMM's ROWWISE_ADAGRAD)
    adam (lazy)      moments of touched rows only, bias-corrected by the global step (torch.optim.SparseAdam)
    ftrl             FTRL-Proximal per coordinate with L1/L2 (McMahan et al. 2013)

With `l2` (OptimizerConfig.l2), every rule but FTRL (whose closed form has its own) adds a prior
to a touched row's gradient, l2 * w * k / c with c the steps that have touched the row so far: a
row touched in a share c/t of t steps is then shrunk by l2 * k * w / t per step on average, as if
L2 of l2 / 2 * |w|^2 were added to the loss summed over the steps so far, for every row whatever
its frequency. That is FTRL's l2 in the same units, and Zhou et al. (2018)'s mini-batch aware
regularisation with running counts; plain weight decay on touched rows instead shrinks a row in
proportion to how often it is seen, and leaves rare rows, the ones that overfit, nearly free.
k = max(1, t / steps_per_pass) counts the passes over the train split: the prior is counted once
per pass, as each row's data is (FTRL's l2 is scaled the same way), so that more epochs do not
weaken it and a row seen once per epoch cannot memorise its label. With steps_per_pass 0, k is 1:
the online form, one prior for everything seen.

A row no batch touches is left exactly as it is. For sgd, adagrad and ftrl that is also what the
dense optimiser does (a zero gradient changes nothing), so the results equal dense training
(tests check this); lazy Adam and weight decay differ from their dense forms by design: they
act on touched rows only, as TensorFlow's LazyAdam and FBGEMM's kernels do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wdl.config import OptimizerConfig

State = dict[str, Tensor]


class RowRule:
    """One optimiser's update of a block of rows.

    init_state(rows, dim): per-row state tensors ([rows, dim] or [rows]) plus scalars ([]).
    update(w [U, dim], g [U, dim], s: the state of those rows, scalars as they are) -> new w, new s.
    """

    per_row: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    lr: float  # read at every step (the learning-rate schedule sets it)
    l2: float = 0.0  # the row prior (module docstring); FTRL applies its own
    steps_per_pass: int = 0  # steps in a pass over the train split: the prior counts once per pass
    compiled: Any = None  # `update` through torch.compile (see SparseTableOptimizer.compile)

    def init_state(self, rows: int, dim: int, device: torch.device) -> State:
        return {}

    def with_prior(self, l2: float, steps_per_pass: int = 0) -> "RowRule":
        """This rule with the row prior `l2` (module docstring): a touch count per row joins its state
        (and a step count, to count the passes)."""
        self.l2 = l2
        if l2 > 0:
            self.per_row = type(self).per_row + ("touches",)
            self.count_passes(steps_per_pass)
        return self

    def count_passes(self, steps_per_pass: int) -> None:
        """Count the steps (a scalar of the state), so that passes() knows how many passes were made."""
        self.steps_per_pass = steps_per_pass
        if steps_per_pass > 0 and "step" not in self.scalars:
            self.scalars = type(self).scalars + ("step",)

    def passes(self, s: State) -> Tensor | float:
        """max(1, steps so far / steps per pass): how many times the prior counts now."""
        if not self.steps_per_pass or "step" not in s:
            return 1.0
        return torch.clamp(s["step"] / self.steps_per_pass, min=1.0)

    def full_state(self, rows: int, dim: int, device: torch.device) -> State:
        """init_state, plus the touch counts and step count the prior needs."""
        state = self.init_state(rows, dim, device)
        if "touches" in self.per_row:
            state["touches"] = torch.zeros(rows, device=device)
        for k in self.scalars:
            state.setdefault(k, torch.zeros((), device=device))
        return state

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor, grad: Tensor) -> None:
        """Update `rows` of `weight` (and of the per-row state) in place."""
        for k in self.scalars:  # advanced by every rank every step, so they agree after resharding
            state[k].add_(1)
        s = {k: state[k].index_select(0, rows) for k in self.per_row} | {k: state[k] for k in self.scalars}
        w = weight.index_select(0, rows)
        if "touches" in s:
            touches = s.pop("touches").add_(1)
            grad = grad.addcmul(w, (self.l2 * self.passes(s) / touches).unsqueeze(1))
        update = self.compiled if self.compiled is not None else self.update
        w_new, s_new = update(w, grad, s)
        if "touches" in self.per_row:
            s_new["touches"] = touches
        weight.index_copy_(0, rows, w_new)
        for k in self.per_row:
            state[k].index_copy_(0, rows, s_new[k])


class SGDRule(RowRule):
    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr, self.wd = lr, weight_decay

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        if self.wd:
            g = g.add(w, alpha=self.wd)
        return w.add(g, alpha=-self.lr), s


class AdagradRule(RowRule):
    per_row = ("sum",)

    def __init__(self, lr: float, eps: float = 1e-10, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0) -> None:
        self.lr, self.eps, self.wd, self.init = lr, eps, weight_decay, initial_accumulator_value

    def init_state(self, rows: int, dim: int, device: torch.device) -> State:
        return {"sum": torch.full((rows, dim), self.init, device=device)}

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        if self.wd:
            g = g.add(w, alpha=self.wd)
        total = s["sum"].addcmul(g, g)
        return torch.addcdiv(w, g, total.sqrt().add_(self.eps), value=-self.lr), {"sum": total}


class RowwiseAdagradRule(AdagradRule):
    """One accumulator per row (4 bytes instead of 4 x dim): FBGEMM's default for large tables."""

    def init_state(self, rows: int, dim: int, device: torch.device) -> State:
        return {"sum": torch.full((rows,), self.init, device=device)}

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        if self.wd:
            g = g.add(w, alpha=self.wd)
        total = s["sum"] + (g * g).mean(dim=1)
        return torch.addcdiv(w, g, total.sqrt().add_(self.eps).unsqueeze(1), value=-self.lr), {"sum": total}


class LazyAdamRule(RowRule):
    per_row = ("exp_avg", "exp_avg_sq")
    scalars = ("step",)

    def __init__(self, lr: float, eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0) -> None:
        self.lr, self.eps, self.betas, self.wd = lr, eps, betas, weight_decay

    def init_state(self, rows: int, dim: int, device: torch.device) -> State:
        z = torch.zeros((rows, dim), device=device)
        return {"exp_avg": z, "exp_avg_sq": z.clone(), "step": torch.zeros((), device=device)}

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        b1, b2 = self.betas
        if self.wd:
            g = g.add(w, alpha=self.wd)
        m = torch.lerp(s["exp_avg"], g, 1 - b1)
        v = s["exp_avg_sq"].mul(b2).addcmul_(g, g, value=1 - b2)
        step = s["step"]
        # torch.optim.SparseAdam's arrangement: lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        step_size = self.lr * torch.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        return w - step_size * (m / v.sqrt().add_(self.eps)), {"exp_avg": m, "exp_avg_sq": v}


class FtrlRule(RowRule):
    """Per-coordinate FTRL-Proximal with L1 and L2. With g the gradient:

        sigma = (sqrt(n + g^2) - sqrt(n)) / lr
        z    += g - sigma * w
        n    += g^2
        w     = 0                                                  if |z| <= l1
              = -(z - sign(z) * l1) / ((beta + sqrt(n)) / lr + l2)  otherwise

    The weights are a function of (z, n), so a table must start at 0.
    """

    per_row = ("z", "n")

    def __init__(self, lr: float, l1: float = 0.0, l2: float = 0.0, beta: float = 1.0, steps_per_pass: int = 0) -> None:
        self.lr, self.l1, self.l2, self.beta = lr, l1, l2, beta
        if l2 > 0:  # l2 counted once per pass (module docstring)
            self.count_passes(steps_per_pass)

    def init_state(self, rows: int, dim: int, device: torch.device) -> State:
        z = torch.zeros((rows, dim), device=device)
        return {"z": z, "n": z.clone()}

    def update(self, w: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
        n_old = s["n"]
        n = n_old.addcmul(g, g)
        sqrt_n = n.sqrt()
        sigma = (sqrt_n - n_old.sqrt()) / self.lr
        z = s["z"] + g - sigma * w
        # -(z - clamp(z, -l1, l1)) is 0 where |z| <= l1 and -(z - sign(z) * l1) elsewhere
        w_new = (z.clamp(-self.l1, self.l1) - z) / ((self.beta + sqrt_n) / self.lr + self.l2 * self.passes(s))
        return w_new, {"z": z, "n": n}


def row_rule(cfg: OptimizerConfig, steps_per_pass: int = 0) -> RowRule:
    """The rule `cfg` names; steps_per_pass: steps in a pass over the train split (0: unknown),
    so that l2 counts once per pass (module docstring)."""
    if cfg.name == "ftrl":
        return FtrlRule(cfg.lr, cfg.l1, cfg.l2, cfg.beta, steps_per_pass)
    if cfg.name == "adagrad":
        rule: RowRule = AdagradRule(cfg.lr, cfg.eps, cfg.weight_decay, cfg.initial_accumulator_value)
    elif cfg.name == "rowwise_adagrad":
        rule = RowwiseAdagradRule(cfg.lr, cfg.eps, cfg.weight_decay, cfg.initial_accumulator_value)
    elif cfg.name == "adam":
        rule = LazyAdamRule(cfg.lr, cfg.eps, weight_decay=cfg.weight_decay)
    else:
        rule = SGDRule(cfg.lr, cfg.weight_decay)
    return rule.with_prior(cfg.l2, steps_per_pass)


class SparseTableOptimizer:
    """Applies one RowRule to the rows each step touched in its embedding groups.

    groups: name -> EmbeddingGroup (names key the checkpointed state). The state of each group
    lives beside its rows (on the same device, split the same way over ranks).
    """

    def __init__(self, groups: dict[str, Any], rule: RowRule) -> None:
        self.groups, self.rule = groups, rule
        self.param_groups = [{"lr": rule.lr}]  # as torch optimisers have it: the schedule sets it
        self.state: dict[str, State] = {}
        for name, g in groups.items():
            w = g.rows.weight
            self.state[name] = rule.full_state(w.shape[0], w.shape[1], w.device)

    def compile(self) -> None:
        """Run the rule's arithmetic (a dozen element-wise ops for FTRL) as one compiled kernel.
        Shapes vary with the rows a batch touches, hence dynamic."""
        self.rule.compiled = torch.compile(self.rule.update, dynamic=True)

    def zero_grad(self) -> None:
        """Nothing to clear: every forward pass makes a new working set."""

    @torch.no_grad()
    def step(self) -> None:
        self.rule.lr = self.param_groups[0]["lr"]
        for name, g in self.groups.items():
            pending = g.take_pending()
            if pending is None:
                continue
            ctx, working = pending
            grad = working.grad if working.grad is not None else torch.zeros_like(working)
            rows, grad = g.rows.push(ctx, grad)  # collective when the rows are split over ranks
            self.rule.apply(g.rows.weight, self.state[name], rows, grad)

    def state_dict(self) -> dict[str, Any]:
        """Per-row state as the rows' store exports it (split tensors stay split); in place for DCP."""
        return {name: {k: (self.groups[name].rows.export(t) if k in self.rule.per_row else t) for k, t in st.items()}
                for name, st in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """DCP has filled the tensors of `state_dict()` in place: nothing left to copy."""
