"""The fm term's pairs proposed from the data: pairs of embedded columns whose ids interact
through latent vectors (a user-item dot product), as `wdl data import` writes them into the
manifest (`proposed_fm_pairs`) and the training config it prints.

    ranked = sample.rank()                         # the crosses first (wdl.ingest.cross_proposal)
    pairs = ranked_pairs(sample, embedded_columns)  # every candidate pair, the proposed ones first

fm over every pair of many embedded columns fits the pairs without interaction as well: on the
planted Criteo-shaped set (nine columns embedded, one latent pair among their 36), the config
with fm over all pairs stopped at test AUC 0.8027, and 0.8153 with the latent pair alone. Such a
pair has millions of cells, too sparse for the crosses' score test; a fit of a few weights per
id is not.

The test. The sample's rows are split, HOLDOUT of them held out. The crosses' main-effects model
(every column and the chosen crosses) is fitted again on the rest; on top of its logits, each
candidate pair (A, B) gets a term <u_a, v_b> of RANK dimensions, every pair on its own (its
weights learn from its own loss), pass by pass of Adam over the fitted rows. A pair's z is the
paired t statistic of the held-out rows' log-loss gain from its term, at its best pass: passes
go on while some pair's z still rises, since on a small sample one pass leaves the vectors short
and on a large one later passes fit noise pairs to their rows. On the planted Criteo-shaped set
the latent pair scored z 13.6 and the best of the other 35 0.9; the MovieLens-shaped set's
user x movie 15.5 (benchmarks/results/cpu-x86_64-2c/import-quality-2026-12-08).
"""

from __future__ import annotations

import math

import numpy as np

from wdl.ingest.cross_proposal import Ids, MainEffects, TrainSample

HOLDOUT = 0.2  # share of the sample held out to score the pairs
RANK = 8  # each pair's latent dimensions in the test (the config's embeddings have their own)
# Adam's passes: batches of at most MAX_BATCH rows, smaller on a small sample so that a pass has
# STEPS steps (from INIT_STD, fewer leave the vectors too short to show a pair's gain).
MAX_BATCH, MIN_BATCH, STEPS, LR, INIT_STD = 1024, 64, 200, 0.01, 0.01
MAX_PASSES = 8
MIN_Z = 4.0  # proposed from this z (of 35 pairs without interaction above, the highest scored 0.9)
MAX_PROPOSED = 6  # pairs proposed at most, the highest z first
MIN_ROWS_PER_ID = 3  # an id seen on fewer fitted rows shares one vector with the others like it
PARAM_BUDGET = 16_000_000  # the test's weights at most (x3 with Adam's state, float32): columns
# join the test, the fewest ids first, while their pairs' weights fit
RANKED_KEPT = 20  # ranked pairs recorded in the manifest


def ranked_pairs(sample: TrainSample, embedded: list[str], seed: int = 0) -> list[dict]:
    """Every candidate pair of the `embedded` columns, most significant first: {columns, z,
    gain (held-out log loss per row)}, `proposed: true` on those chosen. `sample.rank()` first."""
    y, columns = sample.labels, {c.name: c for c in sample.model_columns}
    if len(y) == 0 or y.min() == y.max():
        return []
    held = _held_out(len(y), seed)
    fit = ~held
    if held.sum() == 0 or y[fit].min() == y[fit].max():
        return []
    model = MainEffects(y[fit], [c.take(fit) for c in sample.model_columns])
    offsets = {"fit": model.eta.astype(np.float32),
               "held": model.logits([c.take(held) for c in sample.model_columns], int(held.sum())).astype(np.float32)}
    rows = {"fit": int(fit.sum()), "held": int(held.sum())}
    ids = {n: _Split(columns[n].take(fit), columns[n].take(held), rows) for n in embedded if n in columns}
    probed = _within_budget(ids)
    pairs = [(a, b) for i, a in enumerate(probed) for b in probed[i + 1:]]
    if not pairs:
        return []
    gains = _pair_gains(pairs, ids, y[fit], y[held], offsets, seed)
    scored = [{"columns": [a, b], "z": round(float(z), 2), "gain": round(float(g), 5)}
              for (a, b), (g, z) in zip(pairs, gains)]
    scored.sort(key=lambda s: -s["z"])
    for s in scored[:MAX_PROPOSED]:
        if s["z"] >= MIN_Z:
            s["proposed"] = True
    return scored


def proposed(ranked: list[dict]) -> list[list[str]]:
    """The pairs `ranked_pairs` chose."""
    return [s["columns"] for s in ranked if s.get("proposed")]


def manifest_entry(sample: TrainSample, ranked: list[dict], seed: int = 0) -> dict:
    """What the manifest records of the proposal (`proposed_fm_pairs`)."""
    held = int(_held_out(sample.labels.size, seed).sum())
    return {"method": f"held-out log-loss gain of each pair's rank-{RANK} latent term over the crosses' main-effects "
                      "model, fitted on its own by Adam (its best pass), as a paired z",
            "sample_rows": int(sample.labels.size), "held_out_rows": held, "candidates": len(ranked),
            "min_z": MIN_Z, "max_proposed": MAX_PROPOSED, "proposed": proposed(ranked), "ranked": ranked[:RANKED_KEPT]}


def _held_out(rows: int, seed: int) -> np.ndarray:
    """Which of the sample's rows are held out: a seeded HOLDOUT share."""
    return np.random.default_rng(seed).random(rows) < HOLDOUT


class _Split:
    """A column's ids renumbered to those seen on at least MIN_ROWS_PER_ID fitted rows (from 1;
    0 stands for the others), per part ("fit", "held"): (ids, and for a list column the first
    element of each row, with one past the last, else None)."""

    def __init__(self, fit: Ids, held: Ids, rows: dict[str, int]) -> None:
        counts = np.bincount(fit.ids, minlength=fit.size)
        number = np.zeros(fit.size, np.int64)
        frequent = counts >= MIN_ROWS_PER_ID
        number[frequent] = np.arange(1, int(frequent.sum()) + 1)
        self.size = int(frequent.sum()) + 1
        self.parts = {part: (number[c.ids], None if c.rows is None else np.searchsorted(c.rows, np.arange(rows[part] + 1)))
                      for part, c in (("fit", fit), ("held", held))}


def _within_budget(ids: dict[str, _Split]) -> list[str]:
    """The columns tested: the fewest ids first while all their pairs' weights fit PARAM_BUDGET."""
    out: list[str] = []
    for name in sorted(ids, key=lambda n: ids[n].size):
        trial = out + [name]
        if RANK * (len(trial) - 1) * sum(ids[n].size for n in trial) > PARAM_BUDGET:
            break
        out = trial
    return sorted(out, key=list(ids).index)


def _pair_gains(pairs: list[tuple[str, str]], ids: dict[str, _Split], y_fit: np.ndarray, y_held: np.ndarray,
                offsets: dict[str, np.ndarray], seed: int) -> list[tuple[float, float]]:
    """(mean held-out log-loss gain, its paired z) of each pair's latent term, fitted on its own."""
    import torch

    names = sorted({n for p in pairs for n in p}, key=list(ids).index)
    slots = {n: [p for p in pairs if n in p] for n in names}  # the pairs each column's table serves
    gen = torch.Generator().manual_seed(seed)
    tables = {n: torch.nn.Parameter(torch.randn(ids[n].size, len(slots[n]) * RANK, generator=gen) * INIT_STD)
              for n in names}
    # each pair's two vectors as positions in the columns' gathered vectors, concatenated
    start = dict(zip(names, np.cumsum([0] + [len(slots[n]) for n in names])))
    left = torch.tensor([start[a] + slots[a].index((a, b)) for a, b in pairs])
    right = torch.tensor([start[b] + slots[b].index((a, b)) for a, b in pairs])

    def terms(part: str, rows: torch.Tensor) -> torch.Tensor:
        vecs = torch.cat([_gather(tables[n], *ids[n].parts[part], rows).view(len(rows), -1, RANK) for n in names], 1)
        return (vecs[:, left] * vecs[:, right]).sum(-1)  # [rows, pairs]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of MAX_BATCH rows at most: more threads wait on each other more than they add
    try:
        return _fitted_gains(tables, terms, y_fit, y_held, offsets, gen)
    finally:
        torch.set_num_threads(threads)


def _fitted_gains(tables: dict, terms, y_fit: np.ndarray, y_held: np.ndarray, offsets: dict[str, np.ndarray],
                  gen) -> list[tuple[float, float]]:
    """Passes of Adam over the fitted rows, each followed by every pair's held-out gain and its z;
    each pair's best pass by z, once no pair's z rose by 0.1 in a pass (or after MAX_PASSES)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(tables.values(), lr=LR)
    y, eta = torch.from_numpy(y_fit.astype(np.float32)), torch.from_numpy(offsets["fit"])
    batch = int(np.clip(len(y) // STEPS, MIN_BATCH, MAX_BATCH))
    best = None
    for _ in range(MAX_PASSES):
        for rows in torch.randperm(len(y), generator=gen).split(batch):
            z = eta[rows, None] + terms("fit", rows)
            loss = F.binary_cross_entropy_with_logits(z, y[rows, None].expand_as(z), reduction="none").mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores = _held_out_gains(terms, y_held, offsets["held"])
        better = best is None or scores[:, 1] > best[:, 1] + 0.1
        if best is not None and not better.any():
            break
        best = scores if best is None else torch.where(better[:, None], scores, best)
    return [(float(g), float(z)) for g, z in best]


def _held_out_gains(terms, y_held: np.ndarray, offsets: np.ndarray):
    """[pairs, 2]: each pair's mean held-out log-loss gain and its z."""
    import torch
    import torch.nn.functional as F

    y, eta = torch.from_numpy(y_held.astype(np.float32)), torch.from_numpy(offsets)
    total = 0  # per pair: the gains' sum and sum of squares
    with torch.no_grad():
        for rows in torch.arange(len(y)).split(16 * MAX_BATCH):
            z = eta[rows, None] + terms("held", rows)
            yy = y[rows, None].expand_as(z)
            gain = (F.binary_cross_entropy_with_logits(eta[rows, None].expand_as(z), yy, reduction="none")
                    - F.binary_cross_entropy_with_logits(z, yy, reduction="none")).double()
            total += torch.stack([gain.sum(0), (gain ** 2).sum(0)])
    n = len(y)
    mean = total[0] / n
    sd = ((total[1] - n * mean ** 2).clamp(min=0) / max(n - 1, 1)).sqrt()
    return torch.stack([mean, torch.where(sd > 0, mean / sd * math.sqrt(n), torch.zeros_like(sd))], 1)


def _gather(table, ids: np.ndarray, starts: np.ndarray | None, batch):
    """The table's rows for the `batch` rows: an id's, or the mean of a list's elements (`starts`:
    each row's first element)."""
    import torch
    import torch.nn.functional as F

    if starts is None:
        return table[torch.from_numpy(ids)[batch]]
    first, count = torch.from_numpy(starts[:-1])[batch], torch.from_numpy(np.diff(starts))[batch]
    offsets = torch.cumsum(count, 0) - count
    element = torch.repeat_interleave(first - offsets, count) + torch.arange(int(count.sum()))
    return F.embedding_bag(torch.from_numpy(ids)[element], table, offsets, mode="mean")
