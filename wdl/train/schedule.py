"""The learning-rate schedule: one multiplier on the configured learning rates (all but FTRL's:
see wdl.train.optim._follows_schedule).

    scale = warm-up(step) x plateau decay
    warm-up(step) = min(1, (step + 1) / warmup_steps)     linear over the first steps
    plateau decay: x plateau_factor each time `plateau_patience` evaluations pass without a
                   better validation metric (counted again from each decay), down to min_scale

The decay and its count are state: a checkpoint saves them (`state_dict`), so a resumed run goes
on with the same multiplier.
"""

from __future__ import annotations

import torch

from wdl.config import ScheduleConfig


class LrSchedule:
    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.decay = 1.0
        self._evals_without_gain = 0

    def warming_up(self, step: int) -> bool:
        """True while `step` (0-based, the step about to run) is in the warm-up."""
        return step < self.cfg.warmup_steps

    def scale(self, step: int) -> float:
        """The multiplier for the step about to run."""
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        return warm * self.decay

    def evaluated(self, improved: bool) -> bool:
        """Record whether an evaluation bettered the validation metric; True when the rates decay now."""
        if self.cfg.plateau_factor >= 1.0:
            return False
        self._evals_without_gain = 0 if improved else self._evals_without_gain + 1
        if self._evals_without_gain < self.cfg.plateau_patience:
            return False
        self._evals_without_gain = 0
        decayed = max(self.cfg.min_scale, self.decay * self.cfg.plateau_factor)
        changed, self.decay = decayed != self.decay, decayed
        return changed

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"decay_and_count": torch.tensor([self.decay, float(self._evals_without_gain)], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        decay, count = state["decay_and_count"].tolist()
        self.decay, self._evals_without_gain = decay, int(count)
