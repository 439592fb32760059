"""report.md: machine, the summary table, and the suite-specific ratio tables."""

from __future__ import annotations

from typing import Any

from benchmarks import tune
from benchmarks.results import fmt


def _m(v: dict, metric: str) -> float | None:
    return (v.get(metric) or {}).get("mean")


def _pm(v: dict, metric: str, nd: int = 4) -> str:
    d = v.get(metric) or {}
    if d.get("mean") is None:
        return "-"
    return fmt(d["mean"], nd) + (f" ± {fmt(d['std'], 2)}" if d.get("std") else "")


def _validated(v: dict) -> bool:
    """Was this system's epoch chosen on a validation split (its test split scored once)?"""
    return v.get("protocol") == "validation"


def _final_auc(v: dict) -> float | None:
    """The AUC a table reports for a system: after the last epoch on test, or, for a system
    selected on validation, the test AUC of the selected epoch's model."""
    return _m(v, "test_auc") if _validated(v) else _m(v, "auc")


def _auc_header(rows: list[dict], old: str) -> str:
    """An AUC column's header: `old` where no row was selected on validation, else says which were."""
    if rows and all(_validated(v) for v in rows):
        return "test AUC (epoch chosen on valid)"
    return old + ("; * test AUC, epoch chosen on valid" if any(_validated(v) for v in rows) else "")


def _auc_cell(v: dict, rows: list[dict]) -> str:
    """_final_auc, marked * when the column mixes both protocols."""
    mixed = not all(_validated(r) for r in rows)
    return fmt(_final_auc(v)) + (" *" if mixed and _validated(v) else "")


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

    out += _systems(summary) + _peers(result) + _mlp_floor(summary) + _throughput(result) + _table_rows(summary)
    out += _scaling(summary, result.get("planned", [])) + _planted(result) + tune.report(result)
    if result.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]] + [""]
    out += ["Timings are medians of the timed (non-warm-up) epochs of each repetition, then the mean over "
            "repetitions (± their standard deviation); AUC and logloss are those after the last epoch"
            + ("; for systems selected on validation, those of the selected epoch's model on the test split, "
               "scored once." if any(_validated(v) for v in summary.values()) else "."), ""]
    return "\n".join(out)


def _systems(summary: dict) -> list[str]:
    """One table for the systems scored on test every epoch, one for those selected on validation."""
    kinds = {v.get("kind") for v in summary.values()}
    if not kinds & {"wdl", "peer", "reference", "sklearn_lr", "planted", "mlp_floor", "tune"}:
        return []
    rows = [(s, v) for s, v in summary.items()
            if v.get("kind") not in ("throughput", "reader", "tune_trial")]  # trials: in the tuning table
    out = []
    if any(not _validated(v) for _, v in rows):
        out += ["## Systems", "",
                "| system | s/epoch | samples/s | final AUC | best AUC | logloss | peak RSS MB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {s} | {_pm(v, 'train_seconds')} | {_pm(v, 'samples_per_second')} | {_pm(v, 'auc')} "
                f"| {fmt(v.get('best_auc'))} | {_pm(v, 'logloss')} | {fmt(_m(v, 'peak_rss_mb'))} |"
                for s, v in rows if not _validated(v)]
        out.append("")
    if any(_validated(v) for _, v in rows):
        out += ["## Systems selected on validation", "",
                "Every epoch scored on a validation split held out of the train split; the epoch of the best "
                "validation score selected; the test split scored once, with that epoch's model.", "",
                "| system | s/epoch | samples/s | valid AUC | selected epoch | test AUC (selected epoch) "
                "| test logloss | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {s} | {_pm(v, 'train_seconds')} | {_pm(v, 'samples_per_second')} | {_pm(v, 'valid_auc')} "
                f"| {'/'.join(str(e) for e in v.get('selected_epoch', [])) or '-'} | {_pm(v, 'test_auc')} "
                f"| {_pm(v, 'test_logloss')} | {fmt(_m(v, 'peak_rss_mb'))} |" for s, v in rows if _validated(v)]
        out.append("")
    return out


def peer_ratios(summary: dict) -> list[dict]:
    """For each of our systems and each other system: s/epoch ratio (ours / theirs), AUC difference.
    One of ours selected on validation (asked for knowingly: suite.py refuses it otherwise) sets
    the test AUC of its selected epoch against their final one, and says so (`ours_validated`)."""
    ours = [s for s, v in summary.items() if v.get("kind") == "wdl"]
    others = [s for s, v in summary.items() if v.get("kind") in ("peer", "sklearn_lr", "reference")]
    rows = []
    for o in ours:
        b = summary[o]
        for s in others:
            v = summary[s]
            ratio = _m(b, "train_seconds") / _m(v, "train_seconds") if _m(v, "train_seconds") and _m(b, "train_seconds") else None
            diff = _final_auc(b) - _m(v, "auc") if _m(v, "auc") is not None and _final_auc(b) is not None else None
            best = b["best_auc"] - v["best_auc"] if b.get("best_auc") is not None and v.get("best_auc") is not None else None
            rows.append({"ours": o, "other": s, "reference": v.get("kind") == "reference", "seconds_ratio": ratio,
                         "auc_diff": diff, "best_auc_diff": best, "their_auc": _m(v, "auc"),
                         "their_seconds": _m(v, "train_seconds"), "ours_validated": _validated(b)})
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
        diff = "-" if r["auc_diff"] is None else f"{r['auc_diff']:+.4f}" + (" *" if r.get("ours_validated") else "")
        best = "-" if r["best_auc_diff"] is None else f"{r['best_auc_diff']:+.4f}"
        out.append(f"| {r['ours']} | {label} | {fmt(r['seconds_ratio'], 3)} | {diff} | {best} | {fmt(r['their_auc'])} "
                   f"| {fmt(r['their_seconds'])} |")
    out += ["", "Final = after the last epoch; best-epoch = the best test AUC over the epochs (chosen on the "
            "test split, so optimistic for every system alike)."]
    if any(r.get("ours_validated") for r in rows):
        out.append("* ours chose its epoch on a validation split held out of train, so it trained on fewer rows "
                   "than the others: the test AUC of that epoch's model, against their final AUC.")
    return out + [""]


def _mlp_floor(summary: dict) -> list[str]:
    """Ours vs the bare MLP floor measured in the same run (the mean of the floor's runs)."""
    floors = [v for v in summary.values() if v.get("kind") == "mlp_floor" and _m(v, "train_seconds")]
    ours = [(s, v) for s, v in summary.items() if v.get("kind") == "wdl" and _m(v, "train_seconds")]
    if not floors or not ours:
        return []
    floor = sum(_m(v, "train_seconds") for v in floors) / len(floors)
    spread = ", ".join(fmt(_m(v, "train_seconds")) for v in floors)
    out = ["## Ours vs the bare MLP floor (same run, same threads)", "",
           f"Floor: median seconds per epoch of the bare MLP (Linear/ReLU, BCE with logits, Adam, batches in "
           f"memory), mean of {len(floors)} run(s) around ours: {fmt(floor)} s ({spread}).", "",
           f"| ours | s/epoch | floor s/epoch | ours ÷ floor | best test AUC "
           f"| {_auc_header([v for _, v in ours], 'final AUC')} |",
           "|---|---:|---:|---:|---:|---:|"]
    for s, v in ours:
        t = _m(v, "train_seconds")
        out.append(f"| {s} | {_pm(v, 'train_seconds')} | {fmt(floor)} | {fmt(t / floor, 3)} | {fmt(v.get('best_auc'))} "
                   f"| {_auc_cell(v, [v for _, v in ours])} |")
    # Like with like: the floor's steps stand for one epoch of all the train rows (results written
    # before summaries carried `steps` say nothing here).
    floor_steps = {v.get("steps") for v in floors} - {None}
    for s, v in ours:
        if v.get("steps") is not None and floor_steps and floor_steps != {v["steps"]}:
            out += ["", f"Not like with like: an epoch of {s} was {v['steps']} steps ({v.get('train_rows')} rows"
                    + (", a validation split held out" if _validated(v) else "") + "), the floor's "
                    + "/".join(str(x) for x in sorted(floor_steps)) + " steps."]
    return out + [""]


def _throughput(result: dict) -> list[str]:
    summary = result["summary"]
    rows = [(s, v) for s, v in summary.items() if v.get("kind") == "throughput" and v.get("group") == "ours"]
    out = []
    if rows:
        counts = any(_m(v, "kernels_per_step") is not None for _, v in rows)
        out += ["## Throughput: ours vs the compute floor and the hardware floor", ""]
        hw = result.get("hardware")
        if hw:
            out += [f"Hardware floor = embedding bytes / {fmt(hw['memory_bandwidth_gbs'])} GB/s (copy of "
                    f"{hw['copy_mib']} MiB) + MLP FLOPs / {fmt(hw['peak_gflops'])} GFLOP/s (float32 matmul "
                    f"n={hw['matmul_n']}, precision {hw['matmul_precision']}), measured on {hw['device']} with "
                    f"{hw['threads']} threads; rows moved in {hw['granule_bytes']}-byte granules "
                    "(see benchmarks/floors.py).", ""]
        head = ("| config | backend | ours samples/s | compute floor | hardware floor | ours ÷ compute floor "
                "| ours ÷ hardware floor | ours step p50 / p90 ms | floor p50 / p90 ms |")
        sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        if counts:
            head += " kernels / memcpy / syncs per step |"
            sep += "---:|"
        out += [head, sep]
        for s, v in rows:
            label = s.split("@", 1)[1]
            f = summary.get(f"compute_floor@{label}", {})
            h = summary.get(f"hardware_floor@{label}", {})
            ours, fl, hf = _m(v, "samples_per_second"), _m(f, "samples_per_second"), _m(h, "samples_per_second")
            line = (f"| {label} | {v.get('backend', '-')} | {fmt(ours)} | {fmt(fl)} | {fmt(hf)} "
                    f"| {fmt(ours / fl if fl and ours else None, 3)} | {fmt(ours / hf if hf and ours else None, 3)} "
                    f"| {fmt(_m(v, 'step_p50_ms'))} / {fmt(_m(v, 'step_p90_ms'))} "
                    f"| {fmt(_m(f, 'step_p50_ms'))} / {fmt(_m(f, 'step_p90_ms'))} |")
            if counts:
                line += (f" {fmt(_m(v, 'kernels_per_step'))} / {fmt(_m(v, 'memcpy_per_step'))} "
                         f"/ {fmt(_m(v, 'syncs_per_step'))} |")
            out.append(line)
        out.append("")
    if "reader" in summary and "bare_pyarrow" in summary:
        a = _m(summary["bare_pyarrow"], "rows_per_second")
        out += ["## Streaming reader vs bare pyarrow (same files, same columns)", "",
                "One epoch over the files, the start of loader processes included; then the rows/s after the "
                "first batch, once they have started.", "",
                "| reader | rows/s | first batch after s | rows/s after it | bare pyarrow rows/s (one process) "
                "| reader ÷ pyarrow |", "|---|---:|---:|---:|---:|---:|"]
        for name, v in summary.items():
            if name.startswith("reader"):
                r = _m(v, "rows_per_second")
                out.append(f"| {name} | {fmt(r)} | {fmt(_m(v, 'first_batch_seconds'), 3)} "
                           f"| {fmt(_m(v, 'steady_rows_per_second'))} | {fmt(a)} | {fmt(r / a if a else None, 3)} |")
        out.append("")
    return out


def table_rows_ratios(summary: dict) -> list[dict]:
    """Per (backend, batch size) and table size: samples/s and the ratio to the smallest tables."""
    pts: dict[tuple, dict[int, dict]] = {}
    for s, v in summary.items():
        if v.get("kind") == "throughput" and v.get("group") == "ours" and v.get("table_rows"):
            pts.setdefault((v.get("backend"), v.get("batch_size"), v.get("embedding_dim")), {})[int(v["table_rows"])] = \
                {"ours": v, "label": s.split("@", 1)[1]}
    rows = []
    for (backend, bs, dim), by_rows in pts.items():
        base_rows = min(by_rows)
        base = {g: _m(summary.get(f"{g}@{by_rows[base_rows]['label']}", {}), "samples_per_second")
                for g in ("ours", "compute_floor", "hardware_floor")}
        for n in sorted(by_rows):
            label = by_rows[n]["label"]
            sps = {g: _m(summary.get(f"{g}@{label}", {}), "samples_per_second")
                   for g in ("ours", "compute_floor", "hardware_floor")}
            rows.append({"backend": backend, "batch_size": bs, "embedding_dim": dim, "table_rows": n,
                         "base_rows": base_rows, "table_gib": (by_rows[n]["ours"].get("table_bytes") or 0) / 2**30,
                         **{g: sps[g] for g in sps},
                         **{f"{g}_ratio": sps[g] / base[g] if sps[g] and base[g] else None for g in sps}})
    return rows


def _table_rows(summary: dict) -> list[str]:
    rows = table_rows_ratios(summary)
    if not rows:
        return []
    out = ["## Vocabulary scaling: samples/s vs table rows of the large columns", "",
           "Ratio: samples/s ÷ samples/s with the smallest tables, same backend and batch size "
           "(the target: ≥ 0.8 at 4,194,304 rows).", "",
           "| backend | batch | rows per large column | tables + state GiB | ours samples/s | ours ratio "
           "| compute floor samples/s | its ratio | hardware floor samples/s | ours ÷ hardware floor |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        hf = r["hardware_floor"]
        out.append(f"| {r['backend']} | {r['batch_size']} | {r['table_rows']:,} | {r['table_gib']:.2f} | {fmt(r['ours'])} "
                   f"| {fmt(r['ours_ratio'], 3)} | {fmt(r['compute_floor'])} | {fmt(r['compute_floor_ratio'], 3)} "
                   f"| {fmt(hf)} | {fmt(r['ours'] / hf if hf and r['ours'] else None, 3)} |")
    return out + [""]


def _scaling(summary: dict, planned: list[dict]) -> list[str]:
    groups: dict[str, dict[int, dict]] = {}
    for s, v in summary.items():
        if v.get("kind") == "wdl" and "@ws" in s:
            groups.setdefault(v["group"], {})[int(v["world_size"])] = v
    est = {(p["group"], p["world_size"]): p for p in planned}
    out = []
    for g, pts in groups.items():
        one = _m(pts.get(1, {}), "samples_per_second")
        auc = _auc_header(list(pts.values()), "final AUC")
        out += [f"## Scaling: {g}", "", f"| world size | batch/rank | samples/s | speedup | efficiency | {auc} "
                "| planned samples/s | measured ÷ planned |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for ws in sorted(pts):
            v = pts[ws]
            sps = _m(v, "samples_per_second")
            speed = sps / one if one and sps else None
            p = est.get((g, ws), {}).get("planned_samples_per_second")
            out.append(f"| {ws} | {v.get('batch_size')} | {fmt(sps)} | {fmt(speed, 3)} "
                       f"| {fmt(speed / ws if speed else None, 3)} | {_auc_cell(v, list(pts.values()))} | {fmt(p)} "
                       f"| {fmt(sps / p if sps and p else None, 3)} |")
        for (pg, ws), p in sorted(est.items()):
            if pg == g and ws not in pts:
                out.append(f"| {ws} (planned) | {p['batch_size']} | - | - | - | - "
                           f"| {fmt(p['planned_samples_per_second'])} | - |")
        out.append("")
    if planned:
        p = planned[0]
        out += [f"Planned: `wdl plan` (wdl/distributed/planning.py) on {p['device']} with {fmt(p['bandwidth_gbs'])} GB/s "
                f"memory bandwidth and {fmt(p['peak_tflops'] * 1e3)} GFLOP/s for the MLP (measured here, "
                "benchmarks/floors.py), TorchRec's default link bandwidths, one device per rank; an estimate, "
                "not a measurement (see docs/scaling.md).", ""]
    return out


def _planted(result: dict) -> list[str]:
    rows = [(s, v) for s, v in result["summary"].items() if v.get("kind") == "planted"]
    if not rows:
        return []
    bayes = next((m.get("bayes_auc") for m in result["measurements"] if m.get("bayes_auc")), None)
    values = [v for _, v in rows]
    out = ["## Planted: wide vs deep vs wide & deep", "", f"Bayes-optimal test AUC: {fmt(bayes)}", "",
           f"| model | {_auc_header(values, 'final AUC')} | gap to Bayes |", "|---|---:|---:|"]
    for s, v in rows:
        a = _final_auc(v)
        out.append(f"| {s} | {_auc_cell(v, values)} | {fmt(bayes - a if bayes and a else None, 3)} |")
    return out + [""]
