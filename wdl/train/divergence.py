"""Stopping a run that has gone wrong, beyond a loss that is NaN or inf.

A learning rate far too high can leave the loss finite (1e25) and the AUC at chance, and a run
that only checked for NaN would finish with exit 0. The yardstick is the constant predictor: the
logloss of always predicting the train split's label rate (its entropy)."""

from __future__ import annotations

import math

from wdl.errors import TrainingError

_ADVICE = "lower optim.wide.lr / optim.deep.lr"


def entropy(rate: float) -> float:
    """The logloss of always predicting `rate` on labels with that positive rate (0 for one class)."""
    return -sum(p * math.log(p) for p in (rate, 1.0 - rate) if p > 0)


class Divergence:
    """The two checks, against the constant predictor's logloss of the train split."""

    def __init__(self, ratio: float, positive_rate: float) -> None:
        self.ratio = ratio  # train.divergence_ratio (0: only NaN / inf)
        self.base = entropy(positive_rate)

    def check_loss(self, loss: float, where: str) -> None:
        """A TrainingError when the train loss over `where` is not finite or passes ratio x base."""
        if math.isfinite(loss) and not (self.ratio and self.base and loss > self.ratio * self.base):
            return
        how = f"{loss:.4g}, {loss / self.base:.3g}x the {self.base:.4f} of always predicting the label rate" \
            if math.isfinite(loss) else f"{loss}"
        raise TrainingError(f"training diverged: the train loss over {where} is {how}; {_ADVICE} "
                            "(nothing saved since the last check it passed)")

    def check_chance(self, auc: float | None, loss: float, before: float, split: str, step: int) -> None:
        """A TrainingError when the AUC is chance's after a first evaluation (`before`: the previous
        interval's loss) while the train loss rises above the constant predictor's."""
        if auc is None or not math.isfinite(auc) or abs(auc - 0.5) >= 0.01 or not math.isfinite(before):
            return
        if loss > before and self.base and loss > self.base:
            raise TrainingError(f"training diverged: {split} AUC {auc:.4f} at step {step} is chance's while the train "
                                f"loss rose to {loss:.4g} (from {before:.4g}; always predicting the label rate gives "
                                f"{self.base:.4f}); {_ADVICE}")
