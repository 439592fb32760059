"""PNG plots of one result; only those the result has data for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _label(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _test_star(ax, selected: list[dict], color, first: bool) -> None:
    """The test AUC of each repetition's selected epoch, as a star at that epoch (one legend entry)."""
    ax.plot([m["epoch"] for m in selected], [m["test_auc"] for m in selected], "*", ms=11, color=color,
            markeredgecolor="black", markeredgewidth=0.5,
            label="test AUC, model of the selected epoch" if first else "_nolegend_")


def _auc_vs_epoch(ms: list[dict], summary: dict, out: Path, title: str) -> list[str]:
    """One line per system (mean over repetitions), reference points as markers. A system selected
    on validation draws its validation AUC per epoch and a star at the test AUC of the selected
    epoch's model."""
    curves: dict[str, dict[int, list[float]]] = {}
    for m in ms:
        if m.get("auc") is not None and m.get("epoch") is not None and m.get("kind") in ("wdl", "peer", "reference",
                                                                                          "sklearn_lr", "planted"):
            curves.setdefault(m["system"], {}).setdefault(int(m["epoch"]), []).append(m["auc"])
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    validated = {s for s in curves if summary.get(s, {}).get("protocol") == "validation"}
    starred = False
    for system, pts in curves.items():
        xs = sorted(pts)
        ys = [sum(pts[x]) / len(pts[x]) for x in xs]
        measured = any(m.get("measured", True) for m in ms if m["system"] == system)
        if len(xs) == 1 or not measured:
            ax.plot(xs, ys, "o" if measured else "x", label=system + ("" if measured else " (published)"))
        else:
            line, = ax.plot(xs, ys, marker=".", label=system + (" (valid)" if system in validated else ""))
            if system in validated:
                _test_star(ax, [m for m in ms if m["system"] == system and m.get("selected")], line.get_color(),
                           first=not starred)
                starred = True
        bayes = next((m.get("bayes_auc") for m in ms if m["system"] == system and m.get("bayes_auc")), None)
        if bayes:
            ax.axhline(bayes, color="grey", ls="--", lw=1)
    ylabel = ("test AUC" if not validated else "valid AUC" if validated == set(curves)
              else "test AUC, or valid AUC (valid)")
    _label(ax, "epoch", ylabel, f"AUC vs epoch: {title}", legend_size=8)
    return [_save(fig, out / "auc_vs_epoch.png")]


def make_plots(result: dict[str, Any], out: Path) -> list[str]:
    ms, summary = result["measurements"], result["summary"]
    made = []
    title = f"{result['suite']} on {result['machine']['kind']}"

    made += _auc_vs_epoch(ms, summary, out, title)

    # Seconds per training epoch per system (warm-up excluded), error bars across repetitions.
    rows = [(s, v["train_seconds"]) for s, v in summary.items()
            if v.get("train_seconds") and v.get("kind") in ("wdl", "peer", "reference", "sklearn_lr", "planted",
                                                            "mlp_floor")]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
        names = [s for s, _ in rows]
        means = [v["mean"] for _, v in rows]
        stds = [v.get("std") or 0.0 for _, v in rows]
        colors = ["tab:grey" if summary[s].get("kind") == "reference" else "tab:blue" for s, _ in rows]
        # Lower error bar clipped above zero so a log axis can draw it.
        ax.barh(names, means, xerr=[[min(sd, 0.9 * m) for sd, m in zip(stds, means)], stds], color=colors)
        for i, m in enumerate(means):
            ax.text(m, i, f" {m:.2f}", va="center", fontsize=8)
        log = max(means) / max(min(means), 1e-9) > 20
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
        ax.set_xlabel("train seconds per epoch, warm-up excluded" + (" (log scale)" if log else ""))
        ax.set_title(f"Seconds per epoch: {title}" + ("\n(grey: published, not measured here)" if "tab:grey" in colors
                                                      else ""), fontsize=9)
        ax.invert_yaxis()
        made.append(_save(fig, out / "seconds_per_epoch.png"))

    # samples/s vs world size (scaling).
    by_ws: dict[str, dict[int, float]] = {}
    for s, v in summary.items():
        if v.get("kind") == "wdl" and v.get("world_size") and v.get("samples_per_second") and "@ws" in s:
            by_ws.setdefault(v["group"], {})[int(v["world_size"])] = v["samples_per_second"]["mean"]
    if by_ws:
        fig, ax = plt.subplots(figsize=(6, 4))
        for group, pts in by_ws.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=group)
            if 1 in pts:
                ax.plot(xs, [pts[1] * x for x in xs], ls=":", color="grey", lw=1)
        for group in by_ws:  # wdl plan's estimates, measured world sizes and beyond
            est = sorted((p["world_size"], p["planned_samples_per_second"]) for p in result.get("planned", [])
                         if p["group"] == group)
            if est:
                ax.plot(*zip(*est), marker="x", ls="--", label=f"{group} (planned)")
        if result.get("planned"):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel("world size (processes)")
        ax.set_ylabel("training samples/s")
        ax.set_xticks(sorted({x for p in by_ws.values() for x in p} | {p["world_size"] for p in result.get("planned", [])}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"Samples/s vs world size (dotted: linear; dashed: planned)\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        made.append(_save(fig, out / "samples_vs_world_size.png"))

    # samples/s vs batch size (throughput), ours and the compute floor, one line per embedding dim.
    lines: dict[str, dict[int, float]] = {}
    for s, v in summary.items():
        if v.get("kind") == "throughput" and v.get("samples_per_second") and not v.get("table_rows"):
            key = v["group"] + (f" d={v['embedding_dim']}" if v.get("embedding_dim") else "")
            lines.setdefault(key, {})[int(v["batch_size"])] = v["samples_per_second"]["mean"]
    if lines:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for key, pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", ls="--" if key.startswith("compute_floor") else "-",
                    label=key)
        ax.set_xscale("log", base=2)
        _label(ax, "batch size", "training samples/s", f"Samples/s vs batch size: {title}", legend_size=7)
        made.append(_save(fig, out / "samples_vs_batch_size.png"))

    # samples/s vs table rows (vocabulary scaling), one line per (variant, backend, batch size).
    by_rows: dict[str, dict[int, float]] = {}
    for s, v in summary.items():
        if v.get("kind") == "throughput" and v.get("samples_per_second") and v.get("table_rows"):
            key = f"{v['group']} {v.get('backend')} bs{v.get('batch_size')}"
            by_rows.setdefault(key, {})[int(v["table_rows"])] = v["samples_per_second"]["mean"]
    if by_rows:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        styles = {"ours": "-", "compute_floor": "--", "hardware_floor": ":"}
        for key, pts in sorted(by_rows.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", ls=styles.get(key.split()[0], "-"), label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _label(ax, "rows per large column", "training samples/s", f"Samples/s vs table rows: {title}", legend_size=7)
        made.append(_save(fig, out / "samples_vs_table_rows.png"))
    return made
