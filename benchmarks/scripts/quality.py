"""Model quality of a config and its variants: an ablation table selected on validation, and AUC
against epoch on train, valid and test rows.

    python -m benchmarks.scripts.quality ABLATION [--out DIR] [--threads N] [--only NAME ...] [--data DIR] [key=value ...]

ABLATION is a YAML file (or the name of one in benchmarks/suites/, e.g. quality-movielens-100k):

    config: configs/synthetic-criteo.yaml    # the base config
    data:                                     # generated when missing (as the suites' data is)
      path: data/bench/synthetic-criteo-1m-valid
      generate: {profile: criteo, rows: 1000000, args: [--valid-fraction, 0.1, --seed, 2021]}
    run_overrides: [data.valid_split=valid]  # to every run
    variants:                                 # name -> its overrides; each trained on its own
      before: [optim.deep.lr=0.05]
      after: []
    seeds: [2021, 1]                          # default: the config's run.seed
    epochs: 10
    curve_rows: 100000                        # train rows scored each epoch for the train curve (0: none)
    references: {lr_baseline: 0.7987, ceiling: 0.8195, bayes: manifest}   # manifest: its bayes_optimal_auc

`key=value` items change the file (`epochs=3`, `seeds=[1,2]`); items starting with a config section
(`train.`, `model.`, ...) go to every run. `--data DIR` replaces the file's data set (nothing is
generated), `--threads N` sets train.threads (default 1), `--only` runs the variants named.

Each variant x seed trains in this process as `wdl train` does (the Trainer): every epoch is scored
on the validation split, which alone picks the epoch (the trainer's `best`), and the test split is
scored once with that epoch's model: the reported number. For the curves, at each epoch's end,
after the trainer's own evaluation, the live model (what that epoch's checkpoint would hold) also
scores the first `curve_rows` train rows (in the seeded order of the first epoch, the same rows
every epoch) and the whole test split; the valid curve is the trainer's own evaluation
(metrics.jsonl). These extra scores are only read, for the plots: they change neither the training
nor the choice, and the test score of the curve at the selected epoch equals the trainer's.

Into --out (default benchmarks/results/<machine kind>/<file name>-<date>): results.json,
results.csv (one row per variant, seed and epoch), report.md (the ablation table: valid and test AUC
at the selected epoch, mean and spread over seeds, the difference to the first variant and the
share of the gap from `lr_baseline` to each other reference closed), auc_vs_epoch.png and
logloss_vs_epoch.png (a panel per variant, the selected epoch marked), logs/ and runs/ (each run's
folder without its checkpoints). A run whose folder holds its summary and curves for the same
config is reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.machine import ROOT, describe
from benchmarks.suite import abs_path, load_suite
from wdl.errors import ConfigError

KEYS = {"description", "runner", "config", "data", "run_overrides", "variants", "seeds", "epochs", "curve_rows",
        "references"}
# Added by load_suite (its defaults and what it records); not settings of an ablation.
SUITE_KEYS = {"name", "path", "overrides", "trainer_overrides", "repetitions", "warmup_epochs", "threads",
              "valid_fraction", "systems"}
SPLITS = ("train", "valid", "test")
NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # a variant's name is part of its run folder's name


# ------------------------------------------------------------------------------------ settings
def settings(suite: dict[str, Any], data: str | None, threads: int, only: list[str]) -> dict[str, Any]:
    """The ablation's settings checked, and each run's config loaded (a typo fails before training)."""
    from wdl.config import load_config

    unknown = sorted(set(suite) - KEYS - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{suite['path']}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    if not suite.get("config"):
        raise ConfigError(f"{suite['path']}: `config:` (the base config) is required")
    variants = suite.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{suite['path']}: `variants:` must map names to lists of key=value overrides")
    variants = {str(k): [str(o) for o in (v or [])] for k, v in variants.items()}
    for name, overrides in variants.items():
        if not NAME.fullmatch(name):
            raise ConfigError(f"{suite['path']}: variant name {name!r}: letters, digits and _.+- only")
    missing = [n for n in only if n not in variants]
    if missing:
        raise ConfigError(f"--only {' '.join(missing)}: no such variant (the file has {', '.join(variants)})")
    epochs, rows = suite.get("epochs"), suite.get("curve_rows", 100000)
    for key, v, least in (("epochs", epochs, 1), ("curve_rows", rows, 0), ("--threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ConfigError(f"{suite['name']}: {key}={v!r} must be a whole number >= {least}")
    named = [o.partition("=")[2] for o in suite["trainer_overrides"] if o.startswith("data.path=")]
    path = data or (named[-1] if named else (suite.get("data") or {}).get("path"))
    config = str(abs_path(suite["config"]))
    # Without a data path anywhere the config's own is used (e.g. a set it prepares on first use).
    path = abs_path(path) if path else abs_path(load_config(config).data.path)
    base = [f"data.path={path}", f"train.epochs={epochs}", *map(str, suite.get("run_overrides") or [])]
    own = suite.get("data") or {}
    generate = own if own.get("generate") and not (data or named) else None  # a set given instead is used as is
    seeds = suite.get("seeds") or [load_config(config, base + suite["trainer_overrides"]).run.seed]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{suite['name']}: seeds={seeds!r} must be a list of whole numbers")
    chosen = {n: o for n, o in variants.items() if not only or n in only}
    for name, overrides in chosen.items():
        cfg = load_config(config, base + overrides + suite["trainer_overrides"])
        d = cfg.data
        if not (d.valid_split or d.valid_fraction > 0) or d.valid_split == d.eval_split:
            raise ConfigError(f"variant {name!r}: no validation split to select on (set data.valid_split to a split "
                              f"other than data.eval_split={d.eval_split}, or data.valid_fraction)")
        if cfg.train.eval_every_steps:
            raise ConfigError(f"variant {name!r}: the curves are per epoch; train.eval_every_steps must be 0")
    return {"name": suite["name"], "config": config, "data": path, "base": base, "variants": chosen,
            "all_variants": variants, "seeds": seeds, "epochs": epochs, "curve_rows": rows, "threads": threads,
            "references": dict(suite.get("references") or {}), "generate": generate}


def run_overrides(s: dict[str, Any], suite: dict[str, Any], variant: str, seed: int, runs: Path) -> list[str]:
    """One run's overrides: the file's, the variant's, the command line's, then what this script
    needs (its folder, seed and threads; no checkpoints but `best`, which scores the test split)."""
    return [*s["base"], *s["variants"][variant], *suite["trainer_overrides"],
            f"run.out_dir={json.dumps(str(runs))}", f"run.name={variant}-s{seed}", f"run.seed={seed}",
            f"train.threads={s['threads']}", "train.progress=false", "checkpoint.at_epoch_end=false",
            "checkpoint.every_steps=0", "checkpoint.resume=", "train.eval_only=false"]


# ------------------------------------------------------------------------------------ training
def curve_trainer() -> type:
    from wdl.train.metrics import finite_json
    from wdl.train.trainer import Trainer

    class CurveTrainer(Trainer):
        """The Trainer, scoring at each epoch's end, after its own evaluation (which alone selects),
        the first `curve_rows` train rows and the test split with the live model into curves.jsonl."""

        curve_rows, label = 0, ""
        say: Callable[[str], None]

        def end_epoch(self, stats: dict[str, Any], complete: bool) -> None:
            super().end_epoch(stats, complete)
            start = time.perf_counter()
            record: dict[str, Any] = {"epoch": self.epoch if complete else self.epoch + 1, "step": self.step}
            if self.curve_rows:
                record["train"] = _scores(self.evaluate(self.train_loader, self.curve_rows))
            record["test"] = _scores(self.evaluate(self.test_loader))
            record["seconds"] = time.perf_counter() - start
            with (self.run_dir / "curves.jsonl").open("a") as f:
                f.write(finite_json(record) + "\n")
            epoch = next(r for r in reversed(self.metrics.records) if r.get("kind", "epoch") == "epoch")
            train = f", train {_f(record['train']['auc'])}" if self.curve_rows else ""
            self.say(f"{self.label} epoch {record['epoch']}/{self.cfg.train.epochs}: valid AUC {_f(epoch.get('auc'))}"
                     f"{train}, test {_f(record['test']['auc'])} ({epoch['train_seconds']:.1f} s training, "
                     f"{epoch.get('eval_seconds', 0) + record['seconds']:.1f} s scoring)")

    return CurveTrainer


def train_run(config: str, overrides: list[str], label: str, curve_rows: int, log: Path,
              say: Callable[[str], None], env: Any) -> dict[str, Any]:
    """Train one run (or reuse its finished folder for the same config); its records."""
    from wdl.config import load_config

    cfg = load_config(config, overrides)
    run = Path(cfg.run.out_dir) / cfg.run.name
    reused = _finished(run, cfg)
    if reused:
        say(f"{label}: reusing {run}")
    else:
        shutil.rmtree(run, ignore_errors=True)  # a run cut short: trained again from the start
        say(f"{label}: training {cfg.train.epochs} epoch(s) into {run}")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            trainer = curve_trainer()(cfg, env)
            trainer.curve_rows, trainer.say, trainer.label = curve_rows, say, label
            try:
                summary = trainer.train()
            finally:
                trainer.close()
            if cfg.train.refit:  # as `wdl train` does: every train row for the epochs chosen
                from wdl.train.refit import refit

                done = refit(cfg, env, run, summary)
                if done is not None:
                    say(f"{label}: refit on every train row for {done['epochs']} epoch(s): "
                        f"test AUC {_f((done['test'] or {}).get('auc'))} (scored once)")
    for folder in (run, run / "refit"):
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the test split is scored
    return {**read_run(run), "reused": reused}


def _finished(run: Path, cfg: Any) -> bool:
    """The run ended (its summary is written last) with this config (the trainer saves it first)."""
    from wdl.config import load_config

    if not all((run / f).exists() for f in ("summary.json", "curves.jsonl", "config.yaml")) or \
            (run / "config-2.yaml").exists():
        return False
    if cfg.train.refit and "refit" not in json.loads((run / "summary.json").read_text()):
        return False
    try:
        return load_config(run / "config.yaml").to_dict() == cfg.to_dict()
    except ConfigError:
        return False


def read_run(run: Path) -> dict[str, Any]:
    """Per epoch: train and test from curves.jsonl, valid from the trainer's epoch records; the
    selection and its test score from summary.json."""
    summary = json.loads((run / "summary.json").read_text())
    curves = {r["epoch"]: r for r in _jsonl(run / "curves.jsonl")}
    epochs = []
    for r in _jsonl(run / "metrics.jsonl"):
        if r.get("kind", "epoch") != "epoch":
            continue
        c = curves.get(r["epoch"], {})
        epochs.append({"epoch": r["epoch"], "train_loss": r.get("train_loss"), "train_seconds": r.get("train_seconds"),
                       **{f"train_{k}": (c.get("train") or {}).get(k) for k in ("auc", "logloss")},
                       "valid_auc": r.get("auc"), "valid_logloss": r.get("logloss"),
                       **{f"test_{k}": (c.get("test") or {}).get(k) for k in ("auc", "logloss")}})
    best, test = summary.get("best_epoch"), summary.get("test") or {}
    at = next((e for e in epochs if e["epoch"] == best), {})
    # Seconds from the records, so that a reused run reports what it took when it ran.
    seconds = sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0) for r in _jsonl(run / "metrics.jsonl")
                  if r.get("kind", "epoch") == "epoch") + sum(c.get("seconds") or 0 for c in curves.values())
    return {"run": str(run), "selected_epoch": best, "seconds": round(seconds, 1), "valid_auc": at.get("valid_auc"),
            "valid_logloss": at.get("valid_logloss"), "test_auc": test.get("auc"), "test_logloss": test.get("logloss"),
            "refit_test_auc": ((summary.get("refit") or {}).get("test") or {}).get("auc"),
            "curve_test_auc": at.get("test_auc"), "epochs": epochs,
            "train_rows_scored": max(((c.get("train") or {}).get("rows") or 0 for c in curves.values()), default=0),
            "train_seconds": sum(e["train_seconds"] or 0 for e in epochs)}


# ------------------------------------------------------------------------------------ the whole
def run_quality(suite: dict[str, Any], out: Path, *, data: str | None = None, threads: int = 1,
                only: list[str] = (), command: str = "", say: Callable[[str], None] | None = None) -> dict[str, Any]:
    from benchmarks.run import ensure_data
    from wdl.distributed.env import init_distributed
    from wdl.train.metrics import finite_json

    err = sys.stderr  # the runs' own output is redirected to their logs: progress goes here
    say = say or (lambda line: print(f"quality: {line}", file=err, flush=True))
    s = settings(suite, data, threads, list(only))
    if s["generate"]:
        ensure_data(s["generate"])
    out.mkdir(parents=True, exist_ok=True)
    started, load = dt.datetime.now(dt.timezone.utc), [os.getloadavg()[0]]
    env = None
    runs = []
    for variant in s["variants"]:
        for seed in s["seeds"]:
            overrides = run_overrides(s, suite, variant, seed, out / "runs")
            if env is None:
                from wdl.config import load_config

                cfg = load_config(s["config"], overrides)
                env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
            label = f"{variant} seed {seed}"
            r = train_run(s["config"], overrides, label, s["curve_rows"], out / "logs" / f"{variant}-s{seed}.log", say, env)
            r = {"variant": variant, "seed": seed, "overrides": s["variants"][variant], **r,
                 "run": os.path.relpath(r["run"], out)}
            say(f"{label}: selected epoch {r['selected_epoch']} on valid (AUC {_f(r['valid_auc'])}); test AUC of "
                f"that model {_f(r['test_auc'])} (scored once)")
            runs.append(r)
            load.append(os.getloadavg()[0])
    references = _references(s["references"], s["data"])
    result = {"name": s["name"], "description": suite.get("description"), "command": command,
              "started": started.isoformat(timespec="seconds"),
              "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": describe(), "load_average": {"min": min(load), "max": max(load)},
              "config": _shown(s["config"]), "data": str(s["data"]), "run_overrides": s["base"][2:],
              "cli_overrides": suite["trainer_overrides"], "variants": s["variants"], "seeds": s["seeds"],
              "epochs": s["epochs"], "curve_rows": s["curve_rows"], "threads": s["threads"], "references": references,
              "runs": runs, "summary": summarise(runs, references)}
    result["plots"] = [p for p in (plot(result, "auc", out), plot(result, "logloss", out)) if p]
    (out / "results.json").write_text(finite_json(result, indent=1) + "\n")
    write_csv(runs, out / "results.csv")
    (out / "report.md").write_text(report(result))
    return result


def _references(refs: dict[str, Any], data: Path) -> dict[str, float]:
    out = {}
    for name, v in refs.items():
        if v == "manifest":  # the planted data's best possible test AUC
            try:
                v = json.loads((data / "manifest.json").read_text()).get("bayes_optimal_auc")
            except (OSError, ValueError):
                v = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(name)] = float(v)
    return out


def summarise(runs: list[dict[str, Any]], refs: dict[str, float]) -> list[dict[str, Any]]:
    """Per variant: the mean and spread over seeds of valid and test AUC at the selected epochs,
    the difference to the first variant and the share of each gap from lr_baseline closed."""
    rows: list[dict[str, Any]] = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant, "seeds": len(mine),
                               "selected_epochs": [r["selected_epoch"] for r in mine]}
        for key in ("valid_auc", "test_auc", "test_logloss", "refit_test_auc"):
            vals = [r[key] for r in mine if r.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
            row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        if rows and row["test_auc"] is not None and rows[0]["test_auc"] is not None:
            row["test_auc_vs_first"] = row["test_auc"] - rows[0]["test_auc"]
        lr = refs.get("lr_baseline")
        for name, ref in refs.items():
            if name != "lr_baseline" and lr is not None and ref != lr and row["test_auc"] is not None:
                row[f"gap_closed_{name}"] = (row["test_auc"] - lr) / (ref - lr)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ output
CSV = ["variant", "seed", "epoch", "train_auc", "train_logloss", "valid_auc", "valid_logloss", "test_auc",
       "test_logloss", "train_loss", "train_seconds", "selected", "reported_test_auc"]


def write_csv(runs: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV)
        w.writeheader()
        for r in runs:
            for e in r["epochs"]:
                sel = e["epoch"] == r["selected_epoch"]
                w.writerow({**{k: e.get(k) for k in CSV}, "variant": r["variant"], "seed": r["seed"],
                            "selected": sel, "reported_test_auc": r["test_auc"] if sel else None})


def report(result: dict[str, Any]) -> str:
    m, git, refs = result["machine"], result["machine"].get("git") or {}, result["references"]
    every = result["run_overrides"] + result["cli_overrides"]
    reused = sum(r["reused"] for r in result["runs"])
    refit = any(r.get("refit_test_auc") is not None for r in result["runs"])  # train.refit: its own column
    lines = [f"# Model quality: {result['name']}", ""]
    if result.get("description"):
        lines += [" ".join(str(result["description"]).split()), ""]
    lines += [
        f"- command: `{result['command']}`",
        f"- when: {result['started']} to {result['finished']}"
        + (f" ({reused} of {len(result['runs'])} runs reused from an earlier call)" if reused else ""),
        f"- machine: {m['kind']}: {m['cpu_model']}, {m['cpu_cores']} cores, {m.get('memory_gb')} GiB, "
        f"GPUs: {', '.join(m['gpus']) or 'none'}",
        f"- software: torch {m['torch']}, torchrec {m.get('torchrec')}, pyarrow {m.get('pyarrow')}, python "
        f"{m['python']}; git {str(git.get('commit'))[:10]}{' (dirty)' if git.get('dirty') else ''}",
        f"- 1-minute load average around the runs: {result['load_average']['min']:.1f} to "
        f"{result['load_average']['max']:.1f} on {m['cpu_cores']} cores; train.threads={result['threads']}",
        f"- config `{result['config']}` on `{result['data']}`, {result['epochs']} epoch(s), seeds "
        f"{', '.join(map(str, result['seeds']))}" + (f"; every run: `{' '.join(every)}`" if every else ""),
        "",
        "The epoch is selected on the validation split only; the test split is scored once, with the selected "
        "epoch's model (the reported number). The test curves in the plots are for reading, never for choosing."
        + (" Refit (train.refit): a new model on every train row for the selected epochs, scored once on test."
           if refit else ""),
        "", "| variant | overrides | selected epoch | valid AUC | test AUC | test logloss | vs first |"
        + " refit test AUC |" * refit
        + "".join(f" gap to {n} closed |" for n in refs if n != "lr_baseline" and "lr_baseline" in refs),
        "|---|---|---|---|---|---|---|" + "---|" * (refit + sum(n != "lr_baseline" and "lr_baseline" in refs for n in refs))]
    for row in result["summary"]:
        cells = [row["variant"], "`" + " ".join(result["variants"][row["variant"]]) + "`" if result["variants"][row["variant"]]
                 else "(base)", ", ".join(map(str, row["selected_epochs"])), _pm(row, "valid_auc"), _pm(row, "test_auc"),
                 _pm(row, "test_logloss"), f"{row['test_auc_vs_first']:+.4f}" if "test_auc_vs_first" in row else ""]
        cells += [_pm(row, "refit_test_auc")] * refit
        cells += [f"{row[f'gap_closed_{n}']:.1%}" if f"gap_closed_{n}" in row else "-"
                  for n in refs if n != "lr_baseline" and "lr_baseline" in refs]
        lines.append("| " + " | ".join(cells) + " |")
    if refs:
        lines += ["", "References (test AUC): " + ", ".join(f"{n} {v:.4f}" for n, v in refs.items())
                  + (". Gap closed: (test AUC - lr_baseline) / (reference - lr_baseline)." if "lr_baseline" in refs else ".")]
    if any(row["seeds"] > 1 for row in result["summary"]):
        lines += ["", "AUCs are means over seeds, +- their standard deviation."]
    lines += ["", "## Runs", "", "| variant | seed | selected epoch | valid AUC | test AUC |" + " refit test AUC |" * refit
              + " train AUC there | train s | train + scoring s |", "|---|---|---|---|---|---|---|---|" + "---|" * refit]
    for r in result["runs"]:
        at = next((e for e in r["epochs"] if e["epoch"] == r["selected_epoch"]), {})
        lines.append(f"| {r['variant']} | {r['seed']} | {r['selected_epoch']} | {_f(r['valid_auc'])} | {_f(r['test_auc'])} | "
                     + f"{_f(r.get('refit_test_auc'))} | " * refit
                     + f"{_f(at.get('train_auc'))} | {r['train_seconds']:.0f} | {r['seconds']:.0f} |")
    scored = max((r["train_rows_scored"] for r in result["runs"]), default=0)
    lines += ["", f"Train AUC: the first {scored:,} train rows in the first epoch's shuffled order, the same ones "
              f"every epoch (curve_rows {result['curve_rows']:,})." if scored else "No train curve (curve_rows 0).", ""]
    lines += [f"![{p}]({p})" for p in result["plots"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], metric: str, out: Path) -> str | None:
    """A panel per variant: train, valid and test `metric` per epoch for each seed, the selected
    epoch (on valid) marked, with a star at the reported test value; references as dashed lines."""
    try:
        from matplotlib.ticker import MaxNLocator

        from benchmarks.plots import _save, plt
    except ImportError:  # no matplotlib: the numbers are in results.json
        return None
    variants = list(dict.fromkeys(r["variant"] for r in result["runs"]))
    if not variants:
        return None
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), sharey=True, squeeze=False)
    colors = {"train": "tab:blue", "valid": "tab:orange", "test": "tab:green"}
    for ax, variant in zip(axes.flat, variants):
        for i, r in enumerate(x for x in result["runs"] if x["variant"] == variant):
            xs = [e["epoch"] for e in r["epochs"]]
            for split in SPLITS:
                ys = [e.get(f"{split}_{metric}") for e in r["epochs"]]
                if any(y is not None for y in ys):
                    ax.plot(xs, [math.nan if y is None else y for y in ys], marker=".", color=colors[split],
                            alpha=1.0 if i == 0 else 0.5, label=split if i == 0 else "_nolegend_")
            if r["selected_epoch"] is not None:
                ax.axvline(r["selected_epoch"], color="grey", linestyle=":", linewidth=1,
                           label="selected on valid" if i == 0 else "_nolegend_")
                ax.plot([r["selected_epoch"]], [r[f"test_{metric}"]], "*", ms=11, color=colors["test"],
                        markeredgecolor="black", markeredgewidth=0.5,
                        label="reported test" if i == 0 else "_nolegend_")
        if metric == "auc":
            for name, v in result["references"].items():
                ax.axhline(v, color="black", linestyle="--", linewidth=0.7, alpha=0.6)
                ax.annotate(name, (1, v), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7)
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    name = {"auc": "AUC"}.get(metric, metric)
    axes.flat[0].set_ylabel(name)
    scored = max((r["train_rows_scored"] for r in result["runs"]), default=0)
    fig.suptitle(f"{result['name']}: {name} per epoch, the epoch selected on valid"
                 + (f" (train: {scored:,} of its rows)" if scored else ""), fontsize=10)
    axes.flat[0].legend(fontsize=7)
    return _save(fig, out / f"{metric}_vs_epoch.png")


def _shown(path: str | Path) -> str:
    """A path inside the source tree relative to its root, others whole."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _scores(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("auc", "logloss", "rows")}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _pm(row: dict[str, Any], key: str) -> str:
    sd = row.get(f"{key}_sd")
    return _f(row[key]) + (f" +- {sd:.4f}" if sd is not None else "")


def main(argv: list[str] | None = None) -> int:
    from wdl.cli import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ablation", help="ablation YAML file, or its name in benchmarks/suites/")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/<machine>/<name>-<date>)")
    p.add_argument("--data", default=None, help="data set folder in place of the file's (nothing is generated)")
    p.add_argument("--threads", type=int, default=None, help="train.threads of every run (default: the file's "
                   "`threads`, else 1)")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these variants")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)
    # --only takes every word after it; a key=value among them is an override (names hold no "=").
    a.overrides += [o for o in a.only if "=" in o]
    a.only = [o for o in a.only if "=" not in o]

    def go(a: argparse.Namespace) -> int:
        from benchmarks.machine import machine_kind

        suite = load_suite(a.ablation, a.overrides)
        if a.out:
            out = Path(a.out)
        else:
            import torch

            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            kind = machine_kind(gpus, len(os.sched_getaffinity(0)))
            name = suite["name"] if suite["name"].startswith("quality") else f"quality-{suite['name']}"
            out = ROOT / "benchmarks" / "results" / kind / f"{name}-{dt.date.today().isoformat()}"
        command = " ".join(["python -m benchmarks.scripts.quality", *argv])
        threads = a.threads if a.threads is not None else suite.get("threads") or 1
        run_quality(suite, out.resolve(), data=a.data, threads=threads, only=a.only, command=command)
        print((out / "report.md").read_text())
        print(f"quality: results in {out}")
        return 0

    return run_guarded(go, a)


if __name__ == "__main__":
    raise SystemExit(main())
