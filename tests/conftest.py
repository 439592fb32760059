"""Shared fixtures: a tiny MovieLens-shaped data set written through the real DatasetWriter, a
matching config, and a folder nothing can be created in. Plain helper functions are in
helpers.py (`from helpers import ...`)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests run side by side with torchrun children

from helpers import (TINY_CONFIG, RUN_FUSED, RUN_TORCHREC, UNINTERRUPTED, make_tiny_dataset, ok,  # noqa: E402,F401 (TINY_CONFIG: older imports)
                     side_by_side, torchrun, write_tiny_config)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def tiny_config(tmp_path, tiny_data) -> Path:
    return write_tiny_config(tmp_path, tiny_data)


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory, tiny_data):
    """An uninterrupted 2-process torchrun run of the tiny config per back-end, 2 epochs with a
    checkpoint every 4 steps (helpers.UNINTERRUPTED). A launch costs about 15 s of two CPUs, so
    each back-end's is made once a session and only read after: test_distributed checks it and
    compares its cut and killed runs with it, test_plan compares its plan.txt with `wdl plan`'s,
    test_continual warm-starts one process from it. The first test that asks launches both
    back-ends' runs side by side (much of a launch is one process importing torch: two at once
    take less than two in turn); every user of one of them uses the other too.

    Called with the back-end's overrides (helpers.RUN_FUSED, RUN_TORCHREC): (run folder, the
    launch's output)."""
    from wdl.model.embeddings import torchrec_available

    config = write_tiny_config(tmp_path_factory.mktemp("two-rank"), tiny_data)
    done: dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess]] = {}

    def launch(backend: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
        name = "full-" + "-".join(o.split("=")[1] for o in backend if o.startswith("model.embedding_backend="))
        return config.parent / "runs" / name, torchrun(config, 2, *backend, *UNINTERRUPTED, f"run.name={name}")

    def run(backend: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
        if not done:
            both = [RUN_FUSED, *([RUN_TORCHREC] if torchrec_available() else [])]
            done.update(zip(map(tuple, both), side_by_side(*(partial(launch, b) for b in both))))
        if tuple(backend) not in done:
            done[tuple(backend)] = launch(backend)
        ok(done[tuple(backend)][1])  # a failed launch fails each test that reads it
        return done[tuple(backend)]

    return run


def _refusal(folder: Path) -> str | None:
    """The OS's reason for not creating a folder inside `folder`, or None if it can."""
    probe = folder / f"probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as e:
        return e.strerror
    probe.rmdir()
    return None


@pytest.fixture(params=["read_only", "under_a_file"])
def unwritable_folder(request, tmp_path):
    """(folder, reason): a path inside which nothing can be created, by anyone, root included,
    and the OS's words for why (the strerror a user would see).

    read_only: a folder without write permission; root ignores permission bits, so as root a
    folder on a file system that refuses new entries to everyone (sysfs, else procfs) stands in.
    under_a_file: a path whose parent is a regular file (ENOTDIR on every OS, for every user).
    """
    if request.param == "under_a_file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        folder = blocker / "folder"
        yield folder, _refusal(folder)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for folder in (ro, Path("/sys"), Path("/proc")):
            reason = _refusal(folder) if folder.is_dir() else None
            if reason:
                yield folder, reason
                return
        pytest.skip("no folder here refuses new entries to this user (root without /sys or /proc)")
    finally:
        ro.chmod(0o755)
