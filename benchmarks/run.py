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
    _data_path_override(suite)
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
        if not system.get("enabled", True):  # e.g. systems.0.enabled=false on the command line
            skipped.append({"system": name, "reason": "disabled (enabled: false)"})
            continue
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
            measurements += _run_throughput(suite, system, out, reps, skipped)
        elif kind == "mlp_floor":
            measurements += _run_mlp_floor(suite, system, reps, epochs)
        elif kind == "planted":
            measurements += _run_planted(suite, system, out, reps, epochs, threads)
        elif kind == "tune":
            from benchmarks import tune

            cfg_path, overrides = _config(suite, system)
            measurements += tune.run_tune(suite, system, out, epochs, threads, cfg_path, overrides, skipped)
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
        "hardware": _hardware(measurements),
        "measurements": measurements,
        "summary": summarise(measurements),
    }
    if any(s.get("scaling") for s in suite["systems"]):
        from benchmarks.planned import add_planned

        add_planned(result)
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


# The five large columns of configs/synthetic-criteo.yaml (hash_buckets 131072 there).
LARGE_COLUMNS = ["C3", "C4", "C12", "C16", "C21"]


def _axes(system: dict) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(label, config overrides, record fields) for each point of a throughput system's axes:
    backends x table_rows x batch_sizes x embedding_dims, an axis left out being one point."""
    points = []
    large = system.get("large_columns", LARGE_COLUMNS)
    for backend in system.get("backends", [None]):
        for rows in system.get("table_rows", [None]):
            for bs in system.get("batch_sizes", [None]):
                for dim in system.get("embedding_dims", [None]):
                    over, parts = [], []
                    if backend:
                        over.append(f"model.embedding_backend={backend}")
                        parts.append(str(backend))
                    if rows:
                        over += [f"features.columns.{c}.hash_buckets={int(rows)}" for c in large]
                        parts.append(f"r{int(rows)}")
                    if bs:
                        over.append(f"data.batch_size={int(bs)}")
                    points.append((parts, over, {"table_rows": int(rows) if rows else None, "embedding_dim": dim,
                                                 "batch_size": bs}))
    return points


def estimate_table_bytes(cfg, backend: str) -> int:
    """Bytes the embedding tables and their optimiser state take (as the placement check counts)."""
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.train.sparse_optim import state_bytes_per_row

    spec = feature_spec(cfg, open_dataset(cfg.data))
    m, total = cfg.model, 0
    if m.kind in ("wide_deep", "wide"):
        total += sum(spec.num_embeddings(f) for f in m.wide.features) * (4 + state_bytes_per_row(cfg.optim.wide, 1) + 4)
    if m.kind in ("wide_deep", "deep"):
        scratch = 4 if backend == "torch" else 0  # wdl's dedupe scratch
        total += sum(spec.num_embeddings(f) * (4 * d + state_bytes_per_row(cfg.optim.deep, d) + scratch)
                     for f, d in m.deep.embeddings.items())
    return total


def _run_throughput(suite: dict, system: dict, out: Path, reps: int, skipped: list[dict] | None = None) -> list[dict]:
    import gc

    from benchmarks import throughput
    from wdl.distributed.env import pick_device
    from wdl.distributed.rows import available_bytes
    from wdl.errors import WdlError
    from wdl.model.embeddings import resolve_backend

    skipped = skipped if skipped is not None else []
    cfg_path, overrides = _config(suite, system)
    recs = []
    # Tables beyond this share of the available memory are skipped (and said so) rather than
    # risked: on a machine shared with other jobs, filling it would take them down too.
    fraction = float(system.get("memory_fraction", 0.5))
    for parts, axis, fields in _axes(system):
        cfg = load_config(cfg_path, overrides + axis)
        dim = fields["embedding_dim"]
        if dim:
            cfg.model.deep.embeddings = {k: int(dim) for k in cfg.model.deep.embeddings}
        label = "-".join(parts + [f"bs{cfg.data.batch_size}"] + ([f"d{dim}"] if dim else []))
        try:
            backend = resolve_backend(cfg.model.embedding_backend)
            need = estimate_table_bytes(cfg, backend)
            device = pick_device(cfg.run.device, 0)
            have = available_bytes(device)
        except WdlError as e:
            _say(f"skipping throughput {label}: {e}")
            skipped.append({"system": f"{system['name']}@{label}", "reason": str(e)})
            continue
        if need > fraction * have:
            why = (f"the tables and optimiser state need {need / 2**30:.1f} GiB, more than memory_fraction="
                   f"{fraction} of the {have / 2**30:.1f} GiB available on {device} (a bigger machine runs it; "
                   f"or systems.N.memory_fraction=0.9)")
            _say(f"skipping throughput {label}: {why}")
            skipped.append({"system": f"{system['name']}@{label}", "reason": why})
            continue
        for rep in range(reps):
            _say(f"throughput {label} rep {rep + 1}/{reps} (tables {need / 2**30:.2f} GiB)")
            # Time enough steps to cross several shuffle blocks: a streaming reader converts
            # a block at a time, so a short window would see only cheap slicing.
            steps = max(int(system.get("steps", 50)), -(-int(system.get("timed_rows", 0)) // cfg.data.batch_size))
            try:
                got = throughput.measure(cfg, out / "runs" / f"throughput-{system['name']}-{label}-r{rep}",
                                         warmup_steps=int(system.get("warmup_steps", 5)), steps=steps,
                                         profile_steps=int(system.get("profile_steps", 5)))
            except WdlError as e:  # e.g. the placement's own memory check: one line, recorded
                _say(f"skipping throughput {label}: {e}")
                skipped.append({"system": f"{system['name']}@{label}", "reason": str(e)})
                break
            finally:
                gc.collect()  # the previous Trainer's tables go before the next one's are made
            for r in got:
                recs.append({"system": f"{r['variant']}@{label}", "group": r["variant"], "kind": "throughput",
                             "rep": rep, "warmup": False, "axis": system["name"], "table_bytes": need,
                             **fields, **r, "batch_size": cfg.data.batch_size})
    if system.get("reader_rows"):
        cfg = load_config(cfg_path, overrides)
        for rep in range(reps):
            _say(f"reader vs bare pyarrow rep {rep + 1}/{reps}")
            for r in throughput.measure_reader(cfg, max_rows=int(system["reader_rows"])):
                recs.append({"system": r["variant"], "group": r["variant"], "kind": "reader", "rep": rep,
                             "warmup": False, "batch_size": cfg.data.batch_size, **r})
    return recs


def _run_mlp_floor(suite: dict, system: dict, reps: int, epochs: int) -> list[dict]:
    """The bare MLP floor (benchmarks/floors.py), in this process (threads as set for the suite)."""
    import torch

    from benchmarks import floors

    device = torch.device(system.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    for o in suite["trainer_overrides"]:  # run.device=... for our runs applies to the floor too
        if o.startswith("run.device=") and o.partition("=")[2] != "auto":
            device = torch.device(o.partition("=")[2])
    recs = []
    for rep in range(reps):
        _say(f"{system['name']} rep {rep + 1}/{reps}: {epochs} epochs of {system.get('steps', 79)} steps")
        r = floors.mlp_floor(input_dim=int(system.get("input_dim", 80)), hidden=system.get("hidden", [256, 128, 64]),
                             batch_size=int(system.get("batch_size", 1024)), steps=int(system.get("steps", 79)),
                             epochs=epochs, device=device, seed=rep)
        recs += _mark(r, suite, system, system["name"], rep, device=str(device))
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
