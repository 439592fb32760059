"""`wdl predict`: every row scored once, in input order, with the selected model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from helpers import ROOT, read_split, write_tiny_config
from wdl.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("predict")
    config = write_tiny_config(root, tiny_data)
    assert main(["train", "--config", str(config), "run.name=model", "train.epochs=3", "data.valid_fraction=0.2"]) == 0
    return root / "runs" / "model"


def test_scores_equal_the_selected_models_test_auc(trained, tiny_data, tmp_path):
    out = tmp_path / "scores.parquet"
    in_progress = trained / "checkpoints" / "step-99999999.tmp"  # as a save of a run still training
    in_progress.mkdir()
    assert main(["predict", "--run", str(trained), "--out", str(out)]) == 0
    assert in_progress.is_dir()  # a reader never clears another run's unfinished save
    in_progress.rmdir()
    t = pq.read_table(out)
    assert t.column_names == ["row", "score", "label"] and t.num_rows == 600
    assert t["row"].to_pylist() == list(range(600))
    labels = read_split(tiny_data, "test").column("label").to_numpy()
    np.testing.assert_array_equal(t["label"].to_numpy(), labels)  # input order kept
    summary = json.loads((trained / "summary.json").read_text())
    assert roc_auc_score(labels, t["score"].to_numpy()) == pytest.approx(summary["test"]["auc"], abs=1e-9)


@pytest.mark.slow
def test_rows_without_labels_and_two_processes_give_the_same_scores(trained, tiny_data, tmp_path):
    """Unlabelled rows (a copy of the test split without its label column) scored by two
    processes: the same scores, in the same order, as one process on the labelled rows."""
    data = tmp_path / "unlabelled"
    shutil.copytree(tiny_data, data)
    for f in (data / "test").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["label"]), f, row_group_size=128)
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert main(["predict", "--run", str(trained), "--checkpoint", "latest", "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "wdl.cli", "predict", str(trained), "--checkpoint", "latest",
                           "--data", str(data), "--out", str(two)], capture_output=True, text=True, env=env,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = pq.read_table(one), pq.read_table(two)
    assert b.column_names == ["row", "score"] and b["row"].to_pylist() == list(range(600))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=0, atol=1e-6)


def test_bad_run_folder_is_one_line(tmp_path, capsys):
    assert main(["predict", "--run", str(tmp_path), "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --run") and "no config.yaml" in err and "\n" not in err


def test_parquet_files_with_a_key_column_and_bad_data_arguments(trained, tiny_data, tmp_path, capsys):
    """--data as files (a glob) scores the same rows as the data set folder, with --key columns
    in input order; a data set folder without its manifest, --split with files and CSV files
    are one-line errors."""
    whole, files = tmp_path / "whole.parquet", tmp_path / "files.parquet"
    assert main(["predict", str(trained), "--out", str(whole)]) == 0
    glob = str(tiny_data / "test" / "*.parquet")
    assert main(["predict", str(trained), "--data", glob, "--key", "user_id", "--key", "movie_id",
                 "--out", str(files)]) == 0
    a, b = pq.read_table(whole), pq.read_table(files)
    assert b.column_names == ["row", "score", "label", "user_id", "movie_id"]
    np.testing.assert_array_equal(b["score"].to_numpy(), a["score"].to_numpy())
    test = read_split(tiny_data, "test")
    assert b["user_id"].to_pylist() == test["user_id"].to_pylist()
    assert b["movie_id"].to_pylist() == test["movie_id"].to_pylist()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    (broken / "manifest.json").unlink()
    csv = tmp_path / "rows.csv"
    csv.write_text("user_id,movie_id\n1,2\n")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_text("not parquet")
    worded = tmp_path / "worded.parquet"  # labels as words
    test = read_split(tiny_data, "test")
    pq.write_table(test.set_column(test.schema.get_field_index("label"), "label",
                                   pa.array(["yes"] * len(test))), worded)
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    for args, message in [(["--data", str(broken)], "no manifest.json"),
                          (["--data", str(corrupt)], "corrupt.parquet: not a readable Parquet file"),
                          (["--data", str(worded)], "label column 'label' holds string values; labels must be 0 or 1"),
                          (["--out", str(tmp_path / "afile" / "s.parquet")], "cannot create"),
                          (["--out", str(tmp_path)], "is a folder; give a file name"),
                          (["--data", glob, "--split", "test"], "--split picks a split of a data set folder"),
                          (["--data", str(csv)], "wdl predict reads Parquet files"),
                          (["--data", glob, "--key", "score"], "the output already has a column"),
                          (["--data", glob, "--key", "nope"], "has no such column")]:
        assert main(["predict", str(trained), "--out", str(tmp_path / "bad.parquet"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "bad.parquet").exists()


def test_key_columns_of_other_integer_widths_and_a_run_that_selected_nothing(trained, tiny_data, tmp_path, capsys):
    """--key reads each file's column as the scoring read it (an int32 file beside int64 ones is
    widened); the default --checkpoint best of a run that selected no epoch on validation is
    refused, not replaced silently by its newest (mid-epoch) checkpoint."""
    test = read_split(tiny_data, "test")
    half = len(test) // 2
    pq.write_table(test.slice(0, half), tmp_path / "a.parquet")
    narrow = test.slice(half)
    pq.write_table(narrow.set_column(narrow.schema.get_field_index("user_id"), "user_id",
                                     narrow["user_id"].cast(pa.int32())), tmp_path / "b.parquet")
    out = tmp_path / "keyed.parquet"
    assert main(["predict", str(trained), "--data", str(tmp_path / "*.parquet"), "--key", "user_id", "--out", str(out)]) == 0
    assert pq.read_table(out)["user_id"].to_pylist() == test["user_id"].to_pylist()

    config = write_tiny_config(tmp_path / "cut", tiny_data)
    assert main(["train", "--config", str(config), "run.name=cut", "data.valid_fraction=0.2", "train.max_steps=10"]) == 0
    run = tmp_path / "cut" / "runs" / "cut"
    capsys.readouterr()
    assert main(["predict", str(run), "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "selected no epoch on validation" in err and "--checkpoint latest" in err and "\n" not in err
    assert main(["predict", str(run), "--checkpoint", "latest", "--out", str(tmp_path / "s.parquet")]) == 0


def test_ids_outside_the_vocabularies_are_said(trained, tiny_data, tmp_path, capsys):
    """Rows whose ids the model never had (new users, or raw values given as ids) are scored as
    the unknown id 0, and said on stderr: a warning above data.max_unknown_fraction."""
    test = read_split(tiny_data, "test")
    col = test.schema.get_field_index("user_id")
    pq.write_table(test.set_column(col, "user_id", pa.compute.add(test["user_id"], 10**6)), tmp_path / "new.parquet")
    capsys.readouterr()
    assert main(["predict", str(trained), "--data", str(tmp_path / "new.parquet"), "--out", str(tmp_path / "s.parquet")]) == 0
    err = capsys.readouterr().err
    assert "wdl: warning: unknown ids (id 0)" in err and "user_id 100.00% out of vocabulary" in err
