"""report.md: machine, the summary table, and the suite-specific ratio tables."""

from __future__ import annotations

from typing import Any

from benchmarks.results import fmt


def _m(v: dict, metric: str) -> float | None:
    return (v.get(metric) or {}).get("mean")


def _pm(v: dict, metric: str, nd: int = 4) -> str:
    d = v.get(metric) or {}
    if d.get("mean") is None:
        return "-"
    return fmt(d["mean"], nd) + (f" ± {fmt(d['std'], 2)}" if d.get("std") else "")


def render(result: dict[str, Any]) -> str:
    mach, summary = result["machine"], result["summary"]
    git = mach.get("git") or {}
    out = [f"# Benchmark `{result['suite']}`", ""]
    if result.get("description"):
        out += [str(result["description"]).strip(), ""]
    out += [
        f"- command: `{result['command']}`",
        f"- when: {result['started']} to {result['finished']}",
        f"- machine: {mach['kind']}: {mach['cpu_model']}, {mach['cpu_cores']} cores, "
        f"{mach.get('memory_gb')} GiB, GPUs: {', '.join(mach['gpus']) or 'none'}",
        f"- software: torch {mach['torch']}, torchrec {mach.get('torchrec')}, pyarrow {mach.get('pyarrow')}, "
        f"python {mach['python']}; git {str(git.get('commit'))[:10]}{' (dirty)' if git.get('dirty') else ''}",
        f"- repetitions: {result['suite_config'].get('repetitions')}, warm-up epochs excluded from timings: "
        f"{result['suite_config'].get('warmup_epochs')}; intra-op threads per system: "
        f"{result['suite_config'].get('threads') or 'library default'}",
    ]
    loads = [x for l in result.get("load_average", []) for x in (l.get("before"), l.get("after")) if x is not None]
    if loads:
        out.append(f"- 1-minute load average around the systems: {min(loads):.1f} to {max(loads):.1f} "
                   f"on {mach['cpu_cores']} cores" + (" (shared: other jobs ran too, timings are noisy)"
                                                       if max(loads) > 1.5 * (mach['cpu_cores'] or 1) else ""))
    out.append("")
    for n in result.get("notes", []):
        out.append(f"> {n}")
    for s in result.get("skipped", []):
        out.append(f"> skipped {s['system']}: {s['reason']}")
    if result.get("notes") or result.get("skipped"):
        out.append("")

    kinds = {v.get("kind") for v in summary.values()}
    if kinds & {"wdl", "peer", "reference", "sklearn_lr", "planted"}:
        out += ["## Systems", "",
                "| system | s/epoch | samples/s | final AUC | best AUC | logloss | peak RSS MB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for s, v in summary.items():
            if v.get("kind") in ("throughput", "reader"):
                continue
            out.append(f"| {s} | {_pm(v, 'train_seconds')} | {_pm(v, 'samples_per_second')} | {_pm(v, 'auc')} "
                       f"| {fmt(v.get('best_auc'))} | {_pm(v, 'logloss')} | {fmt(_m(v, 'peak_rss_mb'))} |")
        out.append("")
    out += _peers(result) + _throughput(summary) + _scaling(summary) + _planted(result)
    if result.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]] + [""]
    out += ["Timings are medians of the timed (non-warm-up) epochs of each repetition, then the mean over "
            "repetitions (± their standard deviation); AUC and logloss are those after the last epoch.", ""]
    return "\n".join(out)


def peer_ratios(summary: dict) -> list[dict]:
    """For each of our systems and each other system: s/epoch ratio (ours / theirs), AUC difference."""
    ours = [s for s, v in summary.items() if v.get("kind") == "wdl"]
    others = [s for s, v in summary.items() if v.get("kind") in ("peer", "sklearn_lr", "reference")]
    rows = []
    for o in ours:
        b = summary[o]
        for s in others:
            v = summary[s]
            ratio = _m(b, "train_seconds") / _m(v, "train_seconds") if _m(v, "train_seconds") and _m(b, "train_seconds") else None
            diff = _m(b, "auc") - _m(v, "auc") if _m(v, "auc") is not None and _m(b, "auc") is not None else None
            best = b["best_auc"] - v["best_auc"] if b.get("best_auc") is not None and v.get("best_auc") is not None else None
            rows.append({"ours": o, "other": s, "reference": v.get("kind") == "reference", "seconds_ratio": ratio,
                         "auc_diff": diff, "best_auc_diff": best, "their_auc": _m(v, "auc"),
                         "their_seconds": _m(v, "train_seconds")})
    return rows


def _peers(result: dict) -> list[str]:
    rows = peer_ratios(result["summary"])
    if not rows:
        return []
    out = ["## Ours vs the others (same run, same split, same features)", "",
           "| ours | other | s/epoch ours ÷ theirs | final AUC ours − theirs | best-epoch AUC ours − theirs "
           "| their final AUC | their s/epoch |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = r["other"] + (" (published; other data set and hardware)" if r["reference"] else "")
        diff = "-" if r["auc_diff"] is None else f"{r['auc_diff']:+.4f}"
        best = "-" if r["best_auc_diff"] is None else f"{r['best_auc_diff']:+.4f}"
        out.append(f"| {r['ours']} | {label} | {fmt(r['seconds_ratio'], 3)} | {diff} | {best} | {fmt(r['their_auc'])} "
                   f"| {fmt(r['their_seconds'])} |")
    out += ["", "Final = after the last epoch; best-epoch = the best test AUC over the epochs (chosen on the "
            "test split, so optimistic for every system alike).", ""]
    return out


def _throughput(summary: dict) -> list[str]:
    rows = [(s, v) for s, v in summary.items() if v.get("kind") == "throughput" and v.get("group") == "ours"]
    out = []
    if rows:
        out += ["## Throughput: ours vs the compute floor", "",
                "| config | ours samples/s | floor samples/s | ours ÷ floor | ours step p50 / p90 ms | floor p50 / p90 ms |",
                "|---|---:|---:|---:|---:|---:|"]
        for s, v in rows:
            label = s.split("@", 1)[1]
            f = summary.get(f"compute_floor@{label}", {})
            r = _m(v, "samples_per_second") / _m(f, "samples_per_second") if _m(f, "samples_per_second") else None
            out.append(f"| {label} | {fmt(_m(v, 'samples_per_second'))} | {fmt(_m(f, 'samples_per_second'))} | {fmt(r, 3)} "
                       f"| {fmt(_m(v, 'step_p50_ms'))} / {fmt(_m(v, 'step_p90_ms'))} "
                       f"| {fmt(_m(f, 'step_p50_ms'))} / {fmt(_m(f, 'step_p90_ms'))} |")
        out.append("")
    if "reader" in summary and "bare_pyarrow" in summary:
        r, a = _m(summary["reader"], "rows_per_second"), _m(summary["bare_pyarrow"], "rows_per_second")
        out += ["## Streaming reader vs bare pyarrow (same files, same columns)", "",
                "| reader rows/s | bare pyarrow rows/s | reader ÷ pyarrow |", "|---:|---:|---:|",
                f"| {fmt(r)} | {fmt(a)} | {fmt(r / a if a else None, 3)} |", ""]
    return out


def _scaling(summary: dict) -> list[str]:
    groups: dict[str, dict[int, dict]] = {}
    for s, v in summary.items():
        if v.get("kind") == "wdl" and "@ws" in s:
            groups.setdefault(v["group"], {})[int(v["world_size"])] = v
    out = []
    for g, pts in groups.items():
        one = _m(pts.get(1, {}), "samples_per_second")
        out += [f"## Scaling: {g}", "", "| world size | batch/rank | samples/s | speedup | efficiency | final AUC |",
                "|---:|---:|---:|---:|---:|---:|"]
        for ws in sorted(pts):
            v = pts[ws]
            sps = _m(v, "samples_per_second")
            speed = sps / one if one and sps else None
            out.append(f"| {ws} | {v.get('batch_size')} | {fmt(sps)} | {fmt(speed, 3)} "
                       f"| {fmt(speed / ws if speed else None, 3)} | {fmt(_m(v, 'auc'))} |")
        out.append("")
    return out


def _planted(result: dict) -> list[str]:
    rows = [(s, v) for s, v in result["summary"].items() if v.get("kind") == "planted"]
    if not rows:
        return []
    bayes = next((m.get("bayes_auc") for m in result["measurements"] if m.get("bayes_auc")), None)
    out = ["## Planted: wide vs deep vs wide & deep", "",
           f"Bayes-optimal test AUC: {fmt(bayes)}", "", "| model | final AUC | gap to Bayes |", "|---|---:|---:|"]
    for s, v in rows:
        a = _m(v, "auc")
        out.append(f"| {s} | {fmt(a)} | {fmt(bayes - a if bayes and a else None, 3)} |")
    return out + [""]
