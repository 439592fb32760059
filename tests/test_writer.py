import errno
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wdl.data import writer as writer_mod
from wdl.data.column_stats import RunningStats, column_stats
from wdl.data.manifest import load_manifest
from wdl.data.writer import DatasetWriter
from wdl.errors import DataError


def _table(n, start=0):
    x = np.arange(start, start + n)
    return pa.table({"x": pa.array(x, pa.int64()),
                     "d": pa.array(x.astype(np.float32)),
                     "label": pa.array((x % 4 == 0).astype(np.int8))})


COLUMNS = {"x": {"kind": "categorical", "vocab_size": 100}, "d": {"kind": "dense", "mean": 0.0, "std": 1.0}}


def _commit(w):
    return w.commit(source={"kind": "test"}, label="label", columns=COLUMNS, split={"kind": "random"})


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_writes_shards_row_groups_and_manifest(tmp_path):
    out = tmp_path / "ds"
    w = DatasetWriter(out, name="t", rows_per_file=10, row_group_rows=4)
    for start, n in [(0, 3), (3, 5), (8, 15)]:  # 23 rows in uneven appends
        w.write("train", _table(n, start))
    w.write("test", _table(2))
    assert w.write_vocab("x", ["a", "b"]) == "vocab/x.json"
    assert _commit(w) == out
    assert _siblings(out) == ["ds"]  # temp folder renamed away

    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "wdl-dataset/1" and raw["name"] == "t" and raw["created"].endswith("Z")
    train = raw["splits"]["train"]
    assert train["rows"] == 23
    assert [f["rows"] for f in train["files"]] == [10, 10, 3]
    assert [f["row_groups"] for f in train["files"]] == [3, 3, 1]
    assert train["positive_rate"] == pytest.approx(6 / 23)
    assert json.loads((out / "vocab/x.json").read_text()) == [None, "a", "b"]

    pf = pq.ParquetFile(out / "train/part-00000.parquet")
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [4, 4, 2]
    got = pa.concat_tables(pq.read_table(out / f["path"]) for f in train["files"])
    assert got.column("x").to_pylist() == list(range(23))

    m = load_manifest(out)
    assert m.splits["train"].files[1].path == out / "train/part-00001.parquet"
    assert m.split("test").rows == 2


def test_schema_mismatch_is_data_error(tmp_path):
    with DatasetWriter(tmp_path / "ds", name="t") as w:
        w.write("train", _table(3))
        with pytest.raises(DataError, match="schema differs"):
            w.write("train", _table(3).drop(["d"]))
        for bad in ("vocab", "../x", "manifest.json", ""):
            with pytest.raises(DataError, match="invalid split name"):
                w.write(bad, _table(1))


def test_empty_split_gets_schema_file(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="t")
    w.write("train", _table(5))
    w.write("test", _table(0))
    _commit(w)
    m = load_manifest(tmp_path / "ds")
    assert m.split("test").rows == 0 and m.split("test").positive_rate == 0.0
    assert pq.read_table(m.split("test").files[0].path).schema.names == ["x", "d", "label"]


def test_exception_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, name="t", row_group_rows=2) as w:
            w.write("train", _table(5))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_error_with_writes_still_queued_leaves_nothing_and_returns(tmp_path):
    """With a backlog (as the importer writes), writes queued behind the failing one are
    cancelled: the abort must not wait for them forever."""
    import threading

    out, failed = tmp_path / "ds", []

    def write() -> None:
        try:
            with DatasetWriter(out, name="t", row_group_rows=1000, backlog_bytes=1 << 30) as w:
                for i in range(20):
                    w.write("train", _table(10_000, start=i * 10_000))
                raise RuntimeError("boom")
        except RuntimeError as e:
            failed.append(e)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and failed
    assert list(tmp_path.iterdir()) == []


def test_existing_data_set_refused_and_survives_failed_overwrite(tmp_path):
    out = tmp_path / "ds"
    w = DatasetWriter(out, name="old")
    w.write("train", _table(4))
    _commit(w)
    with pytest.raises(DataError, match="already holds a data set"):
        DatasetWriter(out, name="new")
    w = DatasetWriter(out, name="new", overwrite=True)
    w.write("train", _table(7))
    with pytest.raises(DataError, match="lacks columns"):
        w.commit(source={}, label="nope", columns={}, split={})
    assert load_manifest(out).name == "old" and _siblings(out) == ["ds"]

    w = DatasetWriter(out, name="new", overwrite=True)
    w.write("train", _table(7))
    _commit(w)
    assert load_manifest(out).split("train").rows == 7 and _siblings(out) == ["ds"]


def test_non_empty_foreign_folder_never_touched(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a wdl data set"):
        DatasetWriter(out, name="t", overwrite=True)
    assert (out / "precious.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    w = DatasetWriter(empty, name="t")
    w.write("train", _table(1))
    _commit(w)
    assert (empty / "manifest.json").exists()


def test_unwritable_output_folder_is_one_line(unwritable_folder):
    """A folder that refuses new entries (read-only, or a path under a file): one line naming
    the target and the OS's reason, and nothing left behind."""
    folder, reason = unwritable_folder
    with pytest.raises(DataError) as e:
        DatasetWriter(folder / "ds", name="t")
    msg = str(e.value)
    assert "\n" not in msg and f"cannot create data set folder next to {folder / 'ds'}: {reason}" in msg, msg
    assert not (folder / "ds").exists()


def test_disk_full_mid_write_is_one_line_and_cleans_up(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    w = DatasetWriter(out, name="t", row_group_rows=2)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer_mod.pq.ParquetWriter, "write_table", full)
    with pytest.raises(DataError, match="No space left on device") as e:
        w.write("train", _table(4))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_column_stats_and_running_stats():
    x = np.array([1.0, 2.0, 3.0, np.nan, 4.0])
    assert column_stats(x) == pytest.approx({"mean": 2.5, "std": np.std([1, 2, 3, 4]),
                                             "missing_train": 1, "values_train": 4})
    big = 1.6e9 + np.arange(1000.0)
    r = RunningStats()
    for chunk in np.array_split(big, 7):
        r.update(chunk)
    assert r.result() == pytest.approx({"mean": big.mean(), "std": big.std(), "missing_train": 0, "values_train": 1000})


def test_failed_rename_during_overwrite_restores_old(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    w = DatasetWriter(out, name="old")
    w.write("train", _table(4))
    _commit(w)
    w = DatasetWriter(out, name="new", overwrite=True)
    w.write("train", _table(7))
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_rename(src, dst)
    monkeypatch.setattr(writer_mod.os, "rename", rename)
    with pytest.raises(DataError, match="cross-device"):
        _commit(w)
    assert load_manifest(out).name == "old" and _siblings(out) == ["ds"]


def _good(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="t")
    w.write("train", _table(4))
    w.write("test", _table(2))
    return _commit(w)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.rename(p.with_name("elsewhere")), "does not exist"),
    (lambda p: (p / "manifest.json").unlink(), r"incomplete or not a wdl data set \(no manifest.json\)$"),
    (lambda p: (p / "manifest.json").write_text("{oops"), "not valid JSON"),
    (lambda p: (p / "manifest.json").write_text('{"format": "wdl-dataset/9"}'), "wdl-dataset/9"),
    (lambda p: (p / "test/part-00000.parquet").unlink(), "shard test/part-00000.parquet of split 'test' is missing"),
    (lambda p: (p / "manifest.json").write_text('{"format": "wdl-dataset/1", "splits": {}}'), "malformed"),
])
def test_load_manifest_errors(tmp_path, damage, message):
    out = _good(tmp_path)
    damage(out)
    with pytest.raises(DataError, match=message) as e:
        load_manifest(out)
    assert "\n" not in str(e.value)


def test_load_manifest_points_at_interrupted_preparation(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="t")  # never committed: like a killed preparation
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"ds\.tmp-\d+-\w+ next to it looks like an interrupted preparation"):
        load_manifest(tmp_path / "ds")
    w.abort()


def test_manifest_split_names_available(tmp_path):
    m = load_manifest(_good(tmp_path))
    with pytest.raises(DataError, match=r"no split 'valid' \(available: test, train\)"):
        m.split("valid")
    assert m.label == "label" and m.columns == COLUMNS and m.raw["source"] == {"kind": "test"}


@pytest.mark.parametrize("backlog_bytes", [0, 1 << 20])
def test_commit_waits_for_slow_file_finish(tmp_path, monkeypatch, backlog_bytes):
    # A part file closed by its thread after commit reads the labels back (no label given up front)
    # would be a file without its footer; commit must wait for every close, however long it takes.
    slow_finish = writer_mod._PartFile._finish

    def finish_late(self):
        time.sleep(0.2)
        slow_finish(self)

    monkeypatch.setattr(writer_mod._PartFile, "_finish", finish_late)
    w = DatasetWriter(tmp_path / "ds", name="t", rows_per_file=5, row_group_rows=5, backlog_bytes=backlog_bytes)
    w.write("train", _table(12))
    out = _commit(w)
    train = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert [f["rows"] for f in train["files"]] == [5, 5, 2]
    assert train["positive_rate"] == pytest.approx(3 / 12)
    assert pq.read_table(out / "train").column("x").to_pylist() == list(range(12))
