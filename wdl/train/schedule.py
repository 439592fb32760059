"""The learning-rate schedule: one multiplier on the configured learning rates (all but FTRL's:
see wdl.train.optim._follows_schedule).

    scale = warm-up(step) x plateau decay
    warm-up(step) = min(1, (step + 1) / warmup_steps)     linear over the first steps
    plateau decay: x plateau_factor each time `plateau_patience` epochs pass without a better
                   validation metric (the epochs are counted again from each decay), down to
                   min_scale

The decay is a function of the validation history, which the metrics log keeps; a resumed run
replays it (`replay`) instead of checkpointing the multiplier.
"""

from __future__ import annotations

from wdl.config import ScheduleConfig


class LrSchedule:
    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.decay = 1.0
        self._epochs_without_gain = 0

    def warming_up(self, step: int) -> bool:
        """True while `step` (0-based, the step about to run) is in the warm-up."""
        return step < self.cfg.warmup_steps

    def scale(self, step: int) -> float:
        """The multiplier for the step about to run."""
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        return warm * self.decay

    def epoch_end(self, improved: bool) -> bool:
        """Record whether the epoch bettered the validation metric; True when the rates decay now."""
        if self.cfg.plateau_factor >= 1.0:
            return False
        self._epochs_without_gain = 0 if improved else self._epochs_without_gain + 1
        if self._epochs_without_gain < self.cfg.plateau_patience:
            return False
        self._epochs_without_gain = 0
        decayed = max(self.cfg.min_scale, self.decay * self.cfg.plateau_factor)
        changed, self.decay = decayed != self.decay, decayed
        return changed

    def replay(self, improvements: list[bool]) -> None:
        """Rebuild the decay from the epochs already trained (after a resume)."""
        for improved in improvements:
            self.epoch_end(improved)
