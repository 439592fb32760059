"""Shared by the peer scripts (run inside the peers' venvs: numpy and the standard library only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def load(folder: str):
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    data = np.load(folder / "features.npz")
    return meta, data


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUC with ties averaged (the same definition as ours and sklearn's)."""
    try:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(labels, scores))
    except ImportError:
        pass
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def emit(record: dict) -> None:
    print("BENCH " + json.dumps(record), flush=True)
    sys.stdout.flush()
