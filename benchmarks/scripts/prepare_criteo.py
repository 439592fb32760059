"""Data benchmarks for issue 4, standalone and writing JSON:

    python benchmarks/bench_data.py prepare --rows 10000000      # Criteo-format prepare: rows/s, 1 and 2 workers, peak RSS
    python benchmarks/bench_data.py reader                        # StreamingLoader vs bare pyarrow read + decode
    python benchmarks/bench_data.py planted --rows 1000000        # wide / deep / wide_deep AUC vs Bayes-optimal
    python benchmarks/bench_data.py all                           # the three, sharing one work folder

Everything is measured side by side in one run (the machine may be shared: numbers are noisy).
Results go to benchmarks/out/bench_data-<part>.json (or --json) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def machine() -> dict:
    import numpy
    import pyarrow

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__, "torch": torch_version,
            "load_average": os.getloadavg()}


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; wall time, peak RSS of its largest process (getrusage of children, from a fresh
    wrapper process so that nothing else run by this benchmark counts) and peak summed RSS of
    its process tree (sampled every 0.1 s)."""
    wrapper = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    start = time.perf_counter()
    proc = subprocess.Popen([PY, "-c", wrapper, *cmd], stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    out = proc.stdout.read().strip().splitlines()
    res = json.loads(out[-1])
    if res["rc"] != 0:
        raise SystemExit(f"command failed ({res['rc']}): {' '.join(cmd)}")
    return {"seconds": seconds, "peak_rss_largest_process_mb": res["maxrss_kb"] / 1024,
            "peak_rss_tree_sum_mb": peak / 2**20, "output": out[:-1]}


# ---------------------------------------------------------------------------------- prepare
def bench_prepare(work: Path, rows: int, workers: list[int]) -> dict:
    src = work / f"criteo-tsv-{rows}"
    if not (src / "planted.json").exists():
        print(f"generating {rows:,} Criteo-format rows into {src} ...", flush=True)
        gen = measure([PY, "-m", "wdl.cli", "data", "generate", "--profile", "criteo", "--rows", str(rows), "--out",
                       str(src), "--format", "criteo-tsv", "--workers", "2", "--no-progress"])
        print(f"  {gen['seconds']:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in src.glob("day_*"))
    result = {"rows": rows, "input_bytes": size, "runs": []}
    for w in workers:
        out = work / f"prepared-{rows}-w{w}"
        cmd = [PY, "-m", "wdl.cli", "data", "prepare", "criteo", "--input", str(src / "day_0"), str(src / "day_1"),
               "--out", str(out), "--workers", str(w), "--no-progress", "--overwrite"]
        print(f"prepare with {w} worker(s) ...", flush=True)
        m = measure(cmd)
        run = {"workers": w, "seconds": m["seconds"], "rows_per_second": rows / m["seconds"],
               "input_mb_per_second": size / 2**20 / m["seconds"],
               "peak_rss_largest_process_mb": m["peak_rss_largest_process_mb"],
               "peak_rss_tree_sum_mb": m["peak_rss_tree_sum_mb"], "command": " ".join(cmd[1:])}
        print(f"  {run['rows_per_second']:,.0f} rows/s, peak RSS {run['peak_rss_largest_process_mb']:.0f} MB "
              f"(largest process), {run['peak_rss_tree_sum_mb']:.0f} MB (all processes)", flush=True)
        result["runs"].append(run)
    result["prepared"] = str(work / f"prepared-{rows}-w{workers[-1]}")
    result["peak_rss_target_mb"] = 2048
    result["peak_rss_ok"] = all(r["peak_rss_tree_sum_mb"] <= 2048 for r in result["runs"])
    return result


# ---------------------------------------------------------------------------------- reader
def bench_reader(data: Path, files: int, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from wdl.config import load_config
    from wdl.data.features import FeatureSpec
    from wdl.data.manifest import load_manifest
    from wdl.data.parquet import StreamingLoader
    from wdl.data.tsv import CATEGORICAL, DENSE

    torch.set_num_threads(1)
    manifest = load_manifest(data)
    paths = [f.path for f in manifest.split("train").files][:files]
    cfg = load_config(ROOT / "configs/criteo.yaml")
    spec = FeatureSpec(cfg.features, manifest.columns, CATEGORICAL, DENSE, root=manifest.root)  # no crosses
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

    def bare() -> int:
        """pyarrow row groups -> the same tensors (labels, [N, 13] dense, 26 id columns), cut into batches."""
        n = 0
        for p in paths:
            pf = pq.ParquetFile(p)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=spec.columns)
                labels = torch.from_numpy(t.column("label").to_numpy().astype(np.float32))
                dense = torch.from_numpy(np.stack([t.column(c).to_numpy() for c in DENSE], axis=1))
                ids = {c: torch.from_numpy(t.column(c).to_numpy()) for c in CATEGORICAL}
                for s in range(0, len(labels), batch_size):
                    _ = (labels[s:s + batch_size], dense[s:s + batch_size], {c: v[s:s + batch_size] for c, v in ids.items()})
                n += len(labels)
        return n

    def loader(shuffle: bool) -> int:
        ld = StreamingLoader(paths, spec, batch_size, shuffle=shuffle, shuffle_buffer=262144, seed=0)
        return sum(len(b) for b in ld)

    runs = {"pyarrow": [], "loader_no_shuffle": [], "loader_shuffle": []}
    bare()  # warm the page cache
    for _ in range(repeats):  # interleaved, so drifting machine load hits all three alike
        for name, fn in (("pyarrow", bare), ("loader_no_shuffle", lambda: loader(False)),
                         ("loader_shuffle", lambda: loader(True))):
            t0 = time.perf_counter()
            n = fn()
            runs[name].append(n / (time.perf_counter() - t0))
            print(f"  {name}: {runs[name][-1]:,.0f} rows/s", flush=True)
    best = {k: max(v) for k, v in runs.items()}
    return {"data": str(data), "files": [str(p) for p in paths], "rows": rows, "batch_size": batch_size,
            "rows_per_second": runs, "best_rows_per_second": best,
            "ratio_loader_no_shuffle": best["loader_no_shuffle"] / best["pyarrow"],
            "ratio_loader_shuffle": best["loader_shuffle"] / best["pyarrow"], "target_ratio": 0.9}


# ---------------------------------------------------------------------------------- planted
def bench_planted(work: Path, rows: int, epochs: int, kinds: list[str]) -> dict:
    data = work / f"planted-criteo-{rows}"
    if not (data / "manifest.json").exists():
        subprocess.run([PY, "-m", "wdl.cli", "data", "generate", "--profile", "criteo", "--rows", str(rows),
                        "--out", str(data), "--workers", "2", "--no-progress"], check=True)
    bayes = json.loads((data / "manifest.json").read_text())["bayes_optimal_auc"]
    result = {"rows": rows, "data": str(data), "bayes_optimal_auc": bayes, "epochs": epochs, "models": {}}
    for kind in kinds:
        runs = work / "runs"
        cmd = [PY, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/synthetic-criteo.yaml"),
               f"data.path={data}", f"model.kind={kind}", f"train.epochs={epochs}", "train.progress=false",
               f"run.out_dir={runs}", f"run.name=planted-{kind}", "run.device=cpu"]
        print(f"training {kind} ...", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
        run_dir = Path(r.stdout.strip().splitlines()[-1].rsplit("results in ", 1)[1])
        s = json.loads((run_dir / "summary.json").read_text())
        result["models"][kind] = {"best_auc": s["best_auc"], "best_epoch": s["best_epoch"],
                                  "final_auc": s["final"]["auc"], "final_logloss": s["final"]["logloss"],
                                  "seconds": time.perf_counter() - t0, "run_dir": str(run_dir),
                                  "command": " ".join(cmd[1:])}
        print(f"  {kind}: AUC {s['best_auc']:.4f} (Bayes-optimal {bayes:.4f})", flush=True)
    m = result["models"]
    if "wide" in m and "wide_deep" in m:
        gap = bayes - m["wide"]["best_auc"]
        result["gap_closed_by_wide_deep_vs_wide"] = (m["wide_deep"]["best_auc"] - m["wide"]["best_auc"]) / gap if gap > 0 else None
    return result


# ---------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("prepare", "reader", "planted", "all"))
    p.add_argument("--work", default="/tmp/wdl-bench-data", help="folder for generated and prepared data")
    p.add_argument("--rows", type=int, default=None, help="prepare: 10M by default; planted: 1M by default")
    p.add_argument("--workers", default="1,2", help="prepare: worker counts to compare")
    p.add_argument("--data", default=None, help="reader: a prepared Criteo data set (default: from prepare)")
    p.add_argument("--reader-files", type=int, default=3, help="reader: first N train shards (1M rows each)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="planted: epochs per model")
    p.add_argument("--kinds", default="wide,deep,wide_deep")
    p.add_argument("--json", default=None, help="output file (default benchmarks/out/bench_data-<part>.json)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    result: dict = {"benchmark": f"bench_data {a.part}", "machine": machine(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
    if a.part in ("prepare", "all"):
        result["prepare"] = bench_prepare(work, a.rows if a.rows and a.part == "prepare" else a.rows or 10_000_000,
                                          [int(w) for w in a.workers.split(",")])
    if a.part in ("reader", "all"):
        data = Path(a.data) if a.data else Path(result.get("prepare", {}).get("prepared", ""))
        if not (data / "manifest.json").exists():
            raise SystemExit("reader: give --data (a prepared Criteo data set) or run `all`")
        result["reader"] = bench_reader(data, a.reader_files, a.batch_size, a.repeats)
    if a.part in ("planted", "all"):
        rows = a.rows if a.part == "planted" and a.rows else 1_000_000
        result["planted"] = bench_planted(work, rows, a.epochs, a.kinds.split(","))
    out = Path(a.json) if a.json else ROOT / "benchmarks/out" / f"bench_data-{a.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
