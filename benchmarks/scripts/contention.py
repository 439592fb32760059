"""Epoch time quiet and beside busy processes, for wdl's thread choice and fixed counts, in one run.

    python -m benchmarks.scripts.contention --out benchmarks/out/contention \\
        [--config configs/movielens-100k.yaml] [--rounds 3] [--epochs 4] [--busy 1] \\
        [--variants auto 1 2 2+GOMP_SPINCOUNT=10000] [key=value ...]

A variant is `auto` (wdl chooses: no train.threads, no OMP_NUM_THREADS), or N (train.threads=N),
optionally followed by `+NAME=VALUE` environment settings for the training process (e.g. an
OpenMP wait policy, which must be set before torch loads). Each run is `launch/train.py` with the
config for `--epochs` epochs; its first epoch is warm-up, the others' train_seconds count. Every
variant runs quiet and with `--busy` busy-looping processes beside it (started before the run,
stopped after it, pinned to nothing), in turns: round after round of every variant under both
conditions, the order rotated each round, so that a noisy neighbour slows all alike. The report is
each one's median epoch, busy over quiet, and the load average seen around each run.

Writes results.json (the machine, every run and epoch, the medians) and README.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT, describe

BUSY_LOOP = "while True: pass"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.contention", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, README.md and the runs")
    p.add_argument("--config", default=str(ROOT / "configs" / "movielens-100k.yaml"))
    p.add_argument("--rounds", type=int, default=3, help="turns of every variant under both conditions")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    p.add_argument("--busy", type=int, default=1, help="busy-looping processes beside a 'busy' run")
    p.add_argument("--variants", nargs="+", default=["auto", "1", "2"], metavar="auto|N[+ENV=VALUE...]")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides for every run")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.epochs < 2 or args.busy < 1:
        p.error("--rounds and --busy must be >= 1, --epochs >= 2 (the first epoch is warm-up)")
    for v in args.variants:
        variant(v, p.error)
    return args


def variant(spec: str, error=None) -> tuple[list[str], dict[str, str]]:
    """(trainer overrides, environment settings) of a variant spec such as `2+GOMP_SPINCOUNT=10000`."""
    threads, *env = spec.split("+")
    settings = dict(e.partition("=")[::2] for e in env)
    if not (threads == "auto" or threads.isdigit() and int(threads) > 0) or not all(settings):
        (error or _raise)(f"variant {spec!r}: auto or a thread count, then +NAME=VALUE settings")
    return ([] if threads == "auto" else [f"train.threads={threads}"]), settings


def _raise(message: str) -> None:
    raise ValueError(message)


def run_once(args: argparse.Namespace, spec: str, busy: bool, name: str) -> dict[str, Any]:
    """One training run of a variant, quiet or beside busy processes; its epochs and load."""
    overrides, settings = variant(spec)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # auto must choose for itself
    env.update(settings, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", args.config, *args.overrides, *overrides,
           f"train.epochs={args.epochs}", "train.progress=false", "checkpoint.at_epoch_end=false",
           f"run.out_dir={args.out / 'runs'}", f"run.name={name}", "train.refit=false"]  # the epochs timed only
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy if busy else 0)]
    try:
        time.sleep(1.0 if hogs else 0.0)  # the busy processes are running before training starts
        load_before = os.getloadavg()[0]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        load_after = os.getloadavg()[0]
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    log = args.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"error: run {name} failed (exit {r.returncode}); log {log}")
    records = [rec for line in (args.out / "runs" / name / "metrics.jsonl").read_text().splitlines() if line.strip()
               if (rec := json.loads(line)).get("kind", "epoch") == "epoch"]
    said = next((x for x in r.stdout.splitlines() if "intra-op threads" in x), "")
    timed = [rec["train_seconds"] for rec in records[1:]]
    return {"variant": spec, "busy": busy, "name": name, "epoch_seconds": timed,
            "warmup_seconds": records[0]["train_seconds"], "median_s": statistics.median(timed),
            "threads_at_epoch_end": [rec.get("intra_op_threads") for rec in records], "thread_line": said,
            "load_1min_before": round(load_before, 2), "load_1min_after": round(load_after, 2)}


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for v in variants:
        row = {}
        for cond, busy in (("quiet", False), ("busy", True)):
            epochs = [s for r in runs if r["variant"] == v and r["busy"] == busy for s in r["epoch_seconds"]]
            row[f"{cond}_median_s"] = statistics.median(epochs)
            row[f"{cond}_epochs"] = len(epochs)
        row["busy_over_quiet"] = row["busy_median_s"] / row["quiet_median_s"]
        out[v] = row
    return out


def report(result: dict[str, Any]) -> str:
    s, args = result["summary"], result["args"]
    best_quiet = min(r["quiet_median_s"] for r in s.values())
    lines = [f"# Epoch time quiet and beside {args['busy']} busy process(es)", "",
             f"- command: `{result['command']}`",
             f"- machine: {result['machine']['kind']} ({result['machine']['cpu_model']}), torch {result['machine']['torch']}",
             f"- {args['rounds']} rounds; {args['epochs']} epochs a run, the first left out; medians over the rest",
             f"- 1-min load average around the runs: quiet {result['load']['quiet']}, busy {result['load']['busy']}", "",
             "| variant | quiet s/epoch | busy s/epoch | busy / quiet | quiet / best quiet |",
             "|---|---:|---:|---:|---:|"]
    for v, r in s.items():
        lines.append(f"| {v} | {r['quiet_median_s']:.3f} | {r['busy_median_s']:.3f} | {r['busy_over_quiet']:.2f} | "
                     f"{r['quiet_median_s'] / best_quiet:.2f} |")
    if "auto" in s:
        a = s["auto"]
        lines += ["", f"Target for `auto`: busy / quiet <= 1.5 (here {a['busy_over_quiet']:.2f}), and quiet no slower "
                      f"than the best fixed count (here {a['quiet_median_s'] / best_quiet:.2f} x the best quiet)."]
    lines += ["", "Each run's epochs, threads at each epoch's end and load: results.json (`runs`); logs in logs/."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rnd in range(args.rounds):
        turns = [(v, busy) for v in args.variants for busy in (False, True)]
        shift = rnd % len(turns)
        for v, busy in turns[shift:] + turns[:shift]:
            name = f"r{rnd}-{v.replace('+', '_').replace('=', '-')}-{'busy' if busy else 'quiet'}"
            runs.append(run_once(args, v, busy, name))
            print(f"contention: {name}: median {runs[-1]['median_s']:.3f} s/epoch "
                  f"(load {runs[-1]['load_1min_before']})", flush=True)
    load = {cond: round(statistics.median(r["load_1min_before"] for r in runs if r["busy"] == busy), 2)
            for cond, busy in (("quiet", False), ("busy", True))}
    result = {"command": " ".join([sys.executable, "-m", "benchmarks.scripts.contention", *(argv or sys.argv[1:])]),
              "machine": describe(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "summary": summarise(runs, args.variants), "load": load, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "README.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
