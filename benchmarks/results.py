"""Results of one suite run: results.json (machine, suite, every measurement), results.csv,
report.md; summaries across repetitions and `compare`.

A measurement is a flat dict: which system/variant, which repetition and epoch, whether it is
warm-up, and the numbers. Summaries use non-warm-up records only; the noise of a summary is the
spread across repetitions (or, with one repetition, across the timed epochs of that one).

Two protocols for quality, read from what each run did (runners.run_protocol: the records'
`protocol`, or in older results their `eval_split`), never from the suite's settings. Without a
validation split, every epoch is scored on the test split: `auc` / `logloss` are those of the
last epoch and `best_auc` the best over epochs (chosen on test, so optimistic). With one, the
epochs are scored on validation and the test split once, with the selected epoch's model: the
summary has `protocol: validation`, `test_auc` / `test_logloss` (that one score), `valid_auc` and
`selected_epoch` (per repetition), and no `auc`, `logloss` or `best_auc`, so that `compare`
never sets a validation AUC against a test one. A validation split held out of train also
shortens every epoch: `train_rows` says how many rows one trained on, and `compare` does not set
seconds per epoch over different rows against each other.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from wdl.train.metrics import finite_json

# metric -> (higher is better, absolute noise floor, relative noise floor)
METRICS = {
    "train_seconds": (False, 0.0, 0.02),
    "samples_per_second": (True, 0.0, 0.02),
    "step_p50_ms": (False, 0.0, 0.02),
    "step_p90_ms": (False, 0.0, 0.02),
    "auc": (True, 0.002, 0.0),
    "logloss": (False, 0.002, 0.0),
    "test_auc": (True, 0.002, 0.0),  # the validation protocol: the selected epoch's model on test
    "test_logloss": (False, 0.002, 0.0),
    "peak_rss_mb": (False, 0.0, 0.05),
    "rows_per_second": (True, 0.0, 0.02),
    "first_batch_seconds": (False, 0.0, 0.05),  # a reader's start (its loader processes')
    "steady_rows_per_second": (True, 0.0, 0.02),  # a reader's rate after its first batch
    # CUDA only: per training step (counts, so no noise floor beyond one event)
    "kernels_per_step": (False, 1.0, 0.0),
    "memcpy_per_step": (False, 1.0, 0.0),
    "syncs_per_step": (False, 0.5, 0.0),
}
TIMING = {"train_seconds", "samples_per_second", "step_p50_ms", "step_p90_ms", "rows_per_second", "first_batch_seconds",
          "steady_rows_per_second"}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.stdev(xs) if len(xs) > 1 else None


def _robust_spread(xs: list[float]) -> float:
    """A standard deviation estimate that one stalled epoch (another job on a shared machine)
    cannot blow up: 1.4826 x the median absolute deviation, as for a normal distribution."""
    med = statistics.median(xs)
    return 1.4826 * statistics.median([abs(x - med) for x in xs])


def summarise(measurements: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """system -> {metric: {mean, std, n, values}}; AUC/logloss from each repetition's last epoch."""
    by_system: dict[str, list[dict]] = {}
    for m in measurements:
        by_system.setdefault(m["system"], []).append(m)
    out: dict[str, dict[str, Any]] = {}
    for system, ms in by_system.items():
        reps = sorted({m.get("rep", 0) for m in ms})
        summary: dict[str, Any] = {k: ms[0][k] for k in ("group", "kind", "world_size", "batch_size", "embedding_dim",
                                                           "backend", "table_rows", "axis", "table_bytes", "train_rows",
                                                           "steps")
                                   if ms[0].get(k) is not None}
        validated = any(protocol(m) == "validation" for m in ms)
        for metric in METRICS:
            if validated and metric in ("auc", "logloss"):  # validation scores: see test_auc, valid_auc
                continue
            per_rep, within = [], []
            for r in reps:
                rows = [m for m in ms if m.get("rep", 0) == r and m.get(metric) is not None]
                if not rows:
                    continue
                if metric in TIMING or metric == "peak_rss_mb":
                    timed = [m for m in rows if not m.get("warmup")] or rows
                    vals = [m[metric] for m in timed]
                    per_rep.append(statistics.median(vals) if metric in TIMING else max(vals))
                    if len(vals) > 1 and metric in TIMING:
                        within.append(_robust_spread(vals))
                else:  # quality: the last epoch of the repetition
                    last = max(rows, key=lambda m: m.get("epoch") or 0)
                    per_rep.append(last[metric])
            if not per_rep:
                continue
            std = _std(per_rep)
            noise_from = "repetitions"
            if std is None and within:
                std, noise_from = _mean(within), "epochs"
            summary[metric] = {"mean": _mean(per_rep), "std": std, "n": len(per_rep), "noise_from": noise_from,
                               "values": per_rep}
        if validated:
            selected = sorted((m for m in ms if m.get("selected")), key=lambda m: m.get("rep", 0))
            summary["protocol"] = "validation"
            summary["selected_epoch"] = [m["epoch"] for m in selected]
            aucs = [m["auc"] for m in selected]
            summary["valid_auc"] = {"mean": _mean(aucs), "std": _std(aucs), "n": len(aucs),
                                    "noise_from": "repetitions", "values": aucs}
        else:
            aucs = [m["auc"] for m in ms if m.get("auc") is not None]
            if aucs:
                summary["best_auc"] = max(aucs)
        out[system] = summary
    return out


def protocol(measurement: dict[str, Any]) -> str:
    """"validation" when the record's epoch was scored on a validation split, else "test"; results
    written before records carried `protocol` say it through `eval_split`."""
    return measurement.get("protocol") or ("validation" if measurement.get("eval_split") == "valid" else "test")


# ---------------------------------------------------------------------------------------------


def write_results(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(finite_json(result, indent=2, default=str) + "\n")  # NaN as null
    rows = result["measurements"]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_report(out: str | Path, result: dict[str, Any], text: str) -> None:
    """A script's result as `out`/results.json and its report as `out`/report.md (`out` made if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(text)


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    from wdl.errors import ConfigError

    if not p.is_file():
        raise ConfigError(f"no benchmark result at {path} (expected a results.json or its folder)")
    return json.loads(p.read_text())


def fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}g}" if abs(x) < 1 else f"{x:.{max(nd - len(str(int(abs(x)))), 1)}f}"
    return str(x)


def _mean_of(summary: dict, system: str, metric: str) -> float | None:
    return (summary.get(system, {}).get(metric) or {}).get("mean")


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (system, metric, a, b, ratio b/a, change flagged?) for everything both results measured.

    A change is flagged when |b - a| exceeds twice the combined noise of the two results (the
    spread across repetitions), and at least the metric's noise floor.
    """
    sa, sb = a["summary"], b["summary"]
    rows, notes = [], []
    if a.get("machine", {}).get("kind") != b.get("machine", {}).get("kind"):
        notes.append(f"different machines: {a.get('machine', {}).get('kind')} vs {b.get('machine', {}).get('kind')}")
    for system in [s for s in sa if s in sb]:
        pa, pb = sa[system].get("protocol", "test"), sb[system].get("protocol", "test")
        if pa != pb:
            notes.append(f"{system}: A chose its epoch on {_PROTOCOL[pa]}, B on {_PROTOCOL[pb]}: AUC and logloss "
                         "not compared; with a validation split held out, an epoch also trains on fewer rows")
        ra, rb = train_rows(a, system), train_rows(b, system)
        other_rows = ra is not None and rb is not None and ra != rb
        if other_rows:
            notes.append(f"{system}: an epoch of A trained on {ra} rows, of B on {rb}: seconds per epoch not "
                         "compared (samples/s is)")
        for metric, (higher_better, abs_floor, rel_floor) in METRICS.items():
            if other_rows and metric == "train_seconds":
                continue
            ma, mb = sa[system].get(metric), sb[system].get(metric)
            if not ma or not mb or ma.get("mean") is None or mb.get("mean") is None:
                continue
            va, vb = ma["mean"], mb["mean"]
            noise = 2 * math.sqrt((ma.get("std") or 0.0) ** 2 + (mb.get("std") or 0.0) ** 2)
            threshold = max(noise, abs_floor, rel_floor * abs(va))
            diff = vb - va
            flag = ""
            if abs(diff) > threshold:
                better = (diff > 0) == higher_better
                flag = "better" if better else "WORSE"
            rows.append({"system": system, "metric": metric, "a": va, "b": vb,
                         "ratio": vb / va if va else None, "diff": diff, "threshold": threshold, "flag": flag})
    return rows, notes


_PROTOCOL = {"test": "the test split", "validation": "a validation split"}


def train_rows(result: dict[str, Any], system: str) -> int | None:
    """Rows one epoch of `system` trained on (the summary's, else its records': older results)."""
    rows = result["summary"].get(system, {}).get("train_rows")
    if rows is None:
        rows = next((m["train_rows"] for m in result.get("measurements", [])
                     if m.get("system") == system and m.get("train_rows") is not None), None)
    return rows


def format_compare(rows: list[dict[str, Any]], notes: list[str]) -> str:
    lines = [f"note: {n}" for n in notes]
    lines.append(f"{'system':<28} {'metric':<20} {'A':>12} {'B':>12} {'B/A':>7} {'noise':>10}  change")
    for r in rows:
        lines.append(f"{r['system']:<28} {r['metric']:<20} {fmt(r['a']):>12} {fmt(r['b']):>12} "
                     f"{(r['ratio'] or float('nan')):>7.3f} {fmt(r['threshold'], 2):>10}  {r['flag']}")
    worse = sum(r["flag"] == "WORSE" for r in rows)
    lines.append(f"{worse} regression(s) beyond noise, {sum(r['flag'] == 'better' for r in rows)} improvement(s)")
    return "\n".join(lines)
