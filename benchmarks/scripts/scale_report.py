"""What the `scale` benchmark (scale.py) writes: the count of rows across the kill, the series
(rows/s over time, RSS per rank over time, AUC against steps), results.json, results.csv, plots
and report.md.

The rows are counted from the trainer's own step records: the first attempt's up to the step of
the checkpoint the second resumed from, plus the second attempt's. Each is also set against the
rows the loader's partition gives those steps (wdl.data.parquet.part_sizes: S-1 batches of B
rows per part, then the rest), so a resume that skipped or repeated a batch would show as a step
or row count that differs. Which rows (their identity) is the streaming reader's own tests' part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.results import write_results
from wdl.data.parquet import batch_bounds, part_sizes

RSS_EARLY = 0.2  # the RSS compared with the end's: at this share of the pass (10M rows of 50M)


def steps_of(records: list[dict[str, Any]], kind: str = "step") -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def expected_rows(train_rows: int, parts: int, batch_size: int, first: int, last: int) -> int:
    """Rows the loader hands out in global steps first+1 .. last (all parts together)."""
    sizes, steps = part_sizes(train_rows, parts, batch_size)
    return sum(b[min(last, steps)] - b[min(first, steps)] for b in (batch_bounds(s, steps, batch_size) for s in sizes))


def count_rows(result: dict[str, Any], batch_size: int, parts: int) -> dict[str, Any]:
    """Every train row read once across the kill? The trainer's rows_seen counter, interval by
    interval, against the loader's partition, and the steps without a gap or a repeat."""
    first, second = (steps_of(a["records"]) for a in result["attempts"])
    resume = result["resume"]["step"]
    train_rows, steps = result["manifest"]["train_rows"], result["steps_per_epoch"]
    kept = [r for r in first if r["step"] <= resume]
    # A log interval that straddles the checkpoint cannot be split between the attempts.
    aligned = bool(kept) and kept[-1]["step"] == resume or (not kept and resume == 0)
    at_checkpoint = kept[-1]["rows_seen"] if kept else 0
    course = kept + second  # the pass as it counts: attempt 1 up to the checkpoint, then attempt 2
    intervals, prev_step, prev_rows = [], 0, 0
    for r in course:
        intervals.append({"steps": [prev_step + 1, r["step"]], "rows": r["rows_seen"] - prev_rows,
                          "expected": expected_rows(train_rows, parts, batch_size, prev_step, r["step"])})
        prev_step, prev_rows = r["step"], r["rows_seen"]
    last = course[-1] if course else {}
    epoch = next((r for r in reversed(result["attempts"][1]["records"]) if r.get("kind") == "epoch"), {})
    out = {
        "train_rows": train_rows,
        "steps_per_epoch": steps,
        "resumed_at_step": resume,
        "killed_after_step": result["attempts"][0]["killed"]["last_logged_step"],
        "attempt_1_rows_kept": at_checkpoint,
        # trained by attempt 1 after its last checkpoint: lost with the kill, trained again by attempt 2
        "attempt_1_rows_redone": (first[-1]["rows_seen"] - at_checkpoint) if first else 0,
        "attempt_2_rows": (second[-1]["rows_seen"] - at_checkpoint) if second else 0,
        "attempt_2_first_step": second[0]["step"] if second else None,
        "last_step": last.get("step"),
        "rows_counted": last.get("rows_seen"),
        "intervals_aligned_with_checkpoint": aligned,
        "steps_in_order": all(b["step"] > a["step"] for a, b in zip(course, course[1:])),
        "intervals_as_partitioned": sum(i["rows"] == i["expected"] for i in intervals),
        "intervals": len(intervals),
        "mismatched_intervals": [i for i in intervals if i["rows"] != i["expected"]][:10],
        "expected_rows_to_checkpoint": expected_rows(train_rows, parts, batch_size, 0, resume),
        "expected_rows_after_checkpoint": expected_rows(train_rows, parts, batch_size, resume, steps),
        "epoch_record_train_rows": epoch.get("train_rows"),
    }
    out["each_row_once"] = bool(
        aligned and out["steps_in_order"] and out["intervals_as_partitioned"] == len(intervals)
        and out["rows_counted"] == train_rows and out["last_step"] == steps
        and out["epoch_record_train_rows"] in (None, train_rows))
    resumed = next((r["seen_s"] for r in result["attempts"][1]["records"] if r.get("kind") == "step"), None)
    out["seconds_from_kill_to_next_step"] = round(resumed - result["attempts"][0]["killed"]["t"], 1) if resumed else None
    return out


def series(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per step record, evaluation and RSS sample (results.csv), tagged by `series`."""
    rows: list[dict[str, Any]] = []
    for a in result["attempts"]:
        for r in a["records"]:
            kind = r.get("kind", "epoch")
            keep = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
            rows.append({"series": kind, "attempt": a["attempt"], **keep})
    rows += [{"series": "rss", **s} for s in result["rss"]]
    return rows


def rss_summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per rank: RSS when RSS_EARLY of the rows were seen, at the end, and the peaks (VmHWM)."""
    total = result["manifest"]["train_rows"]
    out = []
    for rank in sorted({s["rank"] for s in result["rss"]}):
        mine = [s for s in result["rss"] if s["rank"] == rank]
        early = next((s for s in mine if (s.get("rows_seen") or 0) >= RSS_EARLY * total), None)
        last = mine[-1]
        out.append({"rank": rank, "rows_early": early and early["rows_seen"], "rss_early_mb": early and early["rss_mb"],
                    "rss_end_mb": last["rss_mb"], "rows_end": last.get("rows_seen"),
                    "peak_mb_per_attempt": {a: max(s["hwm_mb"] for s in mine if s["attempt"] == a)
                                            for a in sorted({s["attempt"] for s in mine})}})
    return out


def rate_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Samples/s in each third of the pass (median of the step records): flat, or not."""
    recs = sorted((r for a in result["attempts"] for r in steps_of(a["records"])), key=lambda r: r["step"])
    rates = [r["samples_per_second"] for r in recs if r.get("samples_per_second")]
    if not rates:
        return {}
    n = len(rates)
    thirds = [sorted(rates[i * n // 3:(i + 1) * n // 3] or rates) for i in range(3)]
    medians = [t[len(t) // 2] for t in thirds]
    return {"median_by_third": medians, "last_third_over_first": medians[2] / medians[0] if medians[0] else None}


def write_outputs(result: dict[str, Any], out: Path) -> None:
    cfg = result["suite_config"]
    batch = _override(result["launch"], "data.batch_size", int)
    workers = _override(result["launch"], "data.num_workers", int) or 1
    result["rows"] = count_rows(result, batch, int(cfg["world_size"]) * workers)
    result["rss_summary"] = rss_summary(result)
    result["rate_summary"] = rate_summary(result)
    result["measurements"] = series(result)
    try:
        from benchmarks.scripts.scale_plots import make_plots
    except ImportError as e:  # matplotlib is the bench extra
        result["plots"], result["notes"] = [], [f"no plots: {e}"]
    else:
        result["plots"], result["notes"] = make_plots(result, out), []
    write_results(out, result)
    (out / "report.md").write_text(render(result))


def _override(cmd: list[str], key: str, cast):
    """The last value the launch gives `key`, else the config file's."""
    vals = [a.partition("=")[2] for a in cmd if a.startswith(key + "=")]
    if vals:
        return cast(vals[-1])
    from wdl.config import load_config

    section, name = key.split(".")
    return getattr(getattr(load_config(cmd[cmd.index("--config") + 1]), section), name)


def render(result: dict[str, Any]) -> str:
    rows, m = result["rows"], result["machine"]
    ceiling = result["manifest"]["bayes_optimal_auc"]
    evals = [r for a in result["attempts"] for r in steps_of(a["records"], "eval")]
    last_eval = max(evals, key=lambda r: r["step"]) if evals else {}
    test = (result["summary_json"].get("test") or {})
    kill = result["attempts"][0]["killed"]
    lines = [
        "# Benchmark `scale`", "", " ".join(str(result.get("description") or "").split()), "",
        f"- command: `{result['command']}`",
        f"- when: {result['started']} to {result['finished']}",
        f"- machine: {m['kind']}: {m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gb']} GiB; torch {m['torch']}, "
        f"torchrec {m['torchrec']}; git {str(m['git']['commit'])[:10]}{' (dirty)' if m['git']['dirty'] else ''}",
        f"- data: {result['data']}: {rows['train_rows']:,} train rows, {result['manifest']['valid_rows']} valid rows",
        f"- launch: `{' '.join(result['launch'][2:])}`",
        f"- 1-minute load average: {result['load_average_before']} before, {result['load_average_after']} after "
        f"(samples beside the RSS in results.csv)",
        "", "## Rows read across the kill", "",
        f"Rank {kill['rank']} was sent {kill['signal']} after step {kill['last_logged_step']} (target "
        f"{kill['target_step']}) of {rows['steps_per_epoch']}; the second launch resumed from step "
        f"{rows['resumed_at_step']} ({result['resume']['checkpoint']}); from the kill to the first step record after "
        f"the resume: {rows['seconds_from_kill_to_next_step']} s.", "",
        "| | steps | rows (trainer) | rows (loader's partition) |", "|---|---|---:|---:|",
        f"| attempt 1, to the checkpoint | 1-{rows['resumed_at_step']} | {rows['attempt_1_rows_kept']:,} | "
        f"{rows['expected_rows_to_checkpoint']:,} |",
        f"| attempt 1, after it (trained again) | {rows['resumed_at_step'] + 1}-{rows['killed_after_step']} | "
        f"{rows['attempt_1_rows_redone']:,} | - |",
        f"| attempt 2 | {rows['resumed_at_step'] + 1}-{rows['last_step']} | "
        f"{rows['attempt_2_rows']:,} | {rows['expected_rows_after_checkpoint']:,} |",
        f"| counted (kept + attempt 2) | 1-{rows['last_step']} | {rows['rows_counted'] or 0:,} | {rows['train_rows']:,} "
        "(train split) |", "",
        f"Each train row read once: **{'yes' if rows['each_row_once'] else 'NO'}**. The trainer's rows_seen counter "
        f"(checkpointed, so attempt 2 goes on from attempt 1's count at the checkpoint) matches the loader's "
        f"partition in {rows['intervals_as_partitioned']} of {rows['intervals']} log intervals, the steps run 1 to "
        f"{rows['last_step']} in order, log intervals aligned with the checkpoint: "
        f"{rows['intervals_aligned_with_checkpoint']}, the epoch record says {rows['epoch_record_train_rows']} train "
        "rows. These are counts, not row identities: which rows a step reads is fixed by (seed, epoch, position), "
        "and the reader's resume tests check that.", "",
        "## Rows/s, memory, AUC", "",
        *_rate_lines(result), "",
        f"| rank | VmRSS MB at {RSS_EARLY:.0%} of the rows (rows seen) | VmRSS MB at the end (rows seen) | "
        "peak MB per attempt (VmHWM) |", "|---:|---:|---:|---:|",
        *[f"| {r['rank']} | {_mb(r['rss_early_mb'])} ({r['rows_early'] or '-'}) | {_mb(r['rss_end_mb'])} "
          f"({r['rows_end']}) | {', '.join(_mb(v) for v in r['peak_mb_per_attempt'].values())} |"
          for r in result["rss_summary"]], "",
        f"Validation AUC at the last evaluation (step {last_eval.get('step')}): {_num(last_eval.get('auc'))}; "
        f"planted ceiling (bayes_optimal_auc): {_num(ceiling)}; test AUC of the selected model "
        f"(scored once): {_num(test.get('auc'))}.", "",
        *[f"![{p}]({p})" for p in result["plots"]], *[f"- {n}" for n in result["notes"]],
    ]
    return "\n".join(lines) + "\n"


def _rate_lines(result: dict[str, Any]) -> list[str]:
    r = result["rate_summary"]
    if not r:
        return ["No step records with samples/s."]
    a, b, c = r["median_by_third"]
    return [f"Samples/s, median of the step records in each third of the pass: {a:,.0f}, {b:,.0f}, {c:,.0f} "
            f"(last / first: {r['last_third_over_first']:.3f}). A log interval that holds an evaluation or a "
            "checkpoint save counts its time too: those are the dips."]


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
