"""Run a suite: each system in turn (one function per kind, SYSTEMS), then results.json,
results.csv, plots and report.md, each written once."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import machine, runners
from benchmarks.results import summarise, write_results
from benchmarks.runners import BenchError, say
from benchmarks.suite import SuiteRun, abs_path
from benchmarks.throughput import throughput_system
from benchmarks.tune import tune_system

ROOT = machine.ROOT

# kind -> the function that runs a system of that kind and returns its measurements
SYSTEMS: dict[str, Callable[[SuiteRun, dict], list[dict]]] = {
    "wdl": runners.wdl_system,
    "sklearn_lr": runners.sklearn_lr_system,
    "peer": runners.peer_system,
    "reference": runners.reference_system,
    "throughput": throughput_system,
    "mlp_floor": runners.mlp_floor_system,
    "planted": runners.planted_system,
    "tune": tune_system,
}


def run_suite(suite: dict[str, Any], out: Path, *, install_peers: bool = False) -> dict[str, Any]:
    if suite.get("runner") == "scale":  # one run watched from outside, not systems (benchmarks/scripts/scale.py)
        from benchmarks.scripts.scale import run_scale

        return run_scale(suite, out)
    if suite.get("runner") == "continual":  # day after day, three strategies (benchmarks/scripts/continual.py)
        from benchmarks.scripts.continual import run_continual

        return run_continual(suite, out)
    if suite.get("runner") == "quality":  # variants selected on validation (benchmarks/scripts/quality.py)
        from benchmarks.scripts.quality import run_quality

        return run_quality(suite, out, threads=suite.get("threads") or 1, command=f"wdl bench run {suite.get('name', '')}")
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    _data_path_override(suite)
    ensure_data(suite.get("data"))
    run = SuiteRun(suite, out, install_peers=install_peers)
    if run.threads:
        import torch

        torch.set_num_threads(run.threads)  # in-process systems; subprocesses get OMP_NUM_THREADS
    measurements: list[dict[str, Any]] = []
    load: list[dict[str, Any]] = []  # 1-minute load average around each system: was the machine shared?
    for system in suite["systems"]:
        if not system.get("enabled", True):  # e.g. systems.0.enabled=false on the command line
            run.skipped.append({"system": system["name"], "reason": "disabled (enabled: false)"})
            continue
        t0 = time.perf_counter()
        load.append({"system": system["name"], "before": _loadavg()})
        measurements += SYSTEMS[system["kind"]](run, system)
        system["seconds"] = round(time.perf_counter() - t0, 1)
        load[-1]["after"] = _loadavg()
    result = _result(run, started, load, measurements)
    _write(result, out)
    return result


def ensure_data(data: dict[str, Any] | None) -> None:
    """Create the suite's data set when it is missing (generated sets via `wdl data generate`)."""
    if not data or "path" not in data:
        return
    path = abs_path(data["path"])
    gen = data.get("generate")
    if (path / "manifest.json").exists() or not gen:
        return  # our configs prepare MovieLens themselves on first use
    cmd = [sys.executable, "-m", "wdl.cli", "data", "generate", "--profile", str(gen["profile"]),
           "--rows", str(gen["rows"]), "--out", str(path), *map(str, gen.get("args", []))]
    say(f"generating {path}: {' '.join(cmd[2:])}")
    r = subprocess.run(cmd, cwd=ROOT, env=runners._env())
    if r.returncode != 0:
        raise BenchError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode})")


def _result(run: SuiteRun, started: dt.datetime, load: list[dict], measurements: list[dict]) -> dict[str, Any]:
    suite = run.suite
    result = {
        "suite": suite["name"],
        "description": suite.get("description"),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["wdl", "bench", "run", suite["name"], *suite["overrides"]]),
        "machine": machine.describe(),
        "suite_config": {k: v for k, v in suite.items() if k not in ("path",)},
        "notes": run.notes,
        "load_average": load,
        "skipped": run.skipped,
        "hardware": _hardware(measurements),
        "measurements": measurements,
        "summary": summarise(measurements),
    }
    if any(s.get("scaling") for s in suite["systems"]):
        from benchmarks.planned import add_planned

        add_planned(result)
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    """Plots first (the result lists them, and notes their absence), then results.json and
    results.csv, then report.md."""
    from benchmarks import report

    try:  # plots are optional: a bare GPU box may have torch, pyarrow and sklearn only
        from benchmarks import plots
    except ImportError as e:
        result["notes"].append(f"no plots: {e}")
        result["plots"] = []
    else:
        result["plots"] = plots.make_plots(result, out)
    write_results(out, result)
    (out / "report.md").write_text(report.render(result))


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _data_path_override(suite: dict) -> None:
    """`data.path=X` on the command line names the suite's data set too (no generating the default one)."""
    for item in suite["trainer_overrides"]:
        if item.startswith("data.path="):
            suite["data"] = {"path": item.partition("=")[2]}


def _hardware(measurements: list[dict]) -> dict[str, Any] | None:
    """The bandwidth and peak FLOP/s the hardware floors were computed with (one per device)."""
    from benchmarks import floors

    return next(iter(floors._MACHINE.values()), None) if any(
        m.get("group") == "hardware_floor" for m in measurements) else None
