"""Model selection on a validation split: which epoch is best, and when to stop.

The test split plays no part: it is scored once, at the end, with the selected epoch's model.
"""

from __future__ import annotations

import math
from typing import Any

from wdl.config import EarlyStoppingConfig


class Selection:
    """Tracks the best epoch by `cfg.metric` (AUC: higher is better; logloss: lower). An epoch
    counts as better only when it beats the best by more than `cfg.min_delta`; with
    `cfg.patience` > 0, training stops after that many epochs without a better one."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.last_epoch = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record `epoch`'s validation value; True when it is the new best."""
        self.last_epoch = epoch
        if value is None or not math.isfinite(value):
            return False
        sign = 1.0 if self.cfg.metric == "auc" else -1.0
        if self.best_value is not None and sign * (value - self.best_value) <= self.cfg.min_delta:
            return False
        self.best_value, self.best_epoch = value, epoch
        return True

    def replay(self, records: list[dict[str, Any]]) -> list[bool]:
        """Rebuild the state from the epochs already logged (after a resume); per epoch, whether
        it was a new best."""
        return [self.update(r["epoch"], r.get(self.cfg.metric)) for r in records]

    def should_stop(self) -> bool:
        since = self.last_epoch - (self.best_epoch if self.best_epoch is not None else 0)
        return self.cfg.patience > 0 and since >= self.cfg.patience

    def describe(self) -> str:
        name = "AUC" if self.cfg.metric == "auc" else "logloss"
        return f"valid {name} {self.best_value:.4f} at epoch {self.best_epoch}"
