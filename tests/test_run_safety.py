"""Resume, checkpoints and run folders fail loudly or work exactly (single process, in-process
runs of `wdl train` on the tiny data set: each run takes about a second)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from wdl.cli import build_parser, main
from wdl.cli import parse_args
from wdl.model.embeddings import torchrec_available

from helpers import one_line_error, records, write_tiny_config


def train(config: Path, *args: str) -> int:
    return main(["train", "--config", str(config), *args])


def files(run: Path) -> dict[str, bytes]:
    """The run's files and their contents (the lock file names its latest holder: left out)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


@pytest.fixture
def two_epochs(tiny_config, tmp_path) -> Path:
    """A finished 2-epoch run with a checkpoint at each epoch end."""
    assert train(tiny_config, "run.name=base") == 0
    return tmp_path / "runs" / "base"


@pytest.mark.parametrize("read", [["data.in_memory=true"], ["data.in_memory=false", "data.num_workers=1"]],
                         ids=["in-memory", "loader-worker"])
def test_resumed_epoch_reports_the_whole_epoch(tiny_config, tmp_path, read):
    """A run cut mid-epoch and resumed logs the same epoch record (loss, rows, AUC, the warm-up's
    rate at the epoch's start) as one that was never cut: the epoch's loss so far travels in the
    checkpoint, and with dropout the random stream continues exactly (a loader's workers draw
    nothing from it)."""
    common = ["train.epochs=1", "model.deep.dropout=0.3", "optim.schedule.warmup_steps=40", *read]
    assert train(tiny_config, "run.name=whole", *common) == 0
    assert train(tiny_config, "run.name=cut", *common, "checkpoint.every_steps=5", "train.max_steps=7") == 0
    assert train(tiny_config, "run.name=cut", *common, "--resume", "auto") == 0
    (whole,), (cut,) = records(tmp_path / "runs" / "whole"), records(tmp_path / "runs" / "cut")
    assert cut["resumed_at_batch"] == 7 and cut["train_rows"] == whole["train_rows"] == 2400
    assert cut["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-7)
    assert cut["auc"] == pytest.approx(whole["auc"], abs=1e-9)
    assert cut["lr_scale"] == whole["lr_scale"] == 1 / 40


def test_a_model_cut_mid_epoch_is_never_the_selected_one(tiny_config, tmp_path):
    """train.max_steps stops a run mid-epoch: that epoch's evaluation is logged but not selected
    from, so after the resume the test split is scored with the same model as in an uncut run."""
    common = ["data.valid_fraction=0.2", "optim.deep.lr=0.05", "train.epochs=6"]
    assert train(tiny_config, "run.name=whole", *common) == 0
    assert train(tiny_config, "run.name=cut", *common, "train.max_steps=47") == 0  # 15 steps per epoch
    best = json.loads((tmp_path / "runs" / "cut" / "checkpoints" / "best" / "meta.json").read_text())
    assert best["batches_done"] == 0 and best["step"] <= 45
    assert train(tiny_config, "run.name=cut", *common, "--resume", "auto") == 0
    whole, cut = (json.loads((tmp_path / "runs" / r / "summary.json").read_text()) for r in ("whole", "cut"))
    assert cut["best_epoch"] == whole["best_epoch"]
    assert cut["test"]["auc"] == pytest.approx(whole["test"]["auc"], abs=1e-9)


def test_a_run_continued_from_an_older_checkpoint_sets_its_later_ones_aside(tiny_config, tmp_path, capsys):
    """The later checkpoints are another course of the run: left in place, `--resume auto` would
    jump back onto it (an epoch missing from metrics.jsonl) and `best` would be scored as this
    course's. They are moved aside, and the test split is scored only with the selected epoch's model."""
    common = ["data.valid_fraction=0.2", "optim.deep.lr=0.05"]
    assert train(tiny_config, "run.name=r", *common, "train.epochs=3") == 0
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["epoch"] > 1
    capsys.readouterr()
    # from epoch 1's end, with rates that learn nothing better: epoch 1 stays the best of this course
    assert train(tiny_config, "run.name=r", *common, "train.epochs=2", "optim.deep.lr=1e-30", "optim.wide.lr=1e-30",
                 "--resume", str(run / "checkpoints" / "step-00000015")) == 0
    out, err = capsys.readouterr()
    aside = run / "checkpoints" / "abandoned-after-step-00000015"
    assert f"best, step-00000030, step-00000045: those are moved to {aside}" in out
    assert sorted(p.name for p in aside.iterdir()) == ["best", "step-00000030", "step-00000045"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary.get("test") is None
    assert "does not hold the model of epoch 1" in err and "the test split is not scored" in err
    # the same rates again: FTRL's state holds its rate, so 1e-30 -> 0.1 would diverge (and now stops)
    assert train(tiny_config, "run.name=r", *common, "train.epochs=3", "optim.deep.lr=1e-30", "optim.wide.lr=1e-30",
                 "--resume", "auto") == 0
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    assert "resumed from " + str(run / "checkpoints" / "step-00000030") in capsys.readouterr().out


def test_every_steps_saves_an_epochs_last_step_when_epoch_ends_are_not_saved(tiny_config, tmp_path):
    assert train(tiny_config, "run.name=every", "checkpoint.at_epoch_end=false", "checkpoint.every_steps=19") == 0
    assert [c.name for c in checkpoints(tmp_path / "runs" / "every")] == ["step-00000019", "step-00000038"]


def test_a_forked_child_does_not_keep_the_run_folder_locked(tmp_path):
    """A data loader worker is a forked child: if it outlives a killed trainer by a moment, a
    restart must still get the folder."""
    import signal
    import time

    from wdl.train.run_folder import _HELD, _lock

    fd = _lock(tmp_path)
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.write(go, b"x")
        time.sleep(60)
        os._exit(0)
    try:
        os.read(ready, 1)
        _HELD.discard(fd)
        os.close(fd)  # the trainer dies
        again = _lock(tmp_path)
        assert again is not None
        _HELD.discard(again)
        os.close(again)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        os.close(go)


def test_damaged_checkpoint_falls_back_to_the_previous_good_one(tiny_config, two_epochs, capsys):
    older, newest = checkpoints(two_epochs)
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100:4196] = os.urandom(4096)  # damage inside the file, size unchanged
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    # an explicit path to it is refused with one line ...
    assert train(tiny_config, "--resume", str(newest)) == 2
    one_line_error(capsys.readouterr().err, str(newest), "is damaged", "does not match its checksum")
    # ... `auto` warns and continues from the epoch-1 checkpoint: epoch 2 trained again, logged once
    assert train(tiny_config, "run.name=base", "train.epochs=3", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}" in err
    assert [r["epoch"] for r in records(two_epochs)] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncate meta.json", "delete rng", "delete shard", "truncate .metadata"])
def test_each_kind_of_damage_is_found(two_epochs, damage):
    from wdl.checkpoint import checkpoint_damage, newest_good_checkpoint

    older, newest = checkpoints(two_epochs)
    assert checkpoint_damage(newest) is None
    target = {"truncate meta.json": newest / "meta.json", "delete rng": newest / "rng-rank00000.json",
              "delete shard": next(newest.glob("*.distcp")), "truncate .metadata": newest / ".metadata"}[damage]
    if damage.startswith("delete"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert checkpoint_damage(newest) is not None
    assert newest_good_checkpoint(two_epochs / "checkpoints") == older


def test_a_run_folder_has_one_owner(tiny_config, two_epochs, tmp_path, capsys):
    before = files(two_epochs)
    fd = os.open(two_epochs / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
    try:
        capsys.readouterr()
        assert train(tiny_config, "run.name=base", "train.epochs=3", "--resume", "auto") == 2
        one_line_error(capsys.readouterr().err, str(two_epochs), "is in use by another run")
        # a fresh run of the same name skips a locked, still empty folder too
        (tmp_path / "runs" / "fresh").mkdir()
        fd2 = os.open(tmp_path / "runs" / "fresh" / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train(tiny_config, "run.name=fresh", "train.epochs=1") == 0
        assert (tmp_path / "runs" / "fresh-1" / "summary.json").exists()
        os.close(fd2)
    finally:
        os.close(fd)
    assert files(two_epochs) == before
    # the lock goes with its holder: the same resume now works
    assert train(tiny_config, "run.name=base", "train.epochs=3", "--resume", "auto") == 0


def test_killed_before_the_first_checkpoint_logs_each_epoch_once(tiny_config, two_epochs):
    """As after a SIGKILL during the first epoch-end checkpoint: epochs are logged, no
    checkpoint completed (a half-written one is left), no summary. `--resume auto` starts over."""
    for c in checkpoints(two_epochs):
        shutil.rmtree(c)
    (two_epochs / "checkpoints" / "step-00000007.tmp").mkdir()  # cut short mid-save
    (two_epochs / "summary.json").unlink()
    assert train(tiny_config, "run.name=base", "--resume", "auto") == 0
    assert [r["epoch"] for r in records(two_epochs)] == [1, 2]
    assert not list((two_epochs / "checkpoints").glob("*.tmp"))  # the half-written one is cleared


def test_resume_auto_never_overwrites_a_finished_run_without_checkpoints(tiny_config, tmp_path, capsys):
    assert train(tiny_config, "run.name=done", "train.epochs=1", "checkpoint.at_epoch_end=false") == 0
    run = tmp_path / "runs" / "done"
    before = files(run)
    capsys.readouterr()
    assert train(tiny_config, "run.name=done", "--resume", "auto") == 2
    one_line_error(capsys.readouterr().err, "holds a finished run and no checkpoint")
    assert files(run) == before


def test_unwritable_paths_fail_before_training_and_leave_no_run_folder(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a path under a file cannot be created, even by root
    capsys.readouterr()
    assert train(tiny_config, f"run.out_dir={blocker}/runs") == 2
    one_line_error(capsys.readouterr().err, "run.out_dir", "cannot create folder")
    assert train(tiny_config, "run.name=ck", f"checkpoint.dir={blocker}/ckpt") == 2
    one_line_error(capsys.readouterr().err, "checkpoint.dir", "cannot create folder")
    assert not (tmp_path / "runs" / "ck").exists()  # a failed start uses up no run name


def test_overrides_anywhere_on_the_command_line():
    args = parse_args(build_parser(), ["train", "--config", "c.yaml", "a.b=1", "--resume", "auto", "c.d=2"])
    assert args.resume == "auto" and args.overrides == ["a.b=1", "c.d=2"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "--config", "c.yaml", "--bogus"])


def test_ids_outside_the_vocabulary_are_counted_and_stop_the_run_above_the_limit(tiny_config, tmp_path, capsys):
    """user_id holds 1..50: with vocab_size 49 the raw 49 and 50 would silently train id 0."""
    capsys.readouterr()
    assert train(tiny_config, "run.name=oov", "features.columns.user_id.vocab_size=40") == 2
    one_line_error(capsys.readouterr().err, "column 'user_id'", "outside its vocabulary", "'train' split", "data.max_unknown_fraction")
    assert not (tmp_path / "runs" / "oov").exists()
    assert train(tiny_config, "run.name=oov", "train.epochs=1", "features.columns.user_id.vocab_size=49",
                 "data.max_unknown_fraction=0.1") == 0
    assert "unknown ids (id 0): train: user_id " in capsys.readouterr().out
    counts = json.loads((tmp_path / "runs" / "oov" / "summary.json").read_text())["unknown_ids"]
    train_rows, test_rows = counts["train"]["user_id"], counts["test"]["user_id"]
    assert train_rows["values"] == 2400 and test_rows["values"] == 600
    assert 0 < train_rows["out_of_vocab"] < 0.1 * 2400 and train_rows["missing"] == 0


def test_an_empty_split_and_a_single_class_split_are_named(tiny_data, tmp_path, capsys):
    """A copy of the tiny set whose test split is emptied, then given one class only."""
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    config = write_tiny_config(tmp_path, data)
    for f in (data / "test").glob("*.parquet"):  # all labels 0
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label",
                                    pa.array([0] * t.num_rows, pa.int8())), f)
    manifest["splits"]["test"]["positive_rate"] = 0.0
    (data / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train(config, "train.epochs=1") == 0
    assert "every label of the 'test' split is 0, so its AUC is undefined" in capsys.readouterr().err
    manifest["splits"]["test"]["rows"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert train(config, "train.epochs=1") == 2
    one_line_error(capsys.readouterr().err, "the 'test' split", "(data.eval_split) has 0 rows")


def test_mid_epoch_resume_on_another_data_set_is_refused(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    config = write_tiny_config(tmp_path, data)
    assert train(config, "run.name=cut", "checkpoint.every_steps=5", "train.max_steps=7") == 0
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["source"]["seed"] = 12345  # a data set written again: another one as far as a read position goes
    (data / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train(config, "run.name=cut", "--resume", "auto") == 2
    one_line_error(capsys.readouterr().err, "saved mid-epoch with data set (manifest hash)=")


# ------------------------------------------------- start-up refusals (were 1-process torchrun launches)
@pytest.mark.skipif(not torchrec_available(), reason="torchrec + fbgemm-gpu-cpu not installed")
def test_row_wise_on_cpu_is_a_clear_error(tiny_config, capsys):
    capsys.readouterr()
    assert train(tiny_config, "model.embedding_backend=torchrec", "optim.deep.name=adagrad",
                 "distributed.tables={deep_user_id: row_wise}") == 2
    one_line_error(capsys.readouterr().err, "row_wise needs CUDA")


def test_resume_without_checkpoint_is_a_clear_error(tiny_config, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    capsys.readouterr()
    assert train(tiny_config, "--resume", str(empty)) == 2
    one_line_error(capsys.readouterr().err, "no complete checkpoint")


def test_incompatible_checkpoint_is_a_clear_error(tiny_config, tmp_path, capsys):
    assert train(tiny_config, "train.epochs=1", "run.name=small") == 0
    capsys.readouterr()
    assert train(tiny_config, "model.deep.embeddings={user_id: 16, movie_id: 8, genres: 4}",
                 "--resume", str(tmp_path / "runs" / "small")) == 2
    one_line_error(capsys.readouterr().err, "incompatible config", "deep_tables")
    # a cross over other columns, same bucket count: same shape, other meaning
    assert train(tiny_config, "features.crosses.gender_movie.columns=[user_id, movie_id]",
                 "--resume", str(tmp_path / "runs" / "small")) == 2
    one_line_error(capsys.readouterr().err, "incompatible config", "crosses")


def test_mid_epoch_resume_with_another_batch_size_is_refused(tiny_config, tmp_path, capsys):
    """A mid-epoch read position is a batch count: with another batch size it would repeat or
    skip rows, so the resume stops with one line (an epoch-end checkpoint loads with any)."""
    assert train(tiny_config, "run.name=cut", "checkpoint.every_steps=4", "train.max_steps=6") == 0
    capsys.readouterr()
    assert train(tiny_config, "run.name=cut", "data.batch_size=64", "--resume", "auto") == 2
    cap = capsys.readouterr()
    one_line_error(cap.err, "saved mid-epoch with data.batch_size=128", "data.batch_size=64 now")
    assert "best test AUC" not in cap.out  # nothing trained, nothing logged


@pytest.mark.parametrize("every", [0, 5])
def test_diverged_training_stops_with_one_line(tiny_config, tmp_path, capsys, every):
    """...and saves nothing after its loss stopped being finite: `--resume auto` with lower rates
    must not start from a broken model."""
    capsys.readouterr()
    assert train(tiny_config, "run.name=div", "optim.deep.lr=1e30", "optim.wide.lr=1e30", "train.epochs=1",
                 f"checkpoint.every_steps={every}") == 2
    one_line_error(capsys.readouterr().err, "training diverged", "epoch 1", "nothing saved since")
    assert not (tmp_path / "runs" / "div" / "metrics.jsonl").exists()  # no epoch with a non-finite loss logged
    assert not checkpoints(tmp_path / "runs" / "div")


def test_the_cli_parser_loads_no_torch():
    """Commands without a model (wdl data ...) start in well under a second: building the parser
    must not import torch (about 3 s), which the model commands load when they run."""
    import subprocess
    import sys

    code = "import sys, wdl.cli; wdl.cli.build_parser(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
