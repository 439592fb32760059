"""No load path runs code from a file, and checkpoint and export faults are one line.

Crafted files are made the way an attacker would: a pickle whose unpickling creates a marker
file, with the checkpoint's meta.json checksums recomputed (they guard against damage, not
against a person). Each is loaded through the real CLI in a subprocess: one line, exit 2, and
the marker never appears. The faults run in-process on the tiny data set (about a second a run).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from wdl.cli import main

from helpers import ROOT, one_line_error, write_tiny_config

WDL = [sys.executable, "-m", "wdl.cli"]


class Touch:
    """Unpickling this calls Path.touch(marker): any code a pickle can name runs as it loads."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def train(config: Path, *args: str) -> int:
    return main(["train", "--config", str(config), *args])


def wdl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*WDL, *args], capture_output=True, text=True, env=env, timeout=300)


def restamp(ckpt: Path) -> None:
    """Recompute meta.json's sizes and CRC-32s over every file in `ckpt`, as anyone can."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {p.name: {"bytes": p.stat().st_size, "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
                     for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "meta.json"}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


@pytest.fixture
def run(tiny_config, tmp_path) -> Path:
    """A finished 1-epoch run (one checkpoint)."""
    assert train(tiny_config, "run.name=base", "train.epochs=1") == 0
    return tmp_path / "runs" / "base"


# ------------------------------------------------------------------------- crafted files
def test_a_pickled_rng_file_is_never_unpickled(tiny_config, run, tmp_path):
    marker = tmp_path / "ran"
    (ckpt,) = checkpoints(run)
    (ckpt / "rng-rank00000.json").unlink()
    (ckpt / "rng-rank00000.pt").write_bytes(pickle.dumps(Touch(marker)))  # the older wdl's file name
    restamp(ckpt)
    r = wdl("train", "--config", str(tiny_config), "train.epochs=2", "--resume", str(ckpt))
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, str(ckpt), "rng-rank00000.pt", "no longer unpickles")
    assert not marker.exists()


def test_a_malformed_rng_file_is_one_line(tiny_config, run, capsys):
    (ckpt,) = checkpoints(run)
    (ckpt / "rng-rank00000.json").write_text(json.dumps({"python": {"version": 3, "state": "x"}}))
    restamp(ckpt)
    assert train(tiny_config, "train.epochs=2", "--resume", str(ckpt)) == 2
    one_line_error(capsys.readouterr().err, "rng-rank00000.json", "not a random state")


def test_a_crafted_metadata_pickle_is_refused(run, tmp_path):
    marker = tmp_path / "ran"
    (ckpt,) = checkpoints(run)
    (ckpt / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    restamp(ckpt)
    r = wdl("predict", str(run), "--checkpoint", str(ckpt), "--out", str(tmp_path / "scores.parquet"))
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, str(ckpt / ".metadata"), "pathlib", "refused")
    assert not marker.exists()


def test_torchs_own_metadata_loads_through_the_allow_list(run):
    from wdl.checkpoint import read_metadata

    (ckpt,) = checkpoints(run)
    assert "model.model.wide.embeddings.rows.weight" in read_metadata(ckpt / ".metadata").state_dict_metadata


@pytest.fixture(scope="module")
def pristine_export(tmp_path_factory, tiny_data) -> Path:
    """The export of a finished 1-epoch run of the tiny config (as `run`), made once: a test that
    crafts an export crafts its own copy of it (`exported`)."""
    root = tmp_path_factory.mktemp("export")
    config = write_tiny_config(root, tiny_data)
    assert train(config, "run.name=base", "train.epochs=1") == 0
    assert main(["export", str(root / "runs" / "base"), "--out", str(root / "exported")]) == 0
    return root / "exported"


@pytest.fixture
def exported(pristine_export, tmp_path) -> Path:
    """A fresh copy of the module's export, this test's to alter."""
    out = tmp_path / "exported"
    shutil.copytree(pristine_export, out)
    return out


def rewrite_program(folder: Path, change) -> None:
    """Rewrite model.pt2's members: change(name, bytes) -> bytes (or None to drop the member)."""
    src = folder / "model.pt2"
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                z.writestr(name, data)


def test_an_export_whose_weights_ask_to_be_unpickled_is_refused(exported, tmp_path):
    marker = tmp_path / "ran"

    def pickled_first_weight(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(Touch(marker))
        return data

    rewrite_program(exported, pickled_first_weight)
    code = "import sys; from wdl.cli import run_guarded; from wdl.serve import Scorer; sys.exit(run_guarded(Scorer.load, sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(exported)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "model.pt2", "use_pickle", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("craft", ["guard", "shape expression", "operator", "compiled library", "sample inputs"])
def test_an_export_with_code_in_it_is_refused(exported, tmp_path, craft):
    """torch.export.load evaluates shape expressions (sympify), exec's guards in .module(), calls
    any torch.* attribute a node names, loads AOTInductor libraries and retries sample inputs
    with weights_only=False: each is refused before torch reads the file."""
    from wdl.errors import ArtefactError
    from wdl.serve import Scorer

    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            text = data.decode()
            if craft == "guard":
                program = json.loads(text)
                program["guards_code"].append(f"{code} or True")
                return json.dumps(program).encode()
            if craft == "shape expression":
                return text.replace("Symbol(", f"({code}) or Symbol(", 1).encode()
            if craft == "operator":
                return text.replace("torch.ops.aten.sigmoid.default", "torch.os.system", 1).encode()
        if craft == "sample inputs" and "sample_inputs" in name:
            return pickle.dumps(Touch(marker))
        return data

    rewrite_program(exported, change)
    if craft == "compiled library":
        with zipfile.ZipFile(exported / "model.pt2", "a") as z:
            z.writestr("model/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ArtefactError, match="refused"):
        Scorer.load(exported)
    assert not marker.exists()


# ------------------------------------------------------------------------- checkpoint faults
def test_resume_auto_skips_a_truncated_meta_json(tiny_config, run, capsys):
    assert train(tiny_config, "run.name=base", "train.epochs=2", "--resume", "auto") == 0
    older, newest = checkpoints(run)
    meta = newest / "meta.json"
    meta.write_text(meta.read_text()[:40])
    capsys.readouterr()
    assert train(tiny_config, "run.name=base", "train.epochs=3", "--resume", "auto") == 0
    out, err = capsys.readouterr()
    assert f"skipping damaged checkpoint {newest}" in err and "Traceback" not in err
    assert f"resumed from {older}" in out


def test_every_checkpoint_damaged_is_said(tiny_config, run, capsys):
    (ckpt,) = checkpoints(run)
    next(ckpt.glob("*.distcp")).write_bytes(b"broken")
    assert train(tiny_config, "run.name=base", "train.epochs=2", "--resume", "auto") == 2
    one_line_error(capsys.readouterr().err.splitlines()[-1], "every checkpoint", "damaged")


def _failing_write(monkeypatch, exc: BaseException) -> None:
    import torch.distributed.checkpoint.filesystem as fs

    def write(*args, **kwargs):
        raise exc

    monkeypatch.setattr(fs, "_write_item", write)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tiny_config, run, monkeypatch, capsys):
    (good,) = checkpoints(run)
    _failing_write(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert train(tiny_config, "run.name=base", "train.epochs=2", "--resume", "auto") == 2
    one_line_error(capsys.readouterr().err, "cannot write checkpoint", "No space left on device", str(good), "untouched")
    from wdl.checkpoint import newest_good_checkpoint

    assert newest_good_checkpoint(run / "checkpoints") == good
    assert [p.name for p in (run / "checkpoints").iterdir()] == [good.name]  # nothing half-written left


def test_ctrl_c_inside_a_checkpoint_write_is_an_interrupt(tiny_config, run, monkeypatch, capsys):
    _failing_write(monkeypatch, KeyboardInterrupt())
    assert train(tiny_config, "run.name=base", "train.epochs=2", "--resume", "auto") == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_run_folder_deleted_while_saving_is_one_line(tiny_config, tmp_path, monkeypatch, capsys):
    from wdl.checkpoint import Checkpointer

    save = Checkpointer._save

    def deleted_first(self, *args):
        shutil.rmtree(self.folder.parent)
        return save(self, *args)

    monkeypatch.setattr(Checkpointer, "_save", deleted_first)
    assert train(tiny_config, "run.name=gone", "train.epochs=1") == 2
    one_line_error(capsys.readouterr().err, "cannot write checkpoint", "is gone")
    assert not (tmp_path / "runs" / "gone").exists()  # not recreated


def test_sigterm_is_an_interrupt(tiny_config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([*WDL, "train", "--config", str(tiny_config), "train.epochs=100000"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if "sharding plan" in line:
                break
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)"


def test_resume_path_says_which_run_folder_it_continues(tiny_config, run, capsys):
    (ckpt,) = checkpoints(run)
    assert train(tiny_config, "run.name=other", "train.epochs=2", "--resume", str(ckpt)) == 0
    out = capsys.readouterr().out
    assert f"continuing that checkpoint's run in {run}" in out
    assert not (run.parent / "other").exists()


def test_a_refused_resume_leaves_plan_txt_alone(tiny_config, run, capsys):
    before = (run / "plan.txt").read_bytes()
    assert train(tiny_config, "train.epochs=2", "model.deep.embeddings.user_id=12", "--resume", "auto",
                 "run.name=base") == 2
    one_line_error(capsys.readouterr().err, "incompatible")
    assert (run / "plan.txt").read_bytes() == before


# ------------------------------------------------------------------------------ export
def test_export_onto_an_export_needs_overwrite_and_swaps_whole(run, exported, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file()}
    assert main(["export", str(run), "--out", str(exported)]) == 2
    one_line_error(capsys.readouterr().err, str(exported), "--overwrite")

    import wdl.export
    from wdl.errors import ArtefactError

    def broken(path):
        raise ArtefactError(f"{path}: broken")

    monkeypatch.setattr(wdl.export.Scorer, "load", broken)  # the new export fails its check ...
    assert main(["export", str(run), "--out", str(exported), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file()} == before  # ... the old one stays
    monkeypatch.undo()
    assert main(["export", str(run), "--out", str(exported), "--overwrite"]) == 0
    assert sorted(p.name for p in exported.parent.iterdir() if p.name.startswith("exported")) == ["exported"]
