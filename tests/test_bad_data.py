"""Bad input: each case is one `error:` line naming the file and line/row, exit status 2, and
never a half-written data set that looks complete."""

from __future__ import annotations

import gzip
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, criteo_line, make_tiny_dataset, one_line_error, random_lines, write_lines, write_tiny_config
from wdl.cli import main as cli_main
from wdl.errors import DataError
from wdl.ingest.criteo import prepare_criteo

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def prepare(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main(["data", "prepare", "criteo", "--no-progress", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def nothing_written(folder: Path, out: Path) -> bool:
    """Neither the output nor a temporary sibling of it exists."""
    return not out.exists() and not list(folder.glob(f"{out.name}.tmp-*"))


# ------------------------------------------------------------------------------ TSV lines
BAD_LINES = {
    "field_count": ("1\t2\t3\n", "3 fields, expected 40"),
    "categorical": (criteo_line(1, cats=["68fd1e64"] * 25 + ["xyz12345"]), "C26 value 'xyz12345' is not 8 hex digits"),
    "dense": (criteo_line(0, dense=["1", "abc"] + [""] * 11), "I2 value 'abc' is not a finite number"),
    "label": (criteo_line(2), "label '2' is not 0 or 1"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_tsv_line_is_an_error_by_default(tmp_path, capsys, reason):
    bad, message = BAD_LINES[reason]
    src = write_lines(tmp_path / "in.txt", random_lines(10) + [bad] + random_lines(5))
    rc, _, err = prepare(capsys, "--input", src, "--out", tmp_path / "out")
    line = one_line_error(err)
    assert rc == 2 and f"{src}:11: bad line: {message}" in line
    assert nothing_written(tmp_path, tmp_path / "out")


def test_bad_lines_skip_and_warn_count_them(tmp_path, capsys):
    lines = random_lines(20)
    for k, (bad, _) in enumerate(BAD_LINES.values()):
        lines.insert(3 + 4 * k, bad)
    lines.insert(0, "\n")  # an empty line is bad too (no label)
    src = write_lines(tmp_path / "in.txt", lines)
    rc, out, err = prepare(capsys, "--input", src, "--out", tmp_path / "skip", "--on-bad-line", "skip",
                           "--test-fraction", "0")
    assert rc == 0 and err == ""
    assert "lines 25; rows: train 20" in out and "bad lines: 5 (" in out
    rc, out, err = prepare(capsys, "--input", src, "--out", tmp_path / "warn", "--on-bad-line", "warn",
                           "--test-fraction", "0")
    assert rc == 0 and "bad lines: 5 (" in out
    warnings = err.strip().splitlines()
    assert len(warnings) == 5 and all(w.startswith(f"warning: {src}:") for w in warnings)
    assert f"{src}:1: skipped bad line: label None is not 0 or 1" in warnings[0]
    assert f"{src}:5: skipped bad line: 3 fields, expected 40" in warnings[1]
    import json
    counts = json.loads((tmp_path / "warn/manifest.json").read_text())["counts"]
    assert counts["bad_lines_by_reason"] == {"field_count": 1, "categorical": 1, "dense": 1, "label": 2}


def test_a_line_that_is_not_utf8_is_one_bad_line(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes("".join(random_lines(10)).encode() + criteo_line(1).encode().replace(b"\t", b"\t\xff", 1)
                    + "".join(random_lines(5)).encode())
    rc, _, err = prepare(capsys, "--input", src, "--out", tmp_path / "out")
    assert rc == 2 and f"{src}:11: bad line: not valid UTF-8 text" in one_line_error(err)
    rc, out, err = prepare(capsys, "--input", src, "--out", tmp_path / "skip", "--on-bad-line", "skip")
    assert rc == 0 and "lines 16;" in out and "bad lines: 1 (" in out


def test_nan_and_inf_in_tsv_dense_are_bad_lines(tmp_path):
    src = write_lines(tmp_path / "in.txt", [criteo_line(1, dense=["nan"] + [""] * 12), criteo_line(1, dense=["inf"] * 13)])
    with pytest.raises(DataError, match=r"in.txt:1: bad line: I1 value 'nan' is not a finite number"):
        prepare_criteo([src], tmp_path / "out", progress=False)


def test_truncated_gzip(tmp_path, capsys):
    data = gzip.compress("".join(random_lines(3000)).encode())
    src = tmp_path / "day.gz"
    src.write_bytes(data[: len(data) // 2])
    rc, _, err = prepare(capsys, "--input", src, "--out", tmp_path / "out", "--workers", "2")
    line = one_line_error(err)
    assert rc == 2 and f"{src}: truncated or corrupt gzip data after line" in line
    assert int(line.split("after line ")[1].split()[0]) > 1000  # where it broke, not "line 0"
    assert nothing_written(tmp_path, tmp_path / "out")


def test_empty_input_file(tmp_path, capsys):
    good = write_lines(tmp_path / "a.txt", random_lines(10))
    empty = write_lines(tmp_path / "b.txt", [])
    rc, _, err = prepare(capsys, "--input", good, empty, "--out", tmp_path / "out")
    assert rc == 2 and f"error: {empty}: input file is empty (no lines)" == one_line_error(err)
    assert nothing_written(tmp_path, tmp_path / "out")
    rc, _, err = prepare(capsys, "--input", tmp_path / "missing.txt", "--out", tmp_path / "out")
    assert rc == 2 and "missing.txt does not exist" in one_line_error(err)


def test_output_already_holds_a_data_set(tmp_path, capsys):
    src = write_lines(tmp_path / "in.txt", random_lines(50))
    assert prepare(capsys, "--input", src, "--out", tmp_path / "out", "--hash-buckets", "10")[0] == 0
    before = (tmp_path / "out/manifest.json").read_text()
    rc, _, err = prepare(capsys, "--input", src, "--out", tmp_path / "out")
    assert rc == 2 and "already holds a data set; pass --overwrite" in one_line_error(err)
    assert (tmp_path / "out/manifest.json").read_text() == before
    assert prepare(capsys, "--input", src, "--out", tmp_path / "out", "--overwrite")[0] == 0
    assert '"vocab_size": 1000000' in (tmp_path / "out/manifest.json").read_text()


def _no_big_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_out_of_disk_space(tmp_path):
    src = write_lines(tmp_path / "in.txt", random_lines(6000))  # well over 100 kB of Parquet (the input is read, not written)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "wdl.cli", "data", "prepare", "criteo", "--input", str(src), "--out",
                        str(out), "--no-progress", "--row-group-rows", "256"],
                       capture_output=True, text=True, env=ENV, preexec_fn=_no_big_files, timeout=120)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and "File too large" in line and str(out) in line
    assert nothing_written(tmp_path, out)


def test_unwritable_output_folder(tmp_path, capsys, unwritable_folder):
    """A read-only folder (as root too: see the fixture) or a path under a file."""
    folder, reason = unwritable_folder
    src = write_lines(tmp_path / "in.txt", random_lines(10))
    rc, _, err = prepare(capsys, "--input", src, "--out", folder / "out")
    line = one_line_error(err, str(folder / "out"), reason)
    assert rc == 2, line
    assert not (folder / "out").exists()


# ------------------------------------------------------------------------------ trainer side
def _train(tmp_path: Path, data: Path) -> SimpleNamespace:
    """One epoch of `wdl train` in this process (the command's own error handling included)."""
    import contextlib
    import io

    cfg = write_tiny_config(tmp_path, data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["train", "--config", str(cfg), "train.epochs=1", "train.progress=false"])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny", rows=1200)


def _rewrite(shard: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(shard)), shard, row_group_size=256)


def _set(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i).with_type(values.type), values)


def test_corrupt_parquet(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[4:4000] = os.urandom(3996)  # keep the magic bytes and footer, scramble the pages
    shard.write_bytes(bytes(data))
    r = _train(tmp_path, tiny)
    assert r.returncode == 2 and str(shard) in one_line_error(r.stderr)


def test_truncated_parquet(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and str(shard) in line and "not a readable Parquet file" in line


def test_shard_schema_disagrees_with_manifest(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    _rewrite(shard, lambda t: _set(t, "genres", pa.array(np.ones(t.num_rows, np.int64))))  # multi_hot -> scalar
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and str(shard) in line and "'genres'" in line and "multi_hot" in line


def test_shard_missing_a_column(tmp_path, tiny):
    shard = tiny / "test/part-00000.parquet"
    _rewrite(shard, lambda t: t.drop_columns(["movie_id"]))
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and str(shard) in line and "'movie_id'" in line and "missing" in line


def _poison_year(shard: Path, value: float) -> None:
    def poison(t):
        y = t.column("release_year").to_numpy().copy()
        y[300] = value
        return _set(t, "release_year", pa.array(y, pa.float32()))

    _rewrite(shard, poison)


def test_inf_in_dense_column(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    _poison_year(shard, float("inf"))
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    # row 300 of the shard is row 44 of its second row group (256 rows each)
    assert r.returncode == 2 and f"{shard} (row group 1): dense column 'release_year' holds inf at row 44" in line


def test_nan_in_dense_column(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    _poison_year(shard, float("nan"))
    r = _train(tmp_path, tiny)
    assert r.returncode == 2 and "'release_year'" in one_line_error(r.stderr)


@pytest.mark.parametrize("label", [2, -1])
def test_labels_outside_0_1(tmp_path, tiny, label):
    shard = tiny / "train/part-00000.parquet"

    def poison(t):
        y = t.column("label").to_numpy().copy()
        y[10] = label
        return _set(t, "label", pa.array(y, pa.int8()))

    _rewrite(shard, poison)
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and f"{shard} (row group 0): label column 'label' holds {float(label)} at row 10" in line


def test_data_error_in_a_loader_worker_is_one_line(tmp_path, tiny):
    """Streaming with DataLoader workers: the worker's error reaches the user as one line, not
    as the worker's traceback."""
    _poison_year(tiny / "train/part-00000.parquet", float("inf"))
    cfg = write_tiny_config(tmp_path, tiny)
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(cfg), "train.epochs=1",
                        "data.in_memory=false", "data.num_workers=2"], capture_output=True, text=True, env=ENV, timeout=300)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and "dense column 'release_year' holds inf" in line and "Traceback" not in r.stderr


def test_text_in_a_dense_column(tmp_path, tiny):
    shard = tiny / "train/part-00000.parquet"
    _rewrite(shard, lambda t: _set(t, "release_year", pa.array([f"year {v}" for v in t.column("release_year").to_pylist()])))
    r = _train(tmp_path, tiny)
    line = one_line_error(r.stderr)
    assert r.returncode == 2 and "'release_year'" in line and "string" in line, line


def test_streamed_unknown_ids_outside_the_sample_stop_training(tmp_path, capsys):
    """The check at start samples 4 of the 10 streamed row groups; a whole row group of negative
    user ids outside the sample (11% of the rows) trained as id 0 without a word. Every id read
    is counted: the epoch's end stops the run with one line."""
    data = make_tiny_dataset(tmp_path / "tiny", rows=3000)
    shard = data / "train/part-00000.parquet"

    def poison(t):
        u = t.column("user_id").to_numpy().copy()
        u[256:512] = -3  # row group 1
        return _set(t, "user_id", pa.array(u, pa.int64()))

    _rewrite(shard, poison)
    cfg = write_tiny_config(tmp_path, data)
    assert cli_main(["train", "--config", str(cfg), "train.epochs=1", "data.in_memory=false"]) == 2
    one_line_error(capsys.readouterr().err, "column 'user_id': 10.7% of its values in the 'train (epoch 1)' split "
                                            "are outside its vocabulary")


def test_an_error_quotes_at_most_200_characters_of_a_value(tmp_path, tiny):
    """A manifest (a file anyone may hand over) with a 5 MB value gave a 5 MB error line."""
    import json

    from wdl.data.manifest import load_manifest
    from wdl.errors import first_line

    raw = json.loads((tiny / "manifest.json").read_text())
    (tiny / "manifest.json").write_text(json.dumps({**raw, "format": "x" * 5_000_000}))
    with pytest.raises(DataError, match=r"has format 'xxx+\.\.\. \(4999802 more characters\), expected") as e:
        load_manifest(tiny)
    assert len(str(e.value)) < 500
    assert len(first_line(ValueError("could not convert " + "9" * 10**6))) < 300
