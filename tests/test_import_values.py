"""`wdl data import` and `wdl data prepare criteo` keep every value as the input holds it (text
that is not UTF-8, "NA", leading zeros, numbers beyond float32 are refused or kept, never
changed silently), quote at most a little of a bad value, and leave nothing behind when killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, criteo_line, random_lines, write_lines
from wdl.cli import main
from wdl.ingest import leftovers
from wdl.ingest.pool import usable_cores


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["data", "import", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def prepare(capsys, *args) -> tuple[int, str, str]:
    rc = main(["data", "prepare", "criteo", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def vocab(out: Path, column: str) -> list:
    return json.loads((out / "vocab" / f"{column}.json").read_text(encoding="utf-8"))


def csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_bytes((header + "\n" + "\n".join(rows) + "\n").encode("utf-8", "surrogateescape"))
    return path


def test_text_that_is_not_utf8_is_refused_naming_file_row_and_column(tmp_path, capsys):
    rows = [f"{i % 2},c{i % 3},x" for i in range(40)]
    good = csv(tmp_path / "a.csv", "clicked,city,note", rows)
    bad = csv(tmp_path / "b.csv", "clicked,city,note", rows[:5] + ["1,M\udcfcnchen,x"] + rows[5:])
    rc, _, err = run(capsys, bad, "--label", "clicked", "--out", tmp_path / "ds")  # the first file: was dropped as binary
    assert rc == 2 and f"{bad} row 6: column 'city' is not UTF-8 text (byte 0xfc" in one_line(err)
    rc, _, err = run(capsys, good, bad, "--label", "clicked", "--out", tmp_path / "ds")  # a later file
    assert rc == 2 and f"{bad} row 6: column 'city' is not UTF-8 text" in one_line(err)
    assert not (tmp_path / "ds").exists()


def test_only_the_null_values_given_are_null(tmp_path, capsys):
    rows = [f"{i % 2},{w},{x}" for i, (w, x) in enumerate(zip(["NA", "null", "n/a", "NaN", "", "ok"] * 10,
                                                                 ["1.5", "NaN", "", "2", "3", "4"] * 10))]
    src = csv(tmp_path / "a.csv", "clicked,word,x", rows)
    rc, _, err = run(capsys, src, "--label", "clicked", "--out", tmp_path / "ds", "--test-fraction", "0")
    assert rc == 0, err
    assert sorted(vocab(tmp_path / "ds", "word")[1:]) == ["NA", "NaN", "n/a", "null", "ok"]  # values, not missing
    m = json.loads((tmp_path / "ds/manifest.json").read_text())
    assert m["columns"]["x"]["missing_train"] == 20  # the number NaN and the empty field
    rc, _, err = run(capsys, src, "--label", "clicked", "--out", tmp_path / "na", "--test-fraction", "0",
                     "--null-values", "NA", "--null-values", "")
    assert rc == 0, err
    assert sorted(vocab(tmp_path / "na", "word")[1:]) == ["NaN", "n/a", "null", "ok"]


def test_leading_zeros_are_kept_and_never_merge(tmp_path, capsys):
    zips = ["02134", "00047", "10001", "60601", "94105"]
    a = csv(tmp_path / "a.csv", "clicked,zip", [f"{i % 2},{zips[i % 5]}" for i in range(50)])
    b = csv(tmp_path / "b.csv", "clicked,zip", [f"{i % 2},47" for i in range(50)])
    rc, out, err = run(capsys, a, b, "--label", "clicked", "--out", tmp_path / "ds", "--max-categories", "2",
                       "--test-fraction", "0")
    assert rc == 0, err
    assert "zip: {kind: categorical}" in out  # 5 distinct > --max-categories 2: was inferred dense
    assert sorted(vocab(tmp_path / "ds", "zip")[1:]) == sorted(zips + ["47"])
    # a spec's categorical column of integers is read as text from every file as well
    spec = tmp_path / "s.yaml"
    spec.write_text("label: clicked\ncolumns:\n  zip: {kind: categorical}\nsplit: {test_fraction: 0}\n")
    c = csv(tmp_path / "c.csv", "clicked,zip", [f"{i % 2},{47 + i % 2}" for i in range(50)])
    rc, _, err = run(capsys, c, a, "--spec", spec, "--out", tmp_path / "spec")
    assert rc == 0, err
    assert "00047" in vocab(tmp_path / "spec", "zip") and "47" in vocab(tmp_path / "spec", "zip")


def test_parquet_numeric_text_after_integers_is_a_type_difference(tmp_path, capsys):
    pq.write_table(pa.table({"user": pa.array([47, 48] * 20), "clicked": [0, 1] * 20}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"user": pa.array(["00047", "48"] * 20), "clicked": [0, 1] * 20}), tmp_path / "b.parquet")
    rc, _, err = run(capsys, tmp_path / "a.parquet", tmp_path / "b.parquet", "--label", "clicked", "--out", tmp_path / "ds")
    assert rc == 2
    assert f"{tmp_path / 'b.parquet'}: column 'user' is string here but int64 in the first input file " \
           f"{tmp_path / 'a.parquet'}" in one_line(err)


def test_dense_values_beyond_float32_are_refused(tmp_path, capsys):
    src = csv(tmp_path / "a.csv", "clicked,x", [f"{i % 2},{1e39 if i == 7 else i}" for i in range(40)])
    rc, _, err = run(capsys, src, "--label", "clicked", "--out", tmp_path / "ds", "--kind", "x=dense")
    assert rc == 2 and f"{src} row 8: dense column 'x' holds 1e+39, beyond float32's range" in one_line(err)
    lines = random_lines(30) + [criteo_line(1, ["1e39"] + ["1"] * 12)]
    tsv = write_lines(tmp_path / "train.txt", lines)
    rc, _, err = prepare(capsys, "--input", tsv, "--out", tmp_path / "c", "--dense-transform", "none")
    assert rc == 2 and f"{tsv}:31: I1 value 1e+39 is beyond float32's range" in one_line(err)
    rc, _, err = prepare(capsys, "--input", tsv, "--out", tmp_path / "c")  # log1p: 89.8, fine
    assert rc == 0, err


def test_criteo_refuses_a_file_given_twice(tmp_path, capsys):
    tsv = write_lines(tmp_path / "train.txt", random_lines(50))
    (tmp_path / "link.txt").symlink_to(tsv)
    os.link(tsv, tmp_path / "hard.txt")
    for other in (tsv, tmp_path / "link.txt", tmp_path / "hard.txt"):
        rc, _, err = prepare(capsys, "--input", tsv, other, "--out", tmp_path / "c")
        assert rc == 2 and f"input {other} is the same file as {tsv}" in one_line(err)
    assert not (tmp_path / "c").exists()


def test_spec_columns_as_a_list_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"user": [1, 2] * 10, "clicked": [0, 1] * 10}), tmp_path / "a.parquet")
    spec = tmp_path / "s.yaml"
    spec.write_text("label: clicked\ncolumns:\n  - user\n")
    rc, _, err = run(capsys, tmp_path / "a.parquet", "--spec", spec, "--out", tmp_path / "ds")
    assert rc == 2 and "'columns' must be a mapping of column name to its kind" in one_line(err)


def test_errors_quote_at_most_a_little_of_a_value(tmp_path, capsys):
    huge = "z" * 1_000_000
    a = csv(tmp_path / "a.csv", "clicked,x", [f"{i % 2},{i}.5" for i in range(40)])
    b = csv(tmp_path / "b.csv", "clicked,x", ["1,2.5", f"0,{huge}"])
    rc, _, err = run(capsys, a, b, "--label", "clicked", "--out", tmp_path / "ds")
    assert rc == 2 and f"{b} line 3: column 'x' holds 'zzz" in one_line(err) and len(err) < 1000
    tsv = write_lines(tmp_path / "train.txt", random_lines(10) + [criteo_line(1, cats=[huge] + ["0" * 8] * 25)])
    rc, _, err = prepare(capsys, "--input", tsv, "--out", tmp_path / "c")
    assert rc == 2 and "C1 value 'zzz" in one_line(err) and len(err) < 1000


def test_workers_are_capped_by_the_usable_cores(tmp_path, capsys):
    pq.write_table(pa.table({"user": [1, 2] * 10, "clicked": [0, 1] * 10}), tmp_path / "a.parquet")
    rc, out, err = run(capsys, tmp_path / "a.parquet", "--label", "clicked", "--out", tmp_path / "ds", "--workers", "4096")
    assert rc == 0 and f"--workers 4096 lowered to {usable_cores()}" in err
    assert f"with {usable_cores()} worker(s)" in out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(usable_cores() < 2 or not Path("/proc").is_dir(), reason="needs 2 cores and /proc")
def test_killed_import_leaves_no_workers_and_the_next_clears_its_folder(tmp_path, capsys):
    raw, marks = tmp_path / "raw", tmp_path / "marks"
    raw.mkdir(), marks.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"user": np.arange(100), "clicked": np.arange(100) % 2}), raw / f"{name}.parquet")
    script = tmp_path / "slow_import.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from wdl.ingest import importer

        def stuck(unit):  # a worker busy for long: say who it is, then wait
            open(os.path.join({str(marks)!r}, str(os.getpid())), "w").close()
            time.sleep(600)

        importer.stats_job = stuck
        importer.import_data([{str(raw)!r}], {str(tmp_path / "ds")!r}, label="clicked", workers=2, progress=False)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        workers = [int(p.name) for p in marks.iterdir()]
        assert len(workers) == 2 and len(list(tmp_path.glob("ds.tmp-*"))) == 1
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(_gone, workers)), "workers outlived the killed import"
    stale = next(tmp_path.glob("ds.tmp-*"))
    rc, _, err = run(capsys, raw, "--label", "clicked", "--out", tmp_path / "ds")
    assert rc == 0 and f"removed {stale}" in err and not stale.exists() and (tmp_path / "ds/manifest.json").exists()


def test_only_stale_folders_of_the_same_output_are_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = tmp_path / f"out.tmp-{dead.pid}-0000000b"
    kept = [tmp_path / f"out.tmp-{os.getppid()}-0000000a", held, tmp_path / f"other.tmp-{dead.pid}-0000000c"]
    stale = tmp_path / f"out.tmp-{dead.pid}-0000000d"
    for folder in [*kept, stale]:
        folder.mkdir()
    with leftovers.hold(held):  # a live process on another machine or in another container holds it
        assert leftovers.clear_stale(tmp_path / "out") == [stale]
    assert all(f.exists() for f in kept) and not stale.exists()
