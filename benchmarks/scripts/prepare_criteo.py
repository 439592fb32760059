"""`wdl data prepare criteo` throughput and peak memory, for 1 and 2 workers, on generated
Criteo-format TSV (`wdl data generate --format criteo-tsv`):

    python -m benchmarks.scripts.prepare_criteo [--rows 10000000] [--workers 1,2] [--out DIR]

writes DIR/results.json (default benchmarks/out/prepare-criteo-<date>): rows/s, input MB/s and
peak RSS (largest process, and the sum over all processes) per worker count, against the
2 GB peak-memory target. The generated input and the prepared sets go to --work. One run per
worker count; the machine may be shared, so the load average before and after is recorded.
(The reader and the planted runs that used to live here are suites: the `reader_rows` of
`throughput`, and `planted`.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.machine import ROOT, describe
from benchmarks.scripts.measure import PY, load_average, measure

PEAK_RSS_TARGET_MB = 2048


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
    result["peak_rss_target_mb"] = PEAK_RSS_TARGET_MB
    result["peak_rss_ok"] = all(r["peak_rss_tree_sum_mb"] <= PEAK_RSS_TARGET_MB for r in result["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.prepare_criteo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--work", default="/tmp/wdl-bench-data", help="folder for generated and prepared data")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/out/prepare-criteo-<date>)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    started, before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average()
    prepare = bench_prepare(work, a.rows, [int(w) for w in a.workers.split(",")])
    result = {"benchmark": "prepare-criteo", "machine": describe(), "started": started,
              "command": " ".join(["python -m benchmarks.scripts.prepare_criteo", *argv]),
              "load_average_before": before, "load_average_after": load_average(), **prepare}
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "out" / f"prepare-criteo-{time.strftime('%Y-%m-%d')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
