"""The run folder: which one a run writes to, the checkpoint it resumes from, and one owner at
a time.

Fresh runs get out_dir/name, or name-1, name-2, ... so an earlier run's files are never
overwritten. `resume: auto` reuses out_dir/name and continues from its newest good checkpoint
if there is one (so a torchrun restart uses the same command line), and refuses to start over
when every checkpoint there is damaged; an explicit path must hold a good checkpoint, and its own
run goes on in its own folder whatever run.name says (the folder used is printed when they differ). Rank 0 holds an exclusive lock on `<run folder>/.lock` for the whole run
(released by the kernel if the process dies), so two runs never write into one folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import torch.distributed as dist

from wdl.checkpoint import complete_checkpoints, find_checkpoint, newest_good_checkpoint
from wdl.config import Config
from wdl.distributed.env import DistEnv
from wdl.errors import CheckpointError, ConfigError, WdlError

LOCK = ".lock"
# What a run writes before its first step: a folder holding only these is an unused one.
START_FILES = {LOCK, "config.yaml", "plan.txt", "run.log"}

# The lock descriptors this process holds. A forked child (a data loader worker) closes its
# copies at once: a flock belongs to the open file, so a worker outliving a killed trainer by a
# few seconds would otherwise keep the folder locked against the restart. Closing (never
# unlocking) a copy leaves the parent's lock as it is.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunFolder:
    """A locked run folder. `resume_from`: the checkpoint to continue from (None: start fresh);
    `restart`: the folder holds records of an earlier attempt with no checkpoint (they are
    dropped: training starts again from step 0)."""

    def __init__(self, path: Path, lock_fd: int, created: bool, resume_from: Path | None, restart: bool) -> None:
        self.path, self.resume_from, self.restart = path, resume_from, restart
        self._lock_fd: int | None = lock_fd
        self._created = created

    @classmethod
    def open(cls, cfg: Config) -> "RunFolder":
        base = Path(cfg.run.out_dir) / cfg.run.name
        resume = cfg.checkpoint.resume
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else base / "checkpoints"
        if resume == "auto":
            created = not base.exists()
            fd = _lock(_mkdir(base, "run.out_dir"))
            if fd is None:
                raise ConfigError(f"run folder {base} is in use by another run ({_holder(base)}); wait for it to "
                                  f"finish or pick another run.name (remove {base / LOCK} only if that process is gone)")
            ckpt = newest_good_checkpoint(ckpt_dir)
            if ckpt is None and complete_checkpoints(ckpt_dir):  # never start over silently on top of them
                os.close(fd)
                raise CheckpointError(f"every checkpoint in {ckpt_dir} is damaged (see the warnings above), so run "
                                      f"{base} cannot continue; move them away to train it again from the start")
            restart = ckpt is None and (base / "metrics.jsonl").exists()
            if ckpt is None and (base / "summary.json").exists():
                os.close(fd)
                raise CheckpointError(f"run folder {base} holds a finished run and no checkpoint to continue from; "
                                      "pick another run.name (or remove the folder) to train again")
            return cls(base, fd, created, ckpt, restart)
        if resume and not cfg.train.eval_only:  # continue a given checkpoint in its own run folder
            ckpt = find_checkpoint(resume, ckpt_dir)
            path = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else base
            fd = _lock(_mkdir(path, "run.out_dir"))
            if fd is None:
                raise ConfigError(f"run folder {path} is in use by another run ({_holder(path)})")
            if path.resolve() != base.resolve():  # the checkpoint's run goes on, not a new one named run.name
                print(f"wdl: --resume {resume}: continuing that checkpoint's run in {path} (not in {base}, "
                      f"which run.name={cfg.run.name} names)", flush=True)
            return cls(path, fd, False, ckpt, False)
        # A fresh folder (also for evaluating a checkpoint): the first free name.
        ckpt = find_checkpoint(resume, ckpt_dir) if resume else None
        path, i = base, 0
        while True:
            created = not path.exists()
            if created or _holds_only(path, {LOCK}):
                fd = _lock(_mkdir(path, "run.out_dir"))
                if fd is not None and _holds_only(path, {LOCK}):  # still empty now that it is ours
                    return cls(path, fd, created, ckpt, False)
                if fd is not None:
                    os.close(fd)
            i += 1
            path = base.with_name(f"{base.name}-{i}")

    def check_writable(self, folder: Path, key: str) -> None:
        """Fail now, not after an epoch, when `folder` (e.g. checkpoint.dir) cannot be written."""
        _mkdir(folder, key)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: cannot write into {folder} (permission denied)")

    def discard_if_unused(self) -> None:
        """After a failed start: remove a folder this run created and never trained into, so a
        failed start does not use up a run name."""
        if self._created and _holds_only(self.path, START_FILES):
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None


def _mkdir(path: Path, key: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create folder {path} ({e.strerror or e})") from None
    return path


def _holds_only(path: Path, names: set[str]) -> bool:
    try:
        return {p.name for p in path.iterdir()} <= names
    except OSError:
        return False


def _lock(folder: Path) -> int | None:
    """An exclusive lock on folder/.lock, or None when another process holds it."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot write into {folder} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _HELD.add(fd)
    return fd


def _holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


def open_run_folder(cfg: Config, env: DistEnv) -> tuple[RunFolder | None, Path, Path | None, bool]:
    """Rank 0 opens (and locks) the run folder; every rank learns where it is and what to resume."""
    folder, box = None, [None, None, False, None]
    if env.is_main:
        try:
            folder = RunFolder.open(cfg)
            box = [str(folder.path), str(folder.resume_from) if folder.resume_from else None, folder.restart, None]
        except WdlError as e:
            box = [None, None, False, e]
    if env.distributed:
        dist.broadcast_object_list(box, src=0)
    if box[3] is not None:
        raise box[3]
    return folder, Path(box[0]), Path(box[1]) if box[1] else None, box[2]
