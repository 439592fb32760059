"""Model selection on a validation split: which evaluation's model is best, and when to stop.

Selection ticks on evaluations (train.eval_every_steps; by default one per epoch end). The test
split plays no part: it is scored once, at the end, with the selected model.
"""

from __future__ import annotations

import math

import torch

from wdl.config import EarlyStoppingConfig


class Selection:
    """Tracks the best evaluation by `cfg.metric` (AUC: higher is better; logloss: lower). One
    counts as better only when it beats the best by more than `cfg.min_delta`; with
    `cfg.patience` > 0, training stops after that many evaluations without a better one."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None  # the epoch (1-based) the best evaluation fell in
        self.best_at_epoch_end = True  # said as "at epoch E" rather than "at step S (epoch E)"
        self.last_epoch = 0
        self.since_best = 0  # evaluations since the best (all of them while there is none)

    def update(self, step: int, epoch: int, value: float | None, at_epoch_end: bool = True) -> bool:
        """Record the evaluation at `step` (in `epoch`); True when it is the new best."""
        self.last_epoch = epoch
        sign = 1.0 if self.cfg.metric == "auc" else -1.0
        if value is None or not math.isfinite(value) or (
                self.best_value is not None and sign * (value - self.best_value) <= self.cfg.min_delta):
            self.since_best += 1
            return False
        self.best_value, self.best_step, self.best_epoch = value, step, epoch
        self.best_at_epoch_end, self.since_best = at_epoch_end, 0
        return True

    def should_stop(self) -> bool:
        return self.cfg.patience > 0 and self.since_best >= self.cfg.patience

    def describe(self) -> str:
        name = "AUC" if self.cfg.metric == "auc" else "logloss"
        where = f"epoch {self.best_epoch}" if self.best_at_epoch_end else f"step {self.best_step} (epoch {self.best_epoch})"
        return f"valid {name} {self.best_value:.4f} at {where}"

    # A checkpoint holds this state as one float64 tensor (NaN / -1 for "none yet"): DCP stores
    # tensors the same way for any number of ranks, and nothing is pickled.
    def state_dict(self) -> dict[str, torch.Tensor]:
        none = self.best_value is None
        return {"best": torch.tensor([math.nan if none else self.best_value, -1 if none else self.best_step,
                                      -1 if none else self.best_epoch, float(self.best_at_epoch_end),
                                      self.last_epoch, self.since_best], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        value, step, epoch, at_end, last, since = state["best"].tolist()
        none = step < 0
        self.best_value = None if none else value
        self.best_step, self.best_epoch = (None, None) if none else (int(step), int(epoch))
        self.best_at_epoch_end, self.last_epoch, self.since_best = bool(at_end), int(last), int(since)
