"""Missing numbers are missing, not zero: a null in a dense column is the train mean (or the
config's fill, in raw units) once normalised, the deep part sees a missing indicator for a column
with nulls in the train split, and wdl predict (imported and raw rows), the export and Scorer
score rows with nulls alike."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_split
from wdl.cli import main
from wdl.config import ColumnConfig, FeaturesConfig
from wdl.data.column_stats import RunningStats, column_stats
from wdl.data.features import FeatureSpec
from wdl.errors import ConfigError
from wdl.serve import Scorer


def _spec(meta: dict, fill=None, max_missing_fraction: float = 1.0, buckets=None) -> FeatureSpec:
    cols = {"year": ColumnConfig(kind="dense", normalize="standard", fill=fill, buckets=buckets)}
    cfg = FeaturesConfig(label="label", columns=cols, max_missing_fraction=max_missing_fraction)
    return FeatureSpec(cfg, {"year": {"kind": "dense", **meta}}, ["year"] if buckets else [], ["year"])


def _rows(years: list) -> pa.Table:
    return pa.table({"label": pa.array([0] * len(years), pa.int8()), "year": pa.array(years, pa.float32())})


def test_statistics_count_missing_and_present_values():
    stats = RunningStats()
    stats.update([1.0, np.nan, 3.0])
    other = RunningStats()
    other.update([np.nan, np.nan])
    stats.merge(other)
    assert stats.result() == {"mean": 2.0, "std": 1.0, "missing_train": 3, "values_train": 2}
    assert column_stats([5.0])["missing_train"] == 0


def test_a_null_is_the_train_mean_and_an_indicator_not_zero():
    """A null year was 0 AD before normalising: -39 standard deviations from the release years."""
    meta = {"mean": 1990.0, "std": 10.0, "missing_train": 5, "values_train": 95}
    spec = _spec(meta)
    assert spec.dense_dim == 2 and spec.missing_columns == ["year"]
    dense = spec.encode(_rows([2000.0, None]), "t").dense
    assert dense.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # [value, missing]
    # an explicit fill is in raw units, normalised as any value
    assert _spec(meta, fill=1970.0).encode(_rows([None]), "t").dense.tolist() == [[-2.0, 1.0]]
    # no nulls in train (or a manifest that does not say): no indicator, the model of before
    for m in ({**meta, "missing_train": 0}, {"mean": 1990.0, "std": 10.0}):
        spec = _spec(m)
        assert spec.dense_dim == 1 and spec.encode(_rows([None]), "t").dense.tolist() == [[0.0]]


def test_a_column_missing_everywhere_is_an_error_or_dropped_when_allowed(capsys):
    meta = {"mean": 0.0, "std": 0.0, "missing_train": 100, "values_train": 0}
    with pytest.raises(ConfigError, match="dense column 'year' is missing \\(null\\) in every train row"):
        _spec(meta)
    spec = _spec(meta, max_missing_fraction=0.9)
    assert spec.dense_dim == 0 and spec.dropped == ["year"]
    assert "dense column(s) year are missing in more than 90% of the train rows" in capsys.readouterr().err
    # below the limit: kept
    assert _spec({**meta, "values_train": 900}, max_missing_fraction=0.9).dense_dim == 2


def test_a_missing_number_has_a_bucket_of_its_own():
    """Buckets are 1 .. len(edges) + 1 for every number, so id 0 is only ever a null."""
    spec = _spec({"mean": 0.0, "std": 1.0}, buckets=[0.0, 10.0])
    ids = spec.encode(_rows([-1e30, 0.0, 5.0, 10.0, 1e30, None]), "t").sparse["year"].values.tolist()
    assert ids == [1, 2, 2, 3, 3, 0]


def _shop(rows: int, seed: int) -> pa.Table:
    """Raw rows with a price that is missing for a quarter of the rows, more often clicked."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 20, rows)
    price = rng.lognormal(3, 0.5, rows)
    missing = rng.random(rows) < 0.25
    logit = (user % 3 - 1.0) + 1.5 * missing
    return pa.table({"user": pa.array(user), "price": pa.array(price, mask=missing),
                     "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8))})


def test_rows_with_nulls_score_alike_in_predict_raw_predict_export_and_scorer(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(_shop(1200, 0), raw / "a.parquet")
    test_rows = _shop(200, 1)
    pq.write_table(test_rows, raw / "b.parquet")
    (tmp_path / "columns.yaml").write_text("label: clicked\ncolumns:\n  user: {kind: categorical}\n  price: {kind: dense}\n")
    data = tmp_path / "data"
    assert main(["data", "import", "--spec", str(tmp_path / "columns.yaml"), "--out", str(data), "--split", "files",
                 "--train-files", str(raw / "a.parquet"), "--test-files", str(raw / "b.parquet"), "--no-progress"]) == 0
    (tmp_path / "cfg.yaml").write_text(f"""\
run: {{name: m, out_dir: {tmp_path / 'runs'}, seed: 1, device: cpu}}
data: {{path: {data}, batch_size: 128, eval_batch_size: 512, eval_split: test, in_memory: true}}
features:
  label: clicked
  columns:
    user: {{kind: categorical, vocab_size: auto}}
    price: {{kind: dense, normalize: standard}}
model:
  embedding_backend: torch
  wide: {{features: [user]}}
  deep: {{embeddings: {{user: 4}}, dense: [price], hidden: [8]}}
train: {{epochs: 2, progress: false}}
""")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    run, out = tmp_path / "runs" / "m", tmp_path / "exported"
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text()) if (
        run / "checkpoints" / "latest").is_dir() else json.loads(sorted((run / "checkpoints").glob("*/meta.json"))[-1].read_text())
    assert meta["signature"]["dense_dim"] == 2 and meta["signature"]["missing_indicators"] == ["price"]
    assert main(["export", str(run), "--out", str(out)]) == 0
    dense = json.loads((out / "encoding.json").read_text())["dense"]
    assert dense[0]["missing_indicator"] is True and dense[0]["fill"] == pytest.approx(dense[0]["mean"])
    imported, from_raw = tmp_path / "imported.parquet", tmp_path / "raw.parquet"
    assert main(["predict", str(run), "--out", str(imported)]) == 0
    assert main(["predict", str(run), "--data", str(raw / "b.parquet"), "--raw", "--out", str(from_raw)]) == 0
    scorer = Scorer.load(out)
    by_predict = pq.read_table(imported)["score"].to_numpy()
    null = test_rows["price"].is_null().to_numpy(zero_copy_only=False)
    assert null.sum() > 20
    np.testing.assert_array_equal(pq.read_table(from_raw)["score"].to_numpy(), by_predict)
    np.testing.assert_allclose(scorer.score(test_rows, raw=True), by_predict, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.score(read_split(data, "test")), by_predict, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scorer.score(test_rows.drop_columns(["clicked"]).to_pylist(), raw=True), by_predict,
                               rtol=0, atol=1e-6)
    # the indicator is read: a row's score with its price missing is not its score at the mean price
    row = test_rows.filter(pa.array(~null)).slice(0, 1).to_pylist()[0]
    at_mean = scorer.score([{**row, "price": dense[0]["mean"]}], raw=True)
    assert abs(float(scorer.score([{**row, "price": None}], raw=True)[0] - at_mean[0])) > 1e-4
