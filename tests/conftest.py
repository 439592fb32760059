"""Shared fixtures: a tiny MovieLens-shaped data set written through the real DatasetWriter,
and a matching config."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests run side by side with torchrun children

from wdl.data.writer import DatasetWriter, column_stats  # noqa: E402


def make_tiny_dataset(out: Path, *, rows: int = 3000, seed: int = 0, row_group_rows: int = 256,
                      rows_per_file: int = 1024) -> Path:
    """Users x items with a planted preference, genres as multi-hot, a dense year column."""
    rng = np.random.default_rng(seed)
    n_users, n_items, n_genres = 50, 80, 6
    user_bias = rng.normal(0, 1, n_users + 1)
    item_bias = rng.normal(0, 1, n_items + 1)
    u = rng.integers(1, n_users + 1, rows)
    i = rng.integers(1, n_items + 1, rows)
    gender = (u % 2) + 1
    genre_lists = [sorted(set(rng.integers(1, n_genres + 1, rng.integers(0, 3)).tolist())) for _ in range(rows)]
    year = 1950 + (i % 50).astype(np.float32)
    logit = user_bias[u] + item_bias[i] + 0.5 * (gender == 1) * (i % 3 == 0)
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    table = pa.table({
        "user_id": pa.array(u, pa.int64()),
        "movie_id": pa.array(i, pa.int64()),
        "gender": pa.array(gender, pa.int64()),
        "genres": pa.array(genre_lists, pa.list_(pa.int64())),
        "release_year": pa.array(year, pa.float32()),
        "label": pa.array(label, pa.int8()),
    })
    n_train = int(rows * 0.8)
    with DatasetWriter(out, name="tiny", rows_per_file=rows_per_file, row_group_rows=row_group_rows) as w:
        w.write("train", table.slice(0, n_train))
        w.write("test", table.slice(n_train))
        w.commit(
            source={"kind": "tiny", "seed": seed},
            label="label",
            columns={
                "user_id": {"kind": "categorical", "vocab_size": n_users + 1},
                "movie_id": {"kind": "categorical", "vocab_size": n_items + 1},
                "gender": {"kind": "categorical", "vocab_size": 3},
                "genres": {"kind": "multi_hot", "vocab_size": n_genres + 1},
                "release_year": {"kind": "dense", **column_stats(year[:n_train])},
            },
            split={"kind": "head", "train_rows": n_train},
        )
    return out


TINY_CONFIG = """\
# Launch: python launch/train.py --config {path}
run: {{name: tiny, out_dir: {runs}, seed: 7, device: cpu}}
data: {{path: {data}, batch_size: 128, eval_batch_size: 256, in_memory: true}}
features:
  label: label
  columns:
    user_id: {{kind: categorical, vocab_size: auto}}
    movie_id: {{kind: categorical, vocab_size: auto}}
    gender: {{kind: categorical, vocab_size: auto}}
    genres: {{kind: multi_hot, vocab_size: auto}}
    release_year: {{kind: dense, normalize: standard}}
  crosses:
    gender_movie: {{columns: [gender, movie_id], hash_buckets: 500}}
    gender_genres: {{columns: [gender, genres], hash_buckets: 50}}
model:
  kind: wide_deep
  embedding_backend: torch
  wide: {{features: [user_id, movie_id, gender, genres, gender_movie, gender_genres]}}
  deep:
    embeddings: {{user_id: 8, movie_id: 8, genres: 4}}
    dense: [release_year]
    hidden: [32, 16]
    init_std: 0.05
optim:
  wide: {{name: ftrl, lr: 0.1}}
  deep: {{name: adam, lr: 0.01}}
train: {{epochs: 2, progress: false}}
"""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def tiny_config(tmp_path, tiny_data) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(path=path, runs=tmp_path / "runs", data=tiny_data))
    return path
