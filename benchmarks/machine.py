"""What a result was measured on: enough to tell two machines (and two code versions) apart."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def describe() -> dict:
    import torch

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "kind": machine_kind(gpus, cores),
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "memory_gb": mem_gb,
        "gpus": gpus,
        "arch": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": _version("torchrec"),
        "fbgemm_gpu": _version("fbgemm-gpu-cpu") or _version("fbgemm-gpu"),
        "pyarrow": _version("pyarrow"),
        "numpy": _version("numpy"),
        "scikit_learn": _version("scikit-learn"),
        "git": git_commit(),
    }


def machine_kind(gpus: list[str], cores: int | None) -> str:
    """A folder name for benchmarks/results: e.g. cpu-x86_64-2c or gpu-1xNVIDIA-H100-80GB-HBM3."""
    if gpus:
        return f"gpu-{len(gpus)}x{gpus[0].replace(' ', '-')}"
    return f"cpu-{platform.machine()}-{cores}c"
