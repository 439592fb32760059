"""The `continual` benchmark: a model trained every day on that day's rows, against a model
frozen after day 1 and a full retrain from scratch on every day so far.

    python -m benchmarks.scripts.continual [--out DIR] [key=value ...]     (or: wdl bench run continual ...)

The settings are benchmarks/suites/continual.yaml (`days=7`, `rows_per_day=...`, `epochs=...`;
trainer keys such as `model.embedding_backend=torch` go to every run). Steps:

1. generate the days if missing: `wdl data generate --profile movielens --days N` (new users and
   items each day, drifting effects, the Bayes-optimal AUC of each day's test rows);
2. for each day d: `warm` trains on day d only, from day d-1's warm model (`--init-from`, tables
   grown to day d's ids); `full` trains from scratch on days 1..d (a data set of hard links to
   those days' train files, day d's vocabulary); `frozen` is the day-1 model;
3. each strategy's model after day d is scored on day d+1's test rows (`train.eval_only` with
   `--init-from`: its tables grown to day d+1's ids, new ids at their initial rows): next-day AUC;
4. results.json, report.md and next_day_auc.png in --out; the target: warm's mean next-day AUC
   within `target_auc_gap` of full's with at most `target_rows_share` of its train rows, frozen
   below both.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT, describe
from benchmarks.suite import abs_path, script_main
from wdl.errors import ConfigError

STRATEGIES = ("warm", "full", "frozen")


def run_continual(suite: dict[str, Any], out: Path) -> dict[str, Any]:
    days, epochs = _whole(suite, "days", 2), _whole(suite, "epochs", 1)
    rows = _whole(suite, "rows_per_day", 1)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    named = [o.partition("=")[2] for o in suite["trainer_overrides"] if o.startswith("data.path=")]
    data = abs_path(named[-1] if named else suite["data"]["path"])  # the days' folder
    suite = {**suite, "trainer_overrides": [o for o in suite["trainer_overrides"] if not o.startswith("data.path=")]}
    day_dirs = [data / f"day-{d:02d}" for d in range(1, days + 1)]
    if not all((p / "manifest.json").exists() for p in day_dirs):
        _call(["data", "generate", "--profile", "movielens", "--rows", str(rows), "--days", str(days), "--out", str(data),
               "--no-progress", "--overwrite", *map(str, suite["data"].get("args", []))], out / "generate.log")
    manifests = [json.loads((p / "manifest.json").read_text()) for p in day_dirs]

    runs, trained = out / "runs", {s: [] for s in STRATEGIES}
    model: dict[str, list[Path]] = {s: [] for s in STRATEGIES}
    for d, day in enumerate(day_dirs, start=1):
        warm = _train(suite, runs, f"warm-{d:02d}", day, epochs, model["warm"][-1] if d > 1 else None, out)
        full_data = day if d == 1 else combine_days(day_dirs[:d], runs / "data" / f"days-01-{d:02d}")
        full = warm if d == 1 else _train(suite, runs, f"full-{d:02d}", full_data, epochs, None, out)
        for s, run in (("warm", warm), ("full", full), ("frozen", model["frozen"][0] if d > 1 else warm)):
            model[s].append(run)
        day_rows = manifests[d - 1]["splits"]["train"]["rows"] * epochs
        trained["warm"].append(day_rows)
        trained["full"].append(sum(m["splits"]["train"]["rows"] for m in manifests[:d]) * epochs)
        trained["frozen"].append(day_rows if d == 1 else 0)

    per_day = []
    for d in range(1, days):  # the model after day d on day d+1's test rows
        scores = {s: _score(suite, runs, f"{s}-{d:02d}-on-{d + 1:02d}", day_dirs[d], model[s][d - 1], out)
                  for s in STRATEGIES}
        per_day.append({"day": d, "next_day": d + 1, "bayes_optimal_auc": manifests[d].get("bayes_optimal_auc"),
                        **{f"{s}_auc": scores[s]["auc"] for s in STRATEGIES},
                        **{f"{s}_logloss": scores[s]["logloss"] for s in STRATEGIES},
                        **{f"{s}_rows_trained": sum(trained[s][:d]) for s in STRATEGIES}})
    result = {"suite": suite["name"], "description": suite.get("description"), "started": started.isoformat(timespec="seconds"),
              "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["wdl", "bench", "run", suite["name"], *suite["overrides"]]), "machine": describe(),
              "days": days, "rows_per_day": rows, "epochs": epochs, "per_day": per_day,
              "summary": summarise(per_day, suite)}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(report(result))
    _plot(per_day, out / "next_day_auc.png")
    return result


def summarise(per_day: list[dict[str, Any]], suite: dict[str, Any]) -> dict[str, Any]:
    """Mean next-day AUC and rows trained per strategy, and whether the targets were met."""
    mean = {s: sum(r[f"{s}_auc"] for r in per_day) / len(per_day) for s in STRATEGIES} if per_day else {}
    rows = {s: per_day[-1][f"{s}_rows_trained"] for s in STRATEGIES} if per_day else {}
    gap, share = float(suite.get("target_auc_gap", 0.002)), float(suite.get("target_rows_share", 1 / 3))
    met = bool(per_day) and mean["warm"] >= mean["full"] - gap and rows["warm"] <= share * rows["full"] \
        and mean["frozen"] < min(mean["warm"], mean["full"])
    return {"mean_next_day_auc": mean, "rows_trained": rows, "target_auc_gap": gap, "target_rows_share": share,
            "target_met": met}


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"# continual: {result['days']} days of {result['rows_per_day']:,} rows, {result['epochs']} epoch(s) a day",
             "", f"`{result['command']}`, {result['started']} .. {result['finished']}", "",
             "| day -> next | Bayes | warm | full | frozen | rows warm | rows full |", "|---|---|---|---|---|---|---|"]
    for r in result["per_day"]:
        lines.append(f"| {r['day']} -> {r['next_day']} | {r['bayes_optimal_auc'] or float('nan'):.4f} | "
                     f"{r['warm_auc']:.4f} | {r['full_auc']:.4f} | {r['frozen_auc']:.4f} | "
                     f"{r['warm_rows_trained']:,} | {r['full_rows_trained']:,} |")
    if s["mean_next_day_auc"]:
        m, n = s["mean_next_day_auc"], s["rows_trained"]
        lines += ["", f"Mean next-day AUC: warm {m['warm']:.4f}, full {m['full']:.4f}, frozen {m['frozen']:.4f}; "
                  f"rows trained: warm {n['warm']:,}, full {n['full']:,} ({n['warm'] / max(n['full'], 1):.2f}x).",
                  f"Target (warm within {s['target_auc_gap']} of full on at most {s['target_rows_share']:.2f} of its rows, "
                  f"frozen worse): {'met' if s['target_met'] else 'NOT met'}.", "",
                  "![next-day AUC](next_day_auc.png)"]
    return "\n".join(lines) + "\n"


def combine_days(days: list[Path], out: Path) -> Path:
    """A data set whose train split is every train file of `days` (hard links, else copies), with
    the last day's columns (its vocabulary holds every earlier one's) and test split."""
    if (out / "manifest.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    last = json.loads((days[-1] / "manifest.json").read_text())
    files, rows, positives = [], 0, 0.0
    for d in days:
        m = json.loads((d / "manifest.json").read_text())
        split = m["splits"]["train"]
        rows, positives = rows + split["rows"], positives + split["rows"] * split["positive_rate"]
        for f in split["files"]:
            rel = f"train/{d.name}-{Path(f['path']).name}"
            _link(d / f["path"], out / rel)
            files.append({**f, "path": rel})
    test = last["splits"]["test"]
    test_files = []
    for f in test["files"]:
        _link(days[-1] / f["path"], out / f["path"])
        test_files.append(dict(f))
    manifest = {**last, "name": f"{last['name']}-days-1-{len(days)}",
                "splits": {"train": {"rows": rows, "positive_rate": positives / rows if rows else 0.0, "files": files},
                           "test": {**test, "files": test_files}},
                "source": {"kind": "days", "days": [str(d) for d in days]}}
    manifest.pop("lineage", None)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def _train(suite: dict[str, Any], runs: Path, name: str, data: Path, epochs: int, init: Path | None, out: Path) -> Path:
    if not (runs / name / "summary.json").exists():
        _call(["train", "--config", str(abs_path(suite["config"])), f"data.path={data}", f"train.epochs={epochs}",
               *(["--init-from", str(init)] if init else []), *suite.get("run_overrides", []), *suite["trainer_overrides"],
               f"run.out_dir={runs}", f"run.name={name}", "train.progress=false"], out / "logs" / f"{name}.log")
    return runs / name


def _score(suite: dict[str, Any], runs: Path, name: str, data: Path, model: Path, out: Path) -> dict[str, Any]:
    if not (runs / name / "eval.json").exists():
        _call(["train", "--config", str(abs_path(suite["config"])), f"data.path={data}", "train.eval_only=true",
               "--init-from", str(model), *suite.get("run_overrides", []), *suite["trainer_overrides"],
               f"run.out_dir={runs}", f"run.name={name}", "train.progress=false"], out / "logs" / f"{name}.log")
    return json.loads((runs / name / "eval.json").read_text())


def _call(args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "wdl.cli", *args], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        said = next((line for line in log.read_text().splitlines() if line.startswith("error: ")), "")
        raise ConfigError(f"`wdl {' '.join(args[:3])} ...` failed (exit {rc}){': ' + said[7:] if said else ''}; see {log}")


def _whole(suite: dict[str, Any], key: str, low: int) -> int:
    v = suite.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"suite {suite['name']!r}: {key}={v!r} must be a whole number >= {low}")
    return v


def _plot(per_day: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["next_day"] for r in per_day]
    for s in STRATEGIES:
        ax.plot(x, [r[f"{s}_auc"] for r in per_day], marker="o", label=s)
    ax.plot(x, [r["bayes_optimal_auc"] for r in per_day], linestyle="--", color="grey", label="Bayes-optimal")
    ax.set_xlabel("day scored (model trained through the day before)")
    ax.set_ylabel("test AUC")
    ax.set_title("next-day AUC per strategy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return script_main("benchmarks.scripts.continual", __doc__, run_continual, argv)


if __name__ == "__main__":
    raise SystemExit(main())
