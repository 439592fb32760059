"""The process pool of preparation, generation and import: jobs in order, memory bounded, at most
one worker per core, and workers that die with the process that started them."""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # prctl's option (linux/prctl.h)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(requested: int, flag: str = "--workers") -> int:
    """`requested` processes, at least 1 and at most the usable cores: more would only take turns
    on them, with a copy of the reading state each. Lowering it is said on stderr."""
    cores = usable_cores()
    workers = max(1, int(requested))
    if workers > cores:
        print(f"wdl: note: {flag} {workers} lowered to {cores}, the cores this process may use", file=sys.stderr)
        return cores
    return workers


def ordered_map(job, items, workers: int, initializer, initarg):
    """`job(item)` for each item, results in input order. With workers > 1 a process pool runs
    the jobs with at most 2 items per worker in flight, so reading ahead never outgrows memory
    (Pool.imap would consume the whole input iterator at once)."""
    if workers <= 1:
        initializer(initarg)
        for item in items:
            yield job(item)
        return
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(os.getpid(), initializer, initarg)) as pool:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(job, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _start_worker(parent: int, initializer, initarg) -> None:
    _die_with(parent)
    initializer(initarg)


def _die_with(parent: int) -> None:
    """End this worker when `parent` ends, however it ends (SIGKILL included): a worker waiting
    on the pool's pipe would otherwise wait forever, holding memory and open files. Linux's
    parent-death signal where there is one, else a thread that watches the parent."""
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="wdl-parent-watch").start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
