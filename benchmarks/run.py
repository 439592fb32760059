"""Run a suite: each system in turn, then results.json, results.csv, report.md and plots."""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, runners
from benchmarks.results import summarise, write_results
from benchmarks.runners import BenchError
from wdl.config import load_config

ROOT = machine.ROOT


def _say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def ensure_data(data: dict[str, Any] | None) -> None:
    """Create the suite's data set when it is missing (generated sets via `wdl data generate`)."""
    if not data or "path" not in data:
        return
    path = _abs(data["path"])
    if (path / "manifest.json").exists():
        return
    gen = data.get("generate")
    if not gen:
        return  # our configs prepare MovieLens themselves on first use
    probe = subprocess.run([sys.executable, "-m", "wdl.cli", "data", "generate", "--help"], cwd=ROOT,
                           capture_output=True, text=True, env=runners._env())
    if probe.returncode != 0:
        raise BenchError(f"this suite needs {path}, made by `wdl data generate --profile {gen['profile']}`, "
                         "but this tree has no `wdl data generate` yet (the synthetic generator); "
                         "generate the data set there by other means or wait for the generator to land")
    cmd = [sys.executable, "-m", "wdl.cli", "data", "generate", "--profile", str(gen["profile"]),
           "--rows", str(gen["rows"]), "--out", str(path), *map(str, gen.get("args", []))]
    _say(f"generating {path}: {' '.join(cmd[2:])}")
    r = subprocess.run(cmd, cwd=ROOT, env=runners._env())
    if r.returncode != 0:
        raise BenchError(f"`{' '.join(cmd[2:])}` failed (exit {r.returncode})")


def _config(suite: dict, system: dict, extra: list[str] = ()):
    """(config path, overrides) for one system; relative paths are from the source tree's root."""
    overrides = [*system.get("overrides", []), *extra, *suite["trainer_overrides"]]
    if suite.get("data", {}).get("path"):
        overrides.insert(0, f"data.path={_abs(suite['data']['path'])}")
    return str(_abs(system.get("config") or suite["config"])), overrides


def _abs(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _mark(records: list[dict], suite: dict, system: dict, label: str, rep: int, **extra) -> list[dict]:
    warm = int(system.get("warmup_epochs", suite["warmup_epochs"]))
    out = []
    for r in records:
        epoch = r.get("epoch")
        out.append({"system": label, "group": system["name"], "kind": system["kind"], "rep": rep,
                    "warmup": bool(epoch is not None and epoch <= warm), **extra, **r})
    return out


def run_suite(suite: dict[str, Any], out: Path, *, install_peers: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    ensure_data(suite.get("data"))
    measurements: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    notes: list[str] = []
    reps = int(suite["repetitions"])
    # `threads`: one intra-op thread count for every system (OMP_NUM_THREADS, torch.set_num_threads),
    # so that no system wins by using more cores; unset = each library's default.
    threads = int(suite["threads"]) if suite.get("threads") else None
    if threads:
        import torch

        torch.set_num_threads(threads)
    peer_features: Path | None = None
    load: list[dict[str, Any]] = []  # 1-minute load average around each system: was the machine shared?
    for system in suite["systems"]:
        kind, name = system["kind"], system["name"]
        epochs = int(system.get("epochs", suite["epochs"]))
        t0 = time.perf_counter()
        load.append({"system": name, "before": _loadavg()})
        if kind == "wdl":
            cfg_path, overrides = _config(suite, system, [f"train.epochs={epochs}"])
            world_sizes = system.get("world_sizes", [1])
            base_batch = int(system.get("batch_size") or load_config(cfg_path, overrides).data.batch_size)
            for ws in world_sizes:
                label = name if len(world_sizes) == 1 else f"{name}@ws{ws}"
                per_rank = base_batch // ws if system.get("scaling") == "strong" else base_batch
                for rep in range(reps):
                    _say(f"{label} rep {rep + 1}/{reps}: {epochs} epochs, world size {ws}, batch {per_rank}/rank")
                    recs = runners.run_wdl(config=cfg_path, overrides=[*overrides, f"data.batch_size={per_rank}"],
                                           out=out / "runs", name=f"{label.replace('@', '-')}-r{rep}", world_size=ws,
                                           log=out / "logs" / f"{label}-r{rep}.log", threads=threads)
                    measurements += _mark(recs, suite, system, label, rep, world_size=ws, batch_size=per_rank,
                                          global_batch_size=per_rank * ws, scaling=system.get("scaling"))
        elif kind == "sklearn_lr":
            cfg_path, overrides = _config(suite, system)
            for rep in range(reps):
                _say(f"{name} rep {rep + 1}/{reps}")
                recs = runners.run_sklearn_lr(load_config(cfg_path, overrides))
                measurements += _mark(recs, {**suite, "warmup_epochs": 0}, system, name, rep)
        elif kind == "peer":
            from benchmarks.peers import install

            ok, why = install.install(system["peer"]) if install_peers else install.check(system["peer"])
            if not ok:
                _say(f"skipping {name}: {why}")
                skipped.append({"system": name, "reason": why})
                continue
            if peer_features is None:
                cfg_path, overrides = _config(suite, system)
                from benchmarks.peers.export import export

                peer_features = export(load_config(cfg_path, overrides), out / "peer-features")
            for rep in range(reps):
                _say(f"{name} rep {rep + 1}/{reps}: {epochs} epochs ({why})")
                recs = runners.run_peer(system["peer"], system["script"], peer_features, epochs,
                                        log=out / "logs" / f"{name}-r{rep}.log", threads=threads)
                measurements += _mark(recs, suite, system, name, rep, versions=why)
        elif kind == "reference":
            recs = [{**r, "measured": False} for r in system["records"]]
            measurements += _mark(recs, {**suite, "warmup_epochs": 0}, system, name, 0)
            notes.append(f"{name}: {system.get('note', 'published numbers, not measured here')}")
        elif kind == "throughput":
            measurements += _run_throughput(suite, system, out, reps)
        elif kind == "planted":
            measurements += _run_planted(suite, system, out, reps, epochs, threads)
        system["seconds"] = round(time.perf_counter() - t0, 1)
        load[-1]["after"] = _loadavg()
    result = {
        "suite": suite["name"],
        "description": suite.get("description"),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["wdl", "bench", "run", suite["name"], *suite["overrides"]]),
        "machine": machine.describe(),
        "suite_config": {k: v for k, v in suite.items() if k not in ("path",)},
        "notes": notes,
        "load_average": load,
        "skipped": skipped,
        "measurements": measurements,
        "summary": summarise(measurements),
    }
    write_results(out, result)
    from benchmarks import report

    try:  # plots are optional: a bare GPU box may have torch, pyarrow and sklearn only
        from benchmarks import plots
    except ImportError as e:
        notes.append(f"no plots: {e}")
        result["plots"] = []
    else:
        result["plots"] = plots.make_plots(result, out)
    (out / "report.md").write_text(report.render(result))
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _loadavg() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _run_throughput(suite: dict, system: dict, out: Path, reps: int) -> list[dict]:
    from benchmarks import throughput

    cfg_path, overrides = _config(suite, system)
    recs = []
    for bs in system.get("batch_sizes", [None]):
        for dim in system.get("embedding_dims", [None]):
            cfg = load_config(cfg_path, overrides + ([f"data.batch_size={bs}"] if bs else []))
            if dim:
                cfg.model.deep.embeddings = {k: int(dim) for k in cfg.model.deep.embeddings}
            label = f"bs{cfg.data.batch_size}" + (f"-d{dim}" if dim else "")
            for rep in range(reps):
                _say(f"throughput {label} rep {rep + 1}/{reps}")
                # Time enough steps to cross several shuffle blocks: a streaming reader converts
                # a block at a time, so a short window would see only cheap slicing.
                steps = max(int(system.get("steps", 50)), -(-int(system.get("timed_rows", 0)) // cfg.data.batch_size))
                for r in throughput.measure(cfg, out / "runs" / f"throughput-{label}-r{rep}",
                                            warmup_steps=int(system.get("warmup_steps", 5)), steps=steps):
                    recs.append({"system": f"{r['variant']}@{label}", "group": r["variant"], "kind": "throughput",
                                 "rep": rep, "warmup": False, "batch_size": cfg.data.batch_size,
                                 "embedding_dim": dim, **r})
    if system.get("reader_rows"):
        cfg = load_config(cfg_path, overrides)
        for rep in range(reps):
            _say(f"reader vs bare pyarrow rep {rep + 1}/{reps}")
            for r in throughput.measure_reader(cfg, max_rows=int(system["reader_rows"])):
                recs.append({"system": r["variant"], "group": r["variant"], "kind": "reader", "rep": rep,
                             "warmup": False, "batch_size": cfg.data.batch_size, **r})
    return recs


def _run_planted(suite: dict, system: dict, out: Path, reps: int, epochs: int, threads: int | None) -> list[dict]:
    """wide vs deep vs wide & deep on the planted set, next to its Bayes-optimal AUC."""
    cfg_path, overrides = _config(suite, system, [f"train.epochs={epochs}"])
    cfg = load_config(cfg_path, overrides)
    manifest = json.loads((Path(cfg.data.path) / "manifest.json").read_text())
    bayes = _find_bayes_auc(manifest)
    recs = []
    for kind in system.get("model_kinds", ["wide", "deep", "wide_deep"]):
        sub = {**system, "name": kind}
        for rep in range(reps):
            _say(f"planted {kind} rep {rep + 1}/{reps}")
            r = runners.run_wdl(config=cfg_path, overrides=[*overrides, f"model.kind={kind}"], out=out / "runs",
                                name=f"planted-{kind}-r{rep}", log=out / "logs" / f"planted-{kind}-r{rep}.log",
                                threads=threads)
            recs += _mark(r, suite, sub, kind, rep, bayes_auc=bayes)
    return recs


def _find_bayes_auc(manifest: dict) -> float | None:
    """The generator records the Bayes-optimal AUC of the test split somewhere in the manifest."""
    stack = [manifest]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if "bayes" in k.lower() and isinstance(v, (int, float)):
                    return float(v)
                if "bayes" in k.lower() and isinstance(v, dict):
                    for kk in ("test", "auc", "test_auc"):
                        if isinstance(v.get(kk), (int, float)):
                            return float(v[kk])
                stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)
    return None
