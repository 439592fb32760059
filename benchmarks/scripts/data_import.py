"""`wdl data import` throughput and peak memory on generated Parquet:

    python -m benchmarks.scripts.data_import --rows 10000000 --workers 2

writes benchmarks/results/<machine>/import-<date>/ (or --results DIR).

Besides wall time it records the seconds spent importing (the manifest's, without Python's start
and imports) and the CPU seconds of the command and its processes (user + system):
on a shared machine wall time swings with the other jobs' load, CPU time much less, so compare
changes by CPU seconds, or by wall time in alternating runs under the same load.

The input looks like a shop's click log: integer user ids from 0 (skewed), string item ids,
a small string category, a list of string tags (0-3 of 1,000), a log-normal price, an integer
time and a 0/1 label; 1M rows per file, 131,072 rows per row group. One run (the machine may be
shared: the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.machine import ROOT, describe
from benchmarks.scripts.measure import PY, load_average, measure

SPEC = """\
label: clicked
columns:
  user_id: {kind: categorical, min_frequency: 2}
  item_id: {kind: categorical, top_k: 100000}
  category: {kind: categorical}
  tags: {kind: multi_hot}
  price: {kind: dense}
split: {kind: time, column: ts, valid_from: 80000000, test_from: 90000000}
"""


def generate(out: Path, rows: int, rows_per_file: int = 1_000_000, seed: int = 0) -> Path:
    """Files of `rows_per_file` rows; ts runs from 0 to 10 x rows, so the spec's cuts give 80/10/10."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = pa.array([f"item-{i:06d}" for i in range(200_000)])
    categories = pa.array([f"cat{i}" for i in range(50)])
    tags = pa.array([f"tag{i}" for i in range(1000)])
    for f, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        user = np.minimum(rng.zipf(1.3, n) - 1, 2_000_000)  # many users seen once: min_frequency matters
        item = rng.integers(0, len(items), n) ** 2 // len(items)  # skewed towards small ids
        lengths = rng.integers(0, 4, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        t = pa.table({
            "user_id": pa.array(user, pa.int64()),
            "item_id": items.take(pa.array(item)),
            "category": categories.take(pa.array(rng.integers(0, 50, n))),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), tags.take(pa.array(rng.integers(0, 1000, offsets[-1])))),
            "price": pa.array(rng.lognormal(3.0, 1.2, n)),
            "ts": pa.array(np.arange(start, start + n, dtype=np.int64) * (100_000_000 // rows)),
            "clicked": pa.array((rng.random(n) < 0.2).astype(np.int8)),
        })
        pq.write_table(t, out / f"part-{f:03d}.parquet", row_group_size=131072)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.data_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="/tmp/wdl-bench-import", help="folder for the generated input and the output")
    p.add_argument("--results", default=None, help="result folder (default benchmarks/results/<machine>/import-<date>)")
    a = p.parse_args(argv)
    work = Path(a.work)
    src = work / f"raw-{a.rows}"
    if not src.exists():
        print(f"generating {a.rows:,} rows into {src} ...", flush=True)
        generate(src, a.rows)
    (work / "columns.yaml").write_text(SPEC)
    load_before = load_average()
    out = work / "imported"
    cmd = [PY, "-m", "wdl.cli", "data", "import", str(src), "--spec", str(work / "columns.yaml"), "--out", str(out),
           "--workers", str(a.workers), "--overwrite", "--no-progress"]
    print(" ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command's processes, all waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    manifest = json.loads((out / "manifest.json").read_text())
    mach = describe()
    result = {"benchmark": "import", "machine": mach, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "rows": a.rows, "workers": a.workers, "input_bytes": sum(f.stat().st_size for f in src.glob("*.parquet")),
              "seconds": m["seconds"], "rows_per_second": a.rows / m["seconds"], "cpu_seconds": cpu,
              "import_seconds": manifest["counts"]["seconds"],  # the same run less Python start and imports
              "peak_rss_largest_process_mb": m["peak_rss_largest_process_mb"],
              "peak_rss_tree_sum_mb": m["peak_rss_tree_sum_mb"], "load_average_before": load_before,
              "load_average_after": load_average(), "command": " ".join(cmd[1:]), "spec": SPEC,
              "vocab_sizes": manifest["counts"]["vocab_sizes"], "split_rows": manifest["counts"]["rows"],
              "targets": {"rows_per_second": 1_000_000, "peak_rss_mb": 2048}}
    folder = (Path(a.results) if a.results
              else ROOT / "benchmarks" / "results" / mach["kind"] / f"import-{time.strftime('%Y-%m-%d')}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    (folder / "report.md").write_text(
        f"# `wdl data import` throughput\n\n`python -m benchmarks.scripts.data_import --rows {a.rows} --workers "
        f"{a.workers}`, {r['started']}, {mach['cpu_model']}, {mach['cpu_cores']} cores, load average before "
        f"{load_before} / after {r['load_average_after']} (1 min; the machine is shared).\n\n"
        f"Input: {a.rows:,} rows of generated Parquet ({r['input_bytes'] / 2**20:,.0f} MiB, 1M rows per file, "
        "131,072 rows per row group); spec:\n\n```yaml\n" + SPEC + "```\n\n"
        "| rows/s (both passes, end to end) | seconds | of which importing | CPU seconds | peak RSS, largest process "
        "| peak RSS, all processes |\n|---:|---:|---:|---:|---:|---:|\n"
        f"| {r['rows_per_second']:,.0f} | {r['seconds']:.1f} | {r['import_seconds']:.1f} | {cpu:.1f} | "
        f"{r['peak_rss_largest_process_mb']:,.0f} MB | "
        f"{r['peak_rss_tree_sum_mb']:,.0f} MB |\n\n"
        f"Targets: >= 1,000,000 rows/s ({'met' if r['rows_per_second'] >= 1e6 else 'missed'}), <= 2 GB RSS "
        f"({'met' if r['peak_rss_tree_sum_mb'] <= 2048 else 'missed'}, all processes). Vocabulary sizes: "
        + ", ".join(f"{k} {v:,}" for k, v in r["vocab_sizes"].items()) + "; rows per split: "
        + ", ".join(f"{k} {v:,}" for k, v in r["split_rows"].items()) + ".\n")
    print(f"{r['rows_per_second']:,.0f} rows/s, {r['seconds']:.1f} s ({cpu:.1f} CPU s), peak RSS {r['peak_rss_largest_process_mb']:,.0f} MB "
          f"(largest process), {r['peak_rss_tree_sum_mb']:,.0f} MB (all); wrote {folder}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
