"""What a killed run leaves beside its output: the writer's temporary folder `OUT.tmp-<pid>-<hex>`
(wdl.data.writer). A run holds a lock on its own folder while it writes (`hold`), and the next
run for the same output removes the folders nobody holds (`clear_stale`): only those of that
output, only when the process named in the folder's name is gone and the folder's lock is free.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def hold(folder: Path):
    """Lock `folder` (a writer's temporary folder) for as long as the block runs; the system
    lets go when the process ends, however it ends. Worker processes inherit the lock."""
    fd = _open(folder)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a file system without locks: the process id in the name still protects it
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


def clear_stale(out) -> list[Path]:
    """Remove the temporary folders of earlier runs for `out` that no live process owns; returns them."""
    out = Path(out).expanduser().absolute()
    pattern = re.compile(re.escape(out.name) + r"\.tmp-(\d+)-[0-9a-f]+")
    removed = []
    for folder in sorted(out.parent.glob(f"{glob.escape(out.name)}.tmp-*")):
        m = pattern.fullmatch(folder.name)
        if not m or folder.is_symlink() or not folder.is_dir() or _alive(int(m.group(1))) or not _free(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        print(f"wdl: removed {folder}, left by a run that did not finish", file=sys.stderr)
        removed.append(folder)
    return removed


def _open(folder: Path) -> int | None:
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Process `pid` runs here (a zombie has ended)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a process id: not ours to judge
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _free(folder: Path) -> bool:
    """Nobody holds the folder's lock (False where the lock cannot be tried: it may be held elsewhere)."""
    fd = _open(folder)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
