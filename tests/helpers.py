"""Plain helpers shared by test modules: `from helpers import records, one_line_error, ...`.

Fixtures (the tiny data set and config, built once per session; an unwritable folder) live in
conftest.py; these are ordinary functions and constants, called with arguments, often several
times in one test (a run's records, an error line, a TSV line). As fixtures they would have to be
factories returning these same functions, which only hides them; and conftest.py is pytest's
plugin file, not a module to import from. Test modules never import each other: what two of them
share lives here.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from wdl.data.batch import Batch, Jagged
from wdl.data.column_stats import column_stats
from wdl.data.manifest import load_manifest
from wdl.data.writer import DatasetWriter
from wdl.train.build import cpu_compiler

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- the tiny data set
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


def write_tiny_config(folder: Path, data: Path, name: str = "tiny.yaml") -> Path:
    """TINY_CONFIG for `data`, its runs under folder/runs; the config file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(TINY_CONFIG.format(path=path, runs=folder / "runs", data=data))
    return path


# ---------------------------------------------------------------------- runs and their output
def records(run: Path) -> list[dict]:
    """A run folder's epoch records in metrics.jsonl, one dict per epoch (step and eval records left out)."""
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()
            if (r := json.loads(line)).get("kind", "epoch") == "epoch"]


def one_line_error(err: str, *needles: str) -> str:
    """stderr is exactly one `error: ...` line holding every needle; that line."""
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line, err
    for n in needles:
        assert n in line, line
    return line


def read_split(out: Path, split: str) -> pa.Table:
    """All rows of a data set's split, in the manifest's file order."""
    return pa.concat_tables([pq.read_table(f.path) for f in load_manifest(out).split(split).files])


# --------------------------------------------------------------------------- Criteo TSV lines
def criteo_line(label=1, dense=None, cats=None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([str(label), *dense, *cats]) + "\n"


def random_lines(n: int, seed: int = 0) -> list[str]:
    """n well-formed lines with missing values, negatives and a few repeated categorical values."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 1000))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 50)) * 2654435761 % 2**32:08x}" for _ in range(26)]
        out.append(criteo_line(int(rng.random() < 0.3), dense, cats))
    return out


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ----------------------------------------------------------------------------- subprocesses
def side_by_side(*calls):
    """Each of `calls` (functions of no arguments that start a subprocess and wait for it, such
    as `lambda: subprocess.run(...)`) called at once, each in its own thread: their results, in
    order (the first exception raised, if any). A new Python spends most of its seconds importing
    torch on one core; commands that do not depend on each other take the second core instead of
    waiting in turn."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


# ------------------------------------------------------------------- torchrun launches (CPU, gloo)
def torchrun(config: Path, nproc: int, *args: str, max_restarts: int = 0, timeout: int = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`launch/train.py --config config args` under torchrun with `nproc` processes, as a user
    launches it (`env`: variables set for it besides this process's): the finished process
    (stdout, stderr, returncode); a launch still going after `timeout` seconds fails the test
    with the end of its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}"]
    # a stuck collective fails with a traceback well before the test's own timeout
    cmd += [str(ROOT / "launch" / "train.py"), "--config", str(config), "run.collective_timeout_s=90", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # show where it stood, not just that it timed out
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd[-6:])}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# The two table back-ends as the torchrun tests run them. TorchRec sharding where it is installed:
# the user table column-wise, the others table-wise, so one launch covers two of the sharding types
# the CPU offers. The user table is 256 wide because TorchRec's column shards are at least 128
# columns: narrower, "column_wise" is one shard on one rank and nothing is split. Elsewhere (a
# torch-only machine) the same runs go through plain DDP.
RUN_TORCHREC = ["model.embedding_backend=torchrec", "optim.deep.name=adagrad", "optim.deep.lr=0.05",
                "model.deep.embeddings={user_id: 256, movie_id: 8, genres: 4}",
                "distributed.sharding=table_wise", "distributed.tables={deep_user_id: column_wise}"]
# wdl's own fused tables, split row-wise over the ranks (any machine), dense layers in DDP.
RUN_FUSED = ["model.embedding_backend=torch"]
# The shared uninterrupted 2-process runs (conftest.py's two_rank_run): 2 epochs, a checkpoint every 4 steps.
UNINTERRUPTED = ["train.epochs=2", "checkpoint.every_steps=4"]


# torch.compile on a CPU builds C++ kernels: its tests need a compiler
needs_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")


# ------------------------------------------------------------- a toy batch for model unit tests
TOY_SIZES = {"u": 10, "m": 7, "g": 5, "x": 50}  # rows of each sparse feature of toy_batch


def toy_batch(b: int = 6, seed: int = 0) -> Batch:
    """b rows: scalar u, m, x, multi-hot g (0-2 ids a row), two dense columns, 0/1 labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (b,), generator=g, dtype=torch.int32)
    return Batch(
        dense=torch.randn(b, 2, generator=g),
        sparse={
            "u": Jagged(torch.randint(0, 10, (b,), generator=g), torch.ones(b, dtype=torch.int32)),
            "m": Jagged(torch.randint(0, 7, (b,), generator=g), torch.ones(b, dtype=torch.int32)),
            "g": Jagged(torch.randint(0, 5, (int(lengths.sum()),), generator=g), lengths),
            "x": Jagged(torch.randint(0, 50, (b,), generator=g), torch.ones(b, dtype=torch.int32)),
        },
        labels=torch.randint(0, 2, (b,), generator=g).float(),
    )


SHOP_CONFIG = """\
run: {{name: {name}, out_dir: {runs}, seed: 1, device: cpu}}
data: {{path: {data}, batch_size: 256, eval_batch_size: 512, eval_split: test, in_memory: true}}
features:
  label: clicked
  columns:
    user: {{kind: categorical, vocab_size: auto}}
    item: {{kind: categorical, vocab_size: auto}}
    tags: {{kind: multi_hot, vocab_size: auto}}
    price: {{kind: dense, normalize: log1p}}
  crosses:
    user_item: {{columns: [user, item], hash_buckets: 97}}
model:
  embedding_backend: torch
  wide: {{features: [user, item, tags, user_item]}}
  deep: {{embeddings: {{user: 4, item: 4, tags: 4}}, dense: [price], hidden: [8]}}
train: {{epochs: 1, progress: false}}
"""


def write_shop_config(path: Path, data: Path, runs: Path, name: str) -> Path:
    """A one-epoch config for a shop-like set imported by `wdl data import` (columns user, item,
    tags, price; label clicked), its runs under `runs`."""
    path.write_text(SHOP_CONFIG.format(name=name, runs=runs, data=data))
    return path
