"""End to end through the command line: prepare MovieLens (GroupLens layout), train, bad input.

One case runs the real `python -m wdl.cli train` in a new process; the others call the same
command's entry point in this process (its own error handling included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, one_line_error, records
from wdl.cli import main
from wdl.ingest import movielens as ml
from wdl.model.embeddings import torchrec_available

CONFIG = ROOT / "configs" / "movielens-100k.yaml"
QUICK = ["train.progress=false", "model.embedding_backend=torch", "data.batch_size=256",
         "model.deep.hidden=[32,16]"]


def wdl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "wdl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def write_grouplens_100k(root: Path, users: int = 60, movies: int = 50, ratings: int = 4000) -> Path:
    """A small ml-100k in GroupLens's own layout, with a planted user x movie signal."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    occupations = ["technician", "writer", "artist", "other"]
    (root / "u.user").write_text("".join(
        f"{u}|{rng.integers(15, 70)}|{'MF'[u % 2]}|{occupations[u % 4]}|{rng.integers(10000, 99999)}\n"
        for u in range(1, users + 1)))
    items = []
    for m in range(1, movies + 1):
        flags = ["1" if (m + i) % 5 == 0 else "0" for i in range(len(ml.ML100K_GENRES))]
        items.append("|".join([str(m), f"Movie {m} ({1950 + m})", f"01-Jan-{1950 + m}", "", "http://x"] + flags))
    (root / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    taste, appeal = rng.normal(0, 1.5, users + 1), rng.normal(0, 1.5, movies + 1)
    u = rng.integers(1, users + 1, ratings)
    m = rng.integers(1, movies + 1, ratings)
    p = 1 / (1 + np.exp(-(taste[u] + appeal[m])))
    r = np.where(rng.random(ratings) < p, rng.integers(4, 6, ratings), rng.integers(1, 4, ratings))
    (root / "u.data").write_text("".join(f"{a}\t{b}\t{c}\t{880000000 + i}\n" for i, (a, b, c) in enumerate(zip(u, m, r))))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ml")
    src = write_grouplens_100k(base / "raw")
    out = base / "ml-small"
    assert main(["data", "prepare", "movielens", "--variant", "ml-100k", "--source", str(src), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_prepare_then_train_two_epochs(prepared, tmp_path):
    proc = wdl("train", "--config", str(CONFIG), f"data.path={prepared}", f"run.out_dir={tmp_path}",
               "train.epochs=2", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch | train loss | valid AUC" in proc.stdout  # the shipped config selects on validation
    run = tmp_path / "movielens-100k"
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    keys = {"epoch", "train_loss", "auc", "logloss", "calibration", "train_seconds", "eval_seconds",
            "samples_per_second", "rows", "train_rows"}
    for r in recs:
        assert keys <= set(r)
        # the default 80/20 split, 10% of the train rows held out for validation
        assert r["train_rows"] == 2880 and r["rows"] == 320 and r["eval_split"] == "valid"
        assert 0.0 < r["train_loss"] < 0.75 and 0.0 < r["logloss"] < 0.75
        assert 0.6 < r["auc"] <= 1.0 and 0.5 < r["calibration"] < 1.5
        assert r["train_seconds"] > 0 and r["samples_per_second"] > 0
    assert recs[1]["train_loss"] < recs[0]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_auc"] == max(r["auc"] for r in recs)
    saved = (run / "config.yaml").read_text()
    assert "batch_size: 256" in saved  # the resolved config, overrides included


def train(*args: str) -> int:
    """`wdl train` in this process: the command's own error handling, without paying for a new
    Python and torch import per case (test_prepare_then_train_two_epochs runs the real command)."""
    return main(["train", "--config", str(CONFIG), *args])


def test_a_second_run_never_overwrites_the_first(prepared, tmp_path):
    args = [f"data.path={prepared}", f"run.out_dir={tmp_path}", "train.epochs=1", *QUICK]
    assert train(*args) == 0
    first = (tmp_path / "movielens-100k" / "metrics.jsonl").read_text()
    assert train(*args) == 0
    assert (tmp_path / "movielens-100k" / "metrics.jsonl").read_text() == first
    assert (tmp_path / "movielens-100k-1" / "metrics.jsonl").exists()


@pytest.mark.skipif(not torchrec_available(), reason="torchrec not installed")
def test_both_embedding_backends_give_the_same_auc(prepared, tmp_path):
    """Same seed, same optimiser arithmetic: TorchRec's tables (FBGEMM AdaGrad) vs wdl's fused tables."""
    common = [f"data.path={prepared}", f"run.out_dir={tmp_path}", "train.epochs=2", "train.progress=false",
              "data.batch_size=256", "model.deep.hidden=[32,16]"]
    assert train(*common, "run.name=torch", "model.embedding_backend=torch") == 0
    assert train(*common, "run.name=torchrec", "model.embedding_backend=torchrec", "distributed.sharding=table_wise") == 0
    a, b = records(tmp_path / "torch"), records(tmp_path / "torchrec")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["auc"] == pytest.approx(y["auc"], abs=1e-6)
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)


def refused(capsys, args: list[str], *needles: str) -> None:
    """`wdl train args` exits 2 with one `error:` line holding every needle."""
    capsys.readouterr()
    rc = train(*args)
    cap = capsys.readouterr()
    assert rc == 2, cap.out[-2000:] + cap.err[-2000:]
    one_line_error(cap.err, *needles)


def test_unknown_config_key(capsys):
    refused(capsys, ["optim.deep.learning_rate=0.1"], "unknown config key 'optim.deep.learning_rate'")


def test_missing_config_file(tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    one_line_error(capsys.readouterr().err, "config file not found", "nope.yaml")


def test_data_folder_without_manifest(tmp_path, prepared, capsys):
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)
    (half / "train" / "part-00000.parquet").write_bytes((prepared / "train" / "part-00000.parquet").read_bytes())
    refused(capsys, [f"data.path={half}", f"run.out_dir={tmp_path}", *QUICK], "no manifest.json")
    # the half-written folder is left as it was
    assert sorted(p.name for p in half.rglob("*")) == ["part-00000.parquet", "train"]


def test_feature_missing_in_data(tmp_path, prepared, capsys):
    refused(capsys, [f"data.path={prepared}", f"run.out_dir={tmp_path}", *QUICK,
                     "features.columns.mood={kind: categorical, hash_buckets: 10}", "model.wide.features=[user_id, mood]"],
            "column 'mood' named in the config is missing")


def test_compile_without_a_compiler_is_one_line_and_leaves_no_run_folder(tmp_path, prepared, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    refused(capsys, [f"data.path={prepared}", f"run.out_dir={tmp_path}", *QUICK, "train.compile=default"],
            "train.compile=default on a CPU needs a C++ compiler")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", ["torch", "torchrec"])
def test_tables_too_large_for_memory_are_refused_before_allocating(prepared, tmp_path, backend, capsys):
    if backend == "torchrec" and not torchrec_available():
        pytest.skip("torchrec not installed")
    # 2e12 rows of a wide table with FTRL state: 24 TB, refused before anything is allocated
    refused(capsys, [f"data.path={prepared}", f"run.out_dir={tmp_path}", f"model.embedding_backend={backend}",
                     "features.crosses.user_genres.hash_buckets=2000000000000"],
            "tables and optimiser state need", "GiB", "missing")
