"""A model is only applied to data it can read: `wdl predict --data` of another data set than
the training one is refused (one line pointing at --raw) unless it encodes every column the
model reads alike."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from helpers import one_line_error
from wdl.cli import main


def _rows(rows: int, seed: int, items: int, prefix: str = "sku") -> pa.Table:
    rng = np.random.default_rng(seed)
    item = rng.integers(0, items, rows)
    return pa.table({"item": pa.array([f"{prefix}-{i}" for i in item]), "price": pa.array(rng.lognormal(2, 1, rows)),
                     "clicked": pa.array((rng.random(rows) < 0.3 + 0.4 * (item % 2)).astype(np.int8))})


def _import(tmp_path, name: str, train: pa.Table, test: pa.Table):
    raw = tmp_path / f"raw-{name}"
    raw.mkdir()
    pq.write_table(train, raw / "a.parquet")
    pq.write_table(test, raw / "b.parquet")
    spec = tmp_path / "columns.yaml"
    spec.write_text("label: clicked\ncolumns:\n  item: {kind: categorical}\n  price: {kind: dense}\n")
    out = tmp_path / name
    assert main(["data", "import", "--spec", str(spec), "--out", str(out), "--split", "files", "--no-progress",
                 "--train-files", str(raw / "a.parquet"), "--test-files", str(raw / "b.parquet")]) == 0
    return out


def test_predict_refuses_a_data_set_encoded_otherwise(tmp_path, capsys):
    train, test = _rows(600, 0, 30), _rows(100, 1, 30)
    data = _import(tmp_path, "shop", train, test)
    (tmp_path / "cfg.yaml").write_text(f"""\
run: {{name: m, out_dir: {tmp_path / 'runs'}, seed: 1, device: cpu}}
data: {{path: {data}, batch_size: 128, eval_batch_size: 256, eval_split: test, in_memory: true}}
features:
  label: clicked
  columns:
    item: {{kind: categorical, vocab_size: auto}}
    price: {{kind: dense, normalize: standard}}
model:
  embedding_backend: torch
  wide: {{features: [item]}}
  deep: {{embeddings: {{item: 4}}, dense: [price], hidden: [8]}}
train: {{epochs: 1, progress: false}}
""")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    run, out = tmp_path / "runs" / "m", tmp_path / "scores.parquet"
    scores = lambda data: main(["predict", str(run), "--data", str(data), "--out", str(out)])  # noqa: E731
    # the training set, a copy of it, and the same files imported again (a manifest of its own): scored
    shutil.copytree(data, tmp_path / "copy")
    again = _import(tmp_path, "again", train, test)
    for same in (data, tmp_path / "copy", again):
        assert scores(same) == 0
    capsys.readouterr()
    # the same sizes and statistics, other items behind the ids
    renamed = _import(tmp_path, "renamed", _rows(600, 0, 30, "item"), test)
    assert scores(renamed) == 2
    one_line_error(capsys.readouterr().err, f"--data {renamed} is not the data set this model was trained on",
                   "column 'item' maps its values to ids through another vocabulary", "--raw")
    # other sizes
    bigger = _import(tmp_path, "bigger", _rows(600, 0, 40), test)
    assert scores(bigger) == 2
    one_line_error(capsys.readouterr().err, "column 'item' has 41 ids", "--raw")
