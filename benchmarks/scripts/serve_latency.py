"""Scoring latency of an exported model (`wdl export` + wdl.serve.Scorer) on the CPU:

    python -m benchmarks.scripts.serve_latency                  # trains configs/movielens-100k.yaml for 1 epoch first
    python -m benchmarks.scripts.serve_latency --run runs/NAME  # or exports an existing run

writes benchmarks/results/<machine>/serve-latency-<date>/report.md and results.json. Requests of
1 and 256 rows, taken in turn from the run's test split as pyarrow Tables (and as lists of
dicts, the slower convenience path); per request: `Scorer.score` end to end (Arrow -> ids ->
program -> numpy) and the exported program alone on already-encoded inputs. Warm-up requests
are not timed. One process, torch's default intra-op threads; the machine may be shared, so the
load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.machine import ROOT, describe
from benchmarks.scripts.measure import PY, load_average


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "requests": len(ms)}


def _time(fn, requests: list, warmup: int) -> dict:
    for r in requests[:warmup]:
        fn(r)
    times = []
    for r in requests[warmup:]:
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    return _percentiles(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scripts.serve_latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run folder (default: train configs/movielens-100k.yaml for 1 epoch)")
    ap.add_argument("--requests", type=int, default=2000, help="timed requests per case")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--out", default=None, help="result folder (default: benchmarks/results/<machine>/serve-latency-<date>)")
    args = ap.parse_args(argv)

    from wdl.config import load_config
    from wdl.serve import Scorer, model_inputs

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    command = "python -m benchmarks.scripts.serve_latency" + (f" --run {args.run}" if args.run else "")
    run = Path(args.run) if args.run else None
    if run is None:
        # One epoch is enough: latency does not depend on what the weights are.
        subprocess.run([PY, "-m", "wdl.cli", "train", "--config", "configs/movielens-100k.yaml", "train.epochs=1",
                        f"run.out_dir={work}", "run.device=cpu", "train.progress=false", "train.refit=false"],
                       check=True, cwd=ROOT)
        run = work / "movielens-100k"
    subprocess.run([PY, "-m", "wdl.cli", "export", str(run), "--out", str(work / "exported")], check=True, cwd=ROOT)
    scorer = Scorer.load(work / "exported")
    enc = json.loads((work / "exported" / "encoding.json").read_text())
    data = Path(load_config(run / "config.yaml").data.path)
    data = data if data.is_absolute() else ROOT / data
    rows = pa.concat_tables(pq.read_table(f) for f in sorted((data / "test").glob("*.parquet")))

    results = {}
    for size in (1, 256):
        n = args.requests + args.warmup
        starts = [(i * size) % (rows.num_rows - size) for i in range(n)]
        tables = [rows.slice(s, size) for s in starts]
        encoded = [model_inputs(scorer.spec, t) for t in tables]
        dicts = [t.to_pylist() for t in tables[: min(n, 600)]]
        results[f"{size} row{'s' * (size > 1)}"] = {
            "score(Table)": _time(scorer.score, tables, args.warmup),
            "score(list of dicts)": _time(scorer.score, dicts, min(args.warmup, len(dicts) // 4)),
            "program only": _time(lambda x: scorer.program(*x), encoded, args.warmup),
        }
    load_after = load_average()

    info = describe()
    date = datetime.now(timezone.utc)
    out = (Path(args.out) if args.out
           else ROOT / "benchmarks" / "results" / info["kind"] / f"serve-latency-{date:%Y-%m-%d}")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "time": date.isoformat(timespec="seconds"), "machine": info,
               "load_average_before": load_before, "load_average_after": load_after,
               "model": {"sparse_keys": enc["sparse_keys"], "dense": [d["name"] for d in enc["dense"]]},
               "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# Scoring latency of an exported model (CPU)", "",
        f"`{command}`, {payload['time']}, {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch']}, "
        f"load average before {load_before} / after {load_after} (1 min; the machine is shared).", "",
        f"Model: MovieLens-100k Wide & Deep ({len(enc['sparse_keys'])} sparse keys, {len(enc['dense'])} dense), "
        f"exported with `wdl export`; {args.requests} timed requests per case after {args.warmup} warm-up ones "
        "(list of dicts: at most 600 requests).", "",
        "| request | path | p50 ms | p99 ms | mean ms | requests |", "|---|---|---:|---:|---:|---:|",
    ]
    for size, cases in results.items():
        for path, r in cases.items():
            lines.append(f"| {size} | {path} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['requests']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
