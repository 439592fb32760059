"""The `scale` benchmark's plots: rows/s over time, RSS per rank over time, AUC against steps.
Each marks the kill (and, over time, the resume's start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _kill_time(ax, result: dict[str, Any]) -> None:
    kill = result["attempts"][0]["killed"]
    ax.axvline(kill["t"], color="red", ls=":", lw=1, label=f"SIGKILL to rank {kill['rank']}")


def make_plots(result: dict[str, Any], out: Path) -> list[str]:
    title = f"scale on {result['machine']['kind']}"
    made = []

    fig, ax = plt.subplots(figsize=(8, 4))
    for a in result["attempts"]:
        recs = [r for r in a["records"] if r.get("kind") == "step" and r.get("samples_per_second")]
        ax.plot([r["seen_s"] for r in recs], [r["samples_per_second"] for r in recs], ".-", ms=3,
                label=f"attempt {a['attempt']}")
    _kill_time(ax, result)
    ax.set_ylim(bottom=0)
    made.append(_save(fig, ax, out / "rows_per_second_vs_time.png", "seconds since the first launch",
                      "train rows/s (all ranks)", f"rows/s over time: {title}"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for rank in sorted({s["rank"] for s in result["rss"]}):
        for a in sorted({s["attempt"] for s in result["rss"]}):
            pts = [s for s in result["rss"] if s["rank"] == rank and s["attempt"] == a]
            ax.plot([s["t"] for s in pts], [s["rss_mb"] for s in pts], "-", lw=1.2, color=f"C{rank}",
                    label=f"rank {rank}" if a == 1 else "_nolegend_")
    _kill_time(ax, result)
    ax.set_ylim(bottom=0)
    made.append(_save(fig, ax, out / "rss_vs_time.png", "seconds since the first launch", "VmRSS MB",
                      f"resident memory per rank: {title}"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for a in result["attempts"]:
        evals = [r for r in a["records"] if r.get("kind") == "eval" and r.get("auc") is not None]
        ax.plot([r["step"] for r in evals], [r["auc"] for r in evals], "o-", ms=3, label=f"valid AUC, attempt {a['attempt']}")
    ceiling = result["manifest"]["bayes_optimal_auc"]
    if ceiling:
        ax.axhline(ceiling, color="grey", ls="--", lw=1, label=f"planted ceiling {ceiling:.4f}")
    ax.axvline(result["rows"]["resumed_at_step"], color="red", ls=":", lw=1, label="checkpoint resumed from")
    made.append(_save(fig, ax, out / "auc_vs_step.png", "step", "AUC", f"validation AUC vs step: {title}"))
    return made
