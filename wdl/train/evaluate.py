"""Evaluation: AUC, logloss and calibration over the whole split, exactly.

Every rank scores its own rows; scores and labels are gathered so the metrics are those of
the full split (averaging per-rank AUCs is wrong). The metrics themselves come from
scikit-learn.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from wdl.data.batch import Batch
from wdl.data.prefetch import to_device
from wdl.distributed.env import all_gather_cat


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """scores: probabilities [N]; labels: {0, 1} [N]."""
    from sklearn.metrics import log_loss, roc_auc_score  # 2-3 s to import: only when a split is scored

    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    both = 0.0 < y.mean() < 1.0
    return {
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "calibration": float(p.mean() / y.mean()) if y.mean() > 0 else float("nan"),
        "rows": int(y.size),
    }


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int) -> dict[str, float]:
    """NDCG@k and Recall@k of each group's rows ranked by score (ties in row order), averaged
    over the groups with at least one positive. scores, labels, groups: [N]."""
    order = np.lexsort((-scores, groups))  # by group, then score descending (lexsort is stable)
    g, y = groups[order], labels[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    top = rank < k
    discount = 1.0 / np.log2(rank + 2.0)
    dcg = np.add.reduceat(np.where(top, y * discount, 0.0), starts)
    hits = np.add.reduceat(np.where(top, y, 0.0), starts)
    positives = np.add.reduceat(y, starts)
    ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(positives, k).astype(int) - 1]
    has = positives > 0
    if not has.any():
        return {f"ndcg@{k}": float("nan"), f"recall@{k}": float("nan")}
    return {f"ndcg@{k}": float(np.mean(dcg[has] / ideal[has])), f"recall@{k}": float(np.mean(hits[has] / positives[has]))}


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], device: torch.device,
            group: str | None = None) -> tuple[torch.Tensor, ...]:
    """Probabilities and labels of this rank's rows, on CPU (and the ids of the `group` column).

    `model` is the training module (WideDeepTrain, maybe sharded or in DDP): Batch ->
    (loss, (loss, logits, labels)). Going through it keeps sharded look-ups collective.
    """
    was_training = model.training
    model.eval()
    scores, labels, groups = [], [], []
    for batch in to_device(batches, device):
        _, (_, logits, _) = model(batch)
        scores.append(torch.sigmoid(logits.float()))
        labels.append(batch.labels)
        if group:
            groups.append(batch.sparse[group].values)
    model.train(was_training)
    if not scores:
        return (torch.empty(0),) * (3 if group else 2)
    out = (torch.cat(scores).cpu(), torch.cat(labels).cpu())
    return out + (torch.cat(groups).cpu(),) if group else out


def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, group: str = "",
             k: int = 10) -> dict[str, float]:
    """Global metrics of the split (identical on every rank); with a `group` column, its
    ranking metrics too."""
    out = [all_gather_cat(t) for t in predict(model, batches, device, group or None)]
    metrics = binary_metrics(out[0].numpy(), out[1].numpy())
    if group:
        metrics |= ranking_metrics(out[0].numpy(), out[1].numpy(), out[2].numpy(), k)
    return metrics
