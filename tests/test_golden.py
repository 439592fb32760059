"""Golden metrics: the exact per-epoch trajectory of a tiny fixed run.

Every other quality check in the suite is a range (`0.6 < auc`); a change that quietly makes
training worse (a wrong gradient scale, a skipped row, an optimiser state read one step late)
can stay inside a range. Here a tiny run of `wdl train` (in this process, one rank, CPU, one
torch thread, fixed seed, a data set written by this module) must reproduce its recorded
train loss, AUC and logloss for every epoch to 1e-6.

Updating the golden values (only for a change that is MEANT to alter the arithmetic: say so in
the commit message, with the reason):

    .venv/bin/python -m pytest tests/test_golden.py -q

prints, for each backend that differs, the new trajectory as Python literals: paste them over
that backend's entry of `GOLDEN` below, run the command twice more (the values must not move
between runs), and commit. A change that was NOT meant to alter the arithmetic and fails here is
a regression (or a new source of nondeterminism): find it, do not update the numbers.

The values were recorded with torch 2.13.0 (CPU build), fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0,
on x86-64 with torch's AVX2 kernels. Another kernel set sums in another order: the scalar kernels
(ATEN_CPU_CAPABILITY=default) moved no value by more than 3e-8, well inside TOL; three runs in a
row were bit-identical. A failure prints the largest difference (`max diff`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from wdl.cli import main
from wdl.data.column_stats import column_stats
from wdl.data.writer import DatasetWriter
from wdl.model.embeddings import torchrec_available

TOL = 1e-6
KEYS = ("train_loss", "auc", "logloss")  # per epoch, from metrics.jsonl

# backend -> one (train_loss, auc, logloss) per epoch. See the module docstring to update.
GOLDEN = {
    "torch": [
        (0.6840054988861084, 0.753615127919911, 0.6729405334783161),
        (0.6172699292500814, 0.7600111234705228, 0.5998320055491618),
        (0.5428531845410665, 0.7614015572858732, 0.5956318848078175),
    ],
    "torchrec": [
        (0.6840054909388225, 0.753615127919911, 0.672940533261722),
        (0.6172699292500814, 0.7600111234705228, 0.5998320013052194),
        (0.5428531805674235, 0.7614015572858732, 0.5956318714775417),
    ],
}


def write_golden_dataset(out: Path) -> Path:
    """600 rows (480 train, 120 test) with a planted user x item signal, a multi-hot and a
    dense column: every part of the model has something to learn."""
    rng = np.random.default_rng(12345)
    rows, n_users, n_items, n_tags = 600, 30, 40, 5
    user_bias, item_bias = rng.normal(0, 1, n_users + 1), rng.normal(0, 1, n_items + 1)
    u, i = rng.integers(1, n_users + 1, rows), rng.integers(1, n_items + 1, rows)
    gender = (u % 2) + 1
    tags = [sorted(set(rng.integers(1, n_tags + 1, rng.integers(0, 3)).tolist())) for _ in range(rows)]
    year = 1950 + (i % 50).astype(np.float32)
    logit = user_bias[u] + item_bias[i] + 0.8 * (gender == 1) * (i % 3 == 0) - 0.5 * np.array([1 in t for t in tags])
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    table = pa.table({
        "user_id": pa.array(u, pa.int64()), "movie_id": pa.array(i, pa.int64()),
        "gender": pa.array(gender, pa.int64()), "genres": pa.array(tags, pa.list_(pa.int64())),
        "release_year": pa.array(year, pa.float32()), "label": pa.array(label, pa.int8()),
    })
    n_train = 480
    with DatasetWriter(out, name="golden", row_group_rows=128) as w:
        w.write("train", table.slice(0, n_train))
        w.write("test", table.slice(n_train))
        w.commit(source={"kind": "golden"}, label="label", split={"kind": "head", "train_rows": n_train},
                 columns={"user_id": {"kind": "categorical", "vocab_size": n_users + 1},
                          "movie_id": {"kind": "categorical", "vocab_size": n_items + 1},
                          "gender": {"kind": "categorical", "vocab_size": 3},
                          "genres": {"kind": "multi_hot", "vocab_size": n_tags + 1},
                          "release_year": {"kind": "dense", **column_stats(year[:n_train])}})
    return out


# The whole config is here (not the shared tiny config), so that only a change of the code moves
# the numbers. Dropout is on: the run's RNG seeding is part of what is pinned.
CONFIG = """\
run: {{name: golden, out_dir: {runs}, seed: 11, device: cpu}}
data: {{path: {data}, batch_size: 64, eval_batch_size: 256, in_memory: true}}
features:
  label: label
  columns:
    user_id: {{kind: categorical, vocab_size: auto}}
    movie_id: {{kind: categorical, vocab_size: auto}}
    gender: {{kind: categorical, vocab_size: auto}}
    genres: {{kind: multi_hot, vocab_size: auto}}
    release_year: {{kind: dense, normalize: standard}}
  crosses:
    gender_movie: {{columns: [gender, movie_id], hash_buckets: 97}}
    gender_genres: {{columns: [gender, genres], hash_buckets: 13}}
model:
  kind: wide_deep
  embedding_backend: {backend}
  wide: {{features: [user_id, movie_id, gender, genres, gender_movie, gender_genres]}}
  deep:
    embeddings: {{user_id: 8, movie_id: 8, genres: 4}}
    dense: [release_year]
    hidden: [16, 8]
    dropout: 0.1
    init_std: 0.05
optim:
  wide: {{name: ftrl, lr: 0.1, l1: 0.001}}
  deep: {{name: adagrad, lr: 0.05}}
train: {{epochs: 3, progress: false}}
checkpoint: {{at_epoch_end: false}}
"""


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> Path:
    return write_golden_dataset(tmp_path_factory.mktemp("golden") / "data")


def trajectory(root: Path, data: Path, backend: str) -> list[tuple[float, ...]]:
    """Train the golden run in this process on one torch thread; its per-epoch KEYS."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "golden.yaml"
    config.write_text(CONFIG.format(runs=root / "runs", data=data, backend=backend))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order for every reduction
    try:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["train", "--config", str(config)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, out.getvalue()[-2000:] + err.getvalue()[-2000:]
    records = [json.loads(line) for line in (root / "runs" / "golden" / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in KEYS) for r in records]


def mismatch(backend: str, got: list[tuple[float, ...]]) -> str:
    want = GOLDEN[backend]
    diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)]
    lines = "\n".join(f"        ({', '.join(repr(v) for v in epoch)})," for epoch in got)
    return (f"the golden run's trajectory moved ({backend} backend; max diff "
            f"{max(diffs) if diffs and len(got) == len(want) else 'n/a'}; keys {KEYS} per epoch).\n"
            f"If the change was meant to alter the arithmetic, replace GOLDEN[{backend!r}] in {__file__} with:\n"
            f"    {backend!r}: [\n{lines}\n    ],\nelse it is a regression.")


BACKENDS = ["torch", pytest.param("torchrec", marks=pytest.mark.skipif(
    not torchrec_available(), reason="torchrec + fbgemm-gpu-cpu not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_trajectory(tmp_path, golden_data, backend, caplog):
    caplog.set_level(logging.WARNING)  # TorchRec's INFO records would bury the new trajectory on failure
    got = trajectory(tmp_path, golden_data, backend)
    want = GOLDEN[backend]
    ok = len(got) == len(want) and all(math.isclose(a, b, rel_tol=0, abs_tol=TOL)
                                       for g, w in zip(got, want) for a, b in zip(g, w))
    assert ok, mismatch(backend, got)
