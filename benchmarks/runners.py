"""How each kind of system is run: one function per kind (`KIND_system(run, system)`, each
returning a list of measurement dicts), and the single runs they repeat.

Our trainer runs as a subprocess of its real entry point (launch/train.py, under
torch.distributed.run for world size > 1) and is read back from its run folder's
metrics.jsonl and summary.json; the harness never reimplements training. The `throughput`
and `tune` kinds live in throughput.py and tune.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT
from benchmarks.suite import SuiteRun, protocol_overrides
from wdl.config import load_config
from wdl.errors import WdlError


class BenchError(WdlError):
    """A suite cannot run as asked; the message says why and what to do."""


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# ------------------------------------------------------------------------------ one function per kind
def wdl_system(run: SuiteRun, system: dict) -> list[dict]:
    """Our trainer, `repetitions` times for each of `world_sizes` (torchrun when > 1); `scaling:
    strong` splits `batch_size` over the ranks, otherwise each rank takes it whole."""
    name, epochs = system["name"], run.epochs(system)
    cfg_path, overrides = run.config(system, [f"train.epochs={epochs}", *_protocol(run, system)])
    world_sizes = system.get("world_sizes", [1])
    base_batch = int(system.get("batch_size") or load_config(cfg_path, overrides).data.batch_size)
    recs = []
    for ws in world_sizes:
        label = name if len(world_sizes) == 1 else f"{name}@ws{ws}"
        per_rank = base_batch // ws if system.get("scaling") == "strong" else base_batch
        for rep in range(run.reps):
            say(f"{label} rep {rep + 1}/{run.reps}: {epochs} epochs, world size {ws}, batch {per_rank}/rank")
            got = run_wdl(config=cfg_path, overrides=[*overrides, f"data.batch_size={per_rank}"], out=run.out / "runs",
                          name=f"{label.replace('@', '-')}-r{rep}", world_size=ws,
                          log=run.out / "logs" / f"{label}-r{rep}.log", threads=run.threads)
            recs += run.mark(got, system, label, rep, world_size=ws, batch_size=per_rank,
                             global_batch_size=per_rank * ws, scaling=system.get("scaling"))
    return recs


def planted_system(run: SuiteRun, system: dict) -> list[dict]:
    """wide vs deep vs wide & deep on the planted set, next to its Bayes-optimal AUC."""
    cfg_path, overrides = run.config(system, [f"train.epochs={run.epochs(system)}", *_protocol(run, system)])
    cfg = load_config(cfg_path, overrides)
    # The generator writes it at the top of the manifest (docs/dataset-format.md); None for other data.
    bayes = json.loads((Path(cfg.data.path) / "manifest.json").read_text()).get("bayes_optimal_auc")
    recs = []
    for kind in system.get("model_kinds", ["wide", "deep", "wide_deep"]):
        for rep in range(run.reps):
            say(f"planted {kind} rep {rep + 1}/{run.reps}")
            got = run_wdl(config=cfg_path, overrides=[*overrides, f"model.kind={kind}"], out=run.out / "runs",
                          name=f"planted-{kind}-r{rep}", log=run.out / "logs" / f"planted-{kind}-r{rep}.log",
                          threads=run.threads)
            recs += run.mark(got, {**system, "name": kind}, kind, rep, bayes_auc=bayes)
    return recs


def sklearn_lr_system(run: SuiteRun, system: dict) -> list[dict]:
    cfg_path, overrides = run.config(system)
    recs = []
    for rep in range(run.reps):
        say(f"{system['name']} rep {rep + 1}/{run.reps}")
        recs += run.mark(run_sklearn_lr(load_config(cfg_path, overrides)), system, system["name"], rep, warmup_epochs=0)
    return recs


def peer_system(run: SuiteRun, system: dict) -> list[dict]:
    """A peer library in its own venv, on our exported features; skipped (saying why) when its
    venv is missing and --install-peers was not given."""
    from benchmarks.peers import install

    name, epochs = system["name"], run.epochs(system)
    ok, why = install.install(system["peer"]) if run.install_peers else install.check(system["peer"])
    if not ok:
        run.skip(name, why)
        return []
    if run.peer_features is None:
        from benchmarks.peers.export import export

        cfg_path, overrides = run.config(system)
        run.peer_features = export(load_config(cfg_path, overrides), run.out / "peer-features")
    recs = []
    for rep in range(run.reps):
        say(f"{name} rep {rep + 1}/{run.reps}: {epochs} epochs ({why})")
        got = run_peer(system["peer"], system["script"], run.peer_features, epochs,
                       log=run.out / "logs" / f"{name}-r{rep}.log", threads=run.threads)
        recs += run.mark(got, system, name, rep, versions=why)
    return recs


def reference_system(run: SuiteRun, system: dict) -> list[dict]:
    """Published numbers, shown beside ours and marked as not measured here."""
    run.notes.append(f"{system['name']}: {system.get('note', 'published numbers, not measured here')}")
    return run.mark([{**r, "measured": False} for r in system["records"]], system, system["name"], 0, warmup_epochs=0)


def mlp_floor_system(run: SuiteRun, system: dict) -> list[dict]:
    """The bare MLP floor (benchmarks/floors.py), in this process (threads as set for the suite)."""
    import torch

    from benchmarks import floors

    device = torch.device(system.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    for o in run.suite["trainer_overrides"]:  # run.device=... for our runs applies to the floor too
        if o.startswith("run.device=") and o.partition("=")[2] != "auto":
            device = torch.device(o.partition("=")[2])
    epochs, recs = run.epochs(system), []
    for rep in range(run.reps):
        say(f"{system['name']} rep {rep + 1}/{run.reps}: {epochs} epochs of {system.get('steps', 79)} steps")
        got = floors.mlp_floor(input_dim=int(system.get("input_dim", 80)), hidden=system.get("hidden", [256, 128, 64]),
                               batch_size=int(system.get("batch_size", 1024)), steps=int(system.get("steps", 79)),
                               epochs=epochs, device=device, seed=rep)
        recs += run.mark(got, system, system["name"], rep, device=str(device))
    return recs


def _protocol(run: SuiteRun, system: dict) -> list[str]:
    """What the suite's (or the system's) `valid_fraction` asks of the trainer; nothing when unset
    (the config decides; run_wdl reads which protocol the run followed)."""
    return protocol_overrides(run.suite, system)


# ------------------------------------------------------------------------------ single runs


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_wdl(*, config: str, overrides: list[str], out: Path, name: str, world_size: int = 1,
            log: Path, threads: int | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
    """One training run; its per-epoch records (warm-up not marked yet) and peak RSS.

    Which protocol the run followed is read from what it did, not from what was asked: each
    record gets `protocol` (see run_protocol). A run with a validation split scored every epoch
    on it; the record of the epoch it selected is marked `selected` and carries the test split's
    one score of that epoch's model (`test_auc`, `test_logloss`)."""
    cmd = [sys.executable]
    if world_size > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    cmd += [str(ROOT / "launch" / "train.py"), "--config", config, *overrides,
            f"run.out_dir={out}", f"run.name={name}", "train.progress=false",
            "train.refit=false"]  # the run timed and scored here; a refit would be a second run in its folder
    run_dir = out / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise BenchError(f"{run_dir} already holds a run; give `wdl bench run` a fresh --out")
    log.parent.mkdir(parents=True, exist_ok=True)
    # Each rank gets (threads or cores) / world_size threads so ranks do not fight over the same cores.
    if world_size > 1:
        threads = max(1, (threads or os.cpu_count() or 1) // world_size)
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(threads), timeout=timeout)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BenchError(f"training run {name} failed (exit {r.returncode}); log {log}:\n{tail}")
    records = [r for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
               if (r := json.loads(line)).pop("kind", "epoch") == "epoch"]  # step and eval records left out
    # (a record's kind is not a measurement's: that one names the system's kind)
    summary = json.loads((run_dir / "summary.json").read_text())
    protocol = run_protocol(records, summary, f"training run {name} (log {log})")
    for rec in records:
        rec["peak_rss_mb"] = summary.get("peak_rss_mb")
        rec["world_size"] = summary.get("world_size", world_size)
        rec["wall_seconds"] = wall
        rec["protocol"] = protocol
    if protocol == "validation":
        test = summary["test"]
        selected = [r for r in records if r["epoch"] == test["epoch"]]
        if not selected:
            raise BenchError(f"training run {name} selected epoch {test['epoch']} on its validation split, which "
                             f"is not among its records; log {log}")
        selected[-1].update(selected=True, test_split=summary.get("test_split"), test_auc=test["auc"],
                            test_logloss=test["logloss"])
    return records


def run_protocol(records: list[dict[str, Any]], summary: dict[str, Any], what: str) -> str:
    """"validation" or "test": how a run of our trainer chose its epoch, from its own output
    (whichever config, override or suite setting caused it). With a validation split (named or
    carved from train) its records say `eval_split: valid`, its summary.json `selected_on: valid`
    and holds `test`, the test split's one score of the selected epoch's model; without, every
    epoch is scored on the test split. Output that says both is an error, never a guess."""
    valid = {r.get("eval_split") == "valid" for r in records} | {summary.get("selected_on") == "valid"}
    if valid == {False}:
        if summary.get("test") is not None:
            raise BenchError(f"{what}: summary.json has a test score of a selected epoch, but its epochs were "
                             "scored on the test split")
        return "test"
    if len(valid) > 1 or not isinstance(summary.get("test"), dict):
        raise BenchError(f"{what}: not every epoch record and summary.json say the epochs were scored on a "
                         f"validation split, or no test score of the selected epoch (test: {summary.get('test')})")
    return "validation"


def run_sklearn_lr(cfg, *, max_iter: int = 200) -> list[dict[str, Any]]:
    """Logistic regression over our wide features: one-hot ids and hashed crosses, as sparse rows."""
    import numpy as np
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    from wdl.data.dataset import feature_spec, load_table
    from wdl.ingest.prepare import open_or_prepare
    from wdl.train.evaluate import binary_metrics

    cfg.model.kind = "wide"
    manifest = open_or_prepare(cfg.data)
    spec = feature_spec(cfg, manifest)

    def matrix(split: str):
        t = load_table([f.path for f in manifest.split(split).files], spec)
        n, offset = len(t), 0
        rows, cols = [], []
        for key in spec.sparse_keys:  # each key's ids take their own column range
            j = t.sparse[key]
            rows.append(np.repeat(np.arange(n), j.lengths.numpy()))
            cols.append(j.values.numpy() + offset)
            offset += spec.num_embeddings(key)
        r, c = np.concatenate(rows), np.concatenate(cols)
        x = sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(n, offset))
        return x, t.labels.numpy()

    x_tr, y_tr = matrix(cfg.data.train_split)
    x_te, y_te = matrix(cfg.data.eval_split)
    model = LogisticRegression(C=1.0, solver="liblinear", max_iter=max_iter)
    start = time.perf_counter()
    model.fit(x_tr, y_tr)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    p = model.predict_proba(x_te)[:, 1]
    m = binary_metrics(p, y_te)
    return [{"epoch": 1, "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
             "samples_per_second": x_tr.shape[0] / train_seconds, **m}]


def run_peer(name: str, script: str, features: Path, epochs: int, log: Path, threads: int | None = None,
             timeout: float | None = None) -> list[dict[str, Any]]:
    from benchmarks.peers.install import python_of

    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(python_of(name)), str(ROOT / "benchmarks" / "peers" / script), str(features), str(epochs)]
    records = []
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=_env(threads))
        for line in proc.stdout:
            f.write(line)
            f.flush()  # the log shows progress while the peer runs
            if line.startswith("BENCH "):
                records.append(json.loads(line[6:]))
        rc = proc.wait(timeout=timeout)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BenchError(f"peer {name} failed (exit {rc}); log {log}:\n{tail}")
    return records
