"""Create one virtual environment per peer under .venv-peers/<name> (only when asked).

Each peer gets its own venv so its pins (numpy<2, an older torchvision, ...) never touch ours.
torch is always pinned: an unpinned `torch` pulls a multi-GB CUDA build.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venv-peers"

# name -> pip requirement lists, installed in order (one pip call each).
PEERS: dict[str, dict] = {
    "deepctr-torch": {
        # deepctr-torch imports `requests` (its version check) without declaring it.
        "steps": [["torch==2.13.0"], ["deepctr-torch==0.3.0", "requests", "scikit-learn", "numpy"]],
        "check": "import deepctr_torch, torch; print(deepctr_torch.__version__, torch.__version__)",
    },
    "pytorch-widedeep": {
        # pytorch-widedeep imports torchvision at package import (its image models). PyPI's
        # torchvision is a CUDA build that cannot load beside a CPU torch, and no CPU torchvision
        # wheel for torch 2.13 is reachable here; a matching torch/torchvision pair (a CUDA build
        # that runs on the CPU) is. So this peer runs on torch 2.14.1: the report says so.
        "steps": [["torch==2.14.1", "torchvision==0.29.1"], ["pytorch-widedeep==1.7.0", "numpy<2", "torch==2.14.1",
                                                           "torchvision==0.29.1"]],
        "check": "import pytorch_widedeep, torch; print(pytorch_widedeep.__version__, torch.__version__)",
    },
}


def python_of(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def check(name: str) -> tuple[bool, str]:
    """(importable, versions or the error's last line)."""
    py = python_of(name)
    if not py.exists():
        return False, f"not installed (run `wdl bench run peers-movielens-100k --install-peers` to create {py.parent.parent})"
    r = subprocess.run([str(py), "-c", PEERS[name]["check"]], capture_output=True, text=True)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, f"import failed: {lines[-1] if lines else 'no output'}"
    return True, r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""


def install(name: str) -> tuple[bool, str]:
    target = VENVS / name
    if not python_of(name).exists():
        print(f"bench: creating {target}", flush=True)
        venv.EnvBuilder(with_pip=True).create(target)
    for reqs in PEERS[name]["steps"]:
        print(f"bench: [{name}] pip install {' '.join(reqs)}", flush=True)
        r = subprocess.run([str(python_of(name)), "-m", "pip", "install", "-q", *reqs])
        if r.returncode != 0:
            return False, f"pip install {' '.join(reqs)} failed (exit {r.returncode})"
    return check(name)


if __name__ == "__main__":
    for n in sys.argv[1:] or PEERS:
        print(n, install(n))
