"""How each kind of system is run; every runner returns a list of measurement dicts.

Our trainer runs as a subprocess of its real entry point (launch/train.py, under
torch.distributed.run for world size > 1) and is read back from its run folder's
metrics.jsonl and summary.json; the harness never reimplements training.
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
from wdl.errors import WdlError


class BenchError(WdlError):
    """A suite cannot run as asked; the message says why and what to do."""


def _env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_wdl(*, config: str, overrides: list[str], out: Path, name: str, world_size: int = 1,
            log: Path, threads: int | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
    """One training run; its per-epoch records (warm-up not marked yet) and peak RSS."""
    cmd = [sys.executable]
    if world_size > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    cmd += [str(ROOT / "launch" / "train.py"), "--config", config, *overrides,
            f"run.out_dir={out}", f"run.name={name}", "train.progress=false"]
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    for rec in records:
        rec["peak_rss_mb"] = summary.get("peak_rss_mb")
        rec["world_size"] = summary.get("world_size", world_size)
        rec["wall_seconds"] = wall
    return records


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
