"""How many threads torch's CPU operators use in this process (intra-op threads).

torch's OpenMP threads spin while they wait for each other, so a parallel region waits for the
slowest one: when another process takes one of their cores, every region waits for the thread
that lost its core. Measured on a 2-core host (MovieLens-100k epoch): 2 threads 0.57-0.71 s
quiet but 2.0-3.1 s beside one busy process, where 1 thread keeps 0.9 s; 12x slower at load 6.
No fixed count is best in both cases, so wdl chooses:

- the cores this process may use (its CPU affinity, a cgroup CPU quota), shared by the ranks of
  this host, less the loader worker processes of this rank; at least 1;
- then, between steps, fewer while other processes load those cores (LoadFollower).

`train.threads` (or OMP_NUM_THREADS in the environment) fixes the count instead.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from wdl.errors import ConfigError

if TYPE_CHECKING:
    from wdl.config import DataConfig
    from wdl.distributed.env import DistEnv

# Another process's load below this share of a core is left alone: a quiet host has some, and
# the first core taken costs a thread only when it is mostly taken.
SLACK_CORES = 0.3
INTERVAL_S = 0.5  # how often the load is looked at (a MovieLens-100k epoch is ~0.6 s quiet)
STAT = Path("/proc/stat")  # busy time per CPU (Linux); without it the count is not followed


@dataclass(frozen=True)
class Cores:
    count: int
    why: str  # e.g. "2 cores in this process's affinity"
    cpus: frozenset[int]  # the CPUs it may run on
    by_quota: bool  # the count is a cgroup quota's: other processes on those CPUs do not take it


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str
    follow_load: bool  # lower the count while other processes load our cores


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> Cores:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset(range(os.cpu_count() or 1))
    quota = cgroup_quota(cgroup)
    if quota is not None and quota < len(cpus):
        n = max(1, int(quota))  # a spinning thread past the quota is throttled whole periods
        return Cores(n, f"cgroup CPU quota {quota:g} of {len(cpus)} cores", cpus, True)
    return Cores(len(cpus), f"{len(cpus)} cores in this process's affinity", cpus, False)


def cgroup_quota(root: Path) -> Optional[float]:
    """Cores' worth of CPU time the cgroup allows (v2 cpu.max, v1 cfs quota), None without a limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def choose_threads(requested: int, local_ranks: int, loader_workers: int, cores: Cores,
                   environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    """train.threads if given, else OMP_NUM_THREADS if set, else the cores per local rank less the
    loader workers (at least 1), lowered later while other processes load the cores."""
    if requested < 0:
        raise ConfigError(f"train.threads={requested}: must be >= 0 (0: chosen by wdl)")
    if requested > 0:
        return ThreadChoice(requested, "train.threads", False)
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0]  # OpenMP allows a list per nesting level
        if not first.isdigit() or int(first) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={omp!r} in the environment is not a whole number >= 1; "
                              "unset it (wdl chooses) or set train.threads")
        return ThreadChoice(int(first), f"OMP_NUM_THREADS={omp} in the environment (torchrun sets 1 for "
                                        "several processes per host); train.threads=N overrides it", False)
    n = max(1, cores.count // max(1, local_ranks) - loader_workers)
    why = cores.why
    if local_ranks > 1:
        why += f" / {local_ranks} ranks on this host"
    if loader_workers:
        why += f" - {loader_workers} loader workers"
    follow = not cores.by_quota and _readable(STAT)
    return ThreadChoice(n, why + ("; fewer while other processes load them" if follow else ""), follow)


def threads_for(cap: int, cores: int, foreign: float) -> int:
    """The threads to run with `foreign` cores' worth of other processes on our `cores`: a core
    each process mostly takes is one thread fewer, never more than `cap`, at least 1."""
    taken = math.ceil(foreign - SLACK_CORES) if foreign > SLACK_CORES else 0
    return max(1, min(cap, cores - taken))



class LoadFollower:
    """Between steps, sets torch's threads to `threads_for` the load other processes put on our
    CPUs since the last look: the busy time /proc/stat counts on them less this process's own CPU
    time (so our own spinning threads are not counted, and other ranks and loader workers are).

    `tick()` is cheap (a clock read) except once per INTERVAL_S, and must run on the thread that
    runs the operators: OpenMP's thread count is that thread's setting."""

    def __init__(self, cap: int, cpus: frozenset[int], interval_s: float = INTERVAL_S, stat: Path = STAT) -> None:
        self.cap, self.threads, self.cpus = cap, cap, cpus
        self.interval_s, self.stat = interval_s, stat
        self.changes = 0  # how often the count changed (reported with the epoch)
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()

    def tick(self) -> int:
        now = time.monotonic()
        if now - self._last[0] >= self.interval_s:
            sample = self._sample()
            wall, host, own = (b - a for a, b in zip(self._last, sample))
            self._last = sample
            threads = threads_for(self.cap, len(self.cpus), max(0.0, host - own) / wall)
            if threads != self.threads:
                import torch

                torch.set_num_threads(threads)
                self.threads, self.changes = threads, self.changes + 1
        return self.threads

    def _sample(self) -> tuple[float, float, float]:
        """(wall clock, busy seconds of our CPUs, this process's CPU seconds)."""
        busy = 0
        for line in self.stat.read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                # user nice system idle iowait irq softirq steal ...: all but idle and iowait
                busy += sum(int(v) for v in fields[:8]) - int(fields[3]) - int(fields[4])
        return time.monotonic(), busy / self._tick, time.process_time()


class IntraOpThreads:
    """The process's thread choice: set once (printed by rank 0), then followed between steps."""

    def __init__(self, choice: ThreadChoice, cores: Cores) -> None:
        import torch

        self.choice = choice
        torch.set_num_threads(choice.threads)
        self.follower = LoadFollower(choice.threads, cores.cpus) if choice.follow_load else None

    @classmethod
    def start(cls, requested: int, data: DataConfig, env: DistEnv) -> "IntraOpThreads":
        """`requested`: train.threads; the loader workers are data's, when it streams."""
        cores = available_cores()
        choice = choose_threads(requested, env.local_world_size, 0 if data.in_memory else data.num_workers, cores)
        if env.is_main:
            print(f"wdl: {choice.threads} intra-op threads ({choice.why})", flush=True)
        return cls(choice, cores)

    def tick(self) -> int:
        """Call once per step; the thread count now."""
        return self.follower.tick() if self.follower is not None else self.choice.threads

    @property
    def now(self) -> int:
        return self.follower.threads if self.follower is not None else self.choice.threads


def _readable(path: Path) -> bool:
    try:
        path.read_text()
        return True
    except OSError:
        return False
