"""`kind: tune`: a small hyper-parameter search whose result is one honest test number.

    systems:
      - name: tune
        kind: tune
        valid_fraction: 0.1          # share of the train split held out to select on (else the suite's when
                                     # above 0, else 0.1); it replaces the config's own split, never adds to it
        search: grid                 # grid | random
        trials: 8                    # random: this many distinct points of the grid (seeded by `seed`)
        space:                       # config key -> values (any YAML value)
          model.deep.interaction: [none, fm]
          optim.deep.lr: [0.02, 0.05]
        candidates:                  # and/or named override lists, each tried at every point of the grid
          wide-deep: []              #   (`only`: run just these names or name prefixes)
          fm-user-movie: [model.deep.interaction=fm, "model.deep.interaction_pairs=[[user_id, movie_id]]"]
        overrides: [...]             # applied to every trial (and the final run)
        seeds: [2021, 1, 2]          # each trial runs with each; its score is the mean (default: run.seed)
        final_seeds: [2021]          # the chosen config is trained afresh with each (default: run.seed)

A grid point the config refuses (one-line ConfigError) is skipped and listed with the reason.
Every trial trains `epochs` epochs with `data.valid_fraction` set (and `data.valid_split`
cleared, so a config that holds out a split of its own does not hold out a second one): the
trainer carves that share of the train split (seeded by run.seed) and scores it after every
epoch. A trial's score is its best validation AUC (the epoch a validation-selected run would
keep; the mean over `seeds`); the test split plays no part in choosing (the trainer scores it
once at the end of each run, and this driver never reads that number for a trial). The best
trial's overrides are then trained again, from scratch, with each of `final_seeds`; those runs'
test AUCs (at their validation-selected epochs) are the suite's result.

Records: one `tune_trial` per trial (valid_auc, best_epoch, last_valid_auc, overrides) and one
`tune` per final run, whose `auc` / `logloss` are the test split's, so the summary tables read
like any other system's.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from benchmarks import runners
from benchmarks.results import fmt
from benchmarks.runners import BenchError, say
from benchmarks.suite import SuiteRun, protocol_overrides, valid_fraction
from wdl.config import load_config
from wdl.errors import ConfigError


def _value(v: Any) -> str:
    """A YAML value for a `key=value` override (JSON is YAML; strings stay bare when safe)."""
    if isinstance(v, str) and v and all(c.isalnum() or c in "_-./" for c in v):
        return v
    return json.dumps(v, separators=(", ", ": "))


def trials(system: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every trial, in the order they run: each named candidate (filtered by
    `only`: names or name prefixes) at each point of the grid (or random sample) over `space`."""
    if not system.get("space") and not system.get("candidates"):
        raise BenchError(f"tune system {system['name']!r}: give `space` (a grid or random search over config "
                         "keys) and/or `candidates` (named override lists)")
    only = system.get("only") or []
    cands = [(name, list(ov or [])) for name, ov in (system.get("candidates") or {}).items()
             if not only or any(name == o or name.startswith(f"{o}-") for o in only)]
    if system.get("candidates") and not cands:
        raise BenchError(f"tune system {system['name']!r}: no candidate matches only={only}")
    return [(",".join(n for n in (cn, pn) if n), [*cov, *pov])
            for cn, cov in (cands or [("", [])]) for pn, pov in _grid(system)]


def _grid(system: dict[str, Any]) -> list[tuple[str, list[str]]]:
    space: dict[str, list] = system.get("space") or {}
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise BenchError(f"tune system {system['name']!r}: space.{key} must be a non-empty list of values")
    if not space:
        return [("", [])]
    grid = list(itertools.product(*space.values()))
    search = system.get("search", "grid")
    if search == "random":
        n = min(int(system.get("trials", 8)), len(grid))
        grid = random.Random(int(system.get("seed", 0))).sample(grid, n)
    elif search != "grid":
        raise BenchError(f"tune system {system['name']!r}: search must be grid or random, got {search!r}")
    short = {k: k.rsplit(".", 1)[-1] for k in space}
    if len(set(short.values())) < len(short):  # two keys ending alike (optim.wide.lr, optim.deep.lr)
        short = {k: k for k in space}
    return [(",".join(f"{short[k]}={_value(v)}" for k, v in zip(space, point)),
             [f"{k}={_value(v)}" for k, v in zip(space, point)]) for point in grid]


def tune_system(run: SuiteRun, system: dict) -> list[dict[str, Any]]:
    """Search on validation, then train the chosen config with each final seed; see module docstring."""
    config, overrides = run.config(system)
    out, threads = run.out, run.threads
    # The system's own share, else the suite's (a suite-wide 0, every train row for the other
    # systems, does not apply: a tune system always selects on validation), else 0.1.
    fraction = valid_fraction({}, system) or valid_fraction(run.suite, {}) or 0.1
    if not 0 < fraction < 1:
        raise BenchError(f"tune system {system['name']!r}: valid_fraction must be in (0, 1), got {fraction}")
    common = [*overrides, f"train.epochs={run.epochs(system)}", *protocol_overrides(run.suite, system, fraction),
              "checkpoint.at_epoch_end=false"]  # only the best epoch's checkpoint, which the run needs
    label = system["name"]
    seeds = system.get("seeds") or [None]  # None: the config's run.seed
    recs, scored = [], []
    plan = trials(system)
    for i, (name, trial) in enumerate(plan):
        try:  # a grid may hold combinations the config refuses (e.g. pairs without an interaction)
            load_config(config, [*common, *trial])
        except ConfigError as e:
            say(f"{label} trial {i + 1}/{len(plan)}: {name}: skipped, {e}")
            run.skipped.append({"system": f"{label}: {name}", "reason": str(e)})
            continue
        say(f"{label} trial {i + 1}/{len(plan)}: {name}")
        best, last, epochs_run, seconds = [], [], [], []
        for j, seed in enumerate(seeds):
            run_name = f"{_safe(label)}-trial-{i:02d}" + (f"-s{j}" if len(seeds) > 1 else "")
            seed_over = [f"run.seed={int(seed)}"] if seed is not None else []
            seen = runners.run_wdl(config=config, overrides=[*common, *trial, *seed_over], out=out / "runs",
                                   name=run_name, log=out / "logs" / f"{run_name}.log", threads=threads)
            if any(r["protocol"] != "validation" for r in seen):
                raise BenchError(f"{run_name}: its epochs were not scored on a validation split; selecting on them "
                                 "would select on the test split")
            top = max(seen, key=lambda r: r["auc"])
            best.append(top)
            last.append(seen[-1]["auc"])
            epochs_run.append(len(seen))
            seconds += [r["train_seconds"] for r in seen]
        rec = {"system": f"{label}: {name}", "group": label, "kind": "tune_trial", "rep": 0, "warmup": False,
               "trial": name, "overrides": trial, "seeds": seeds,
               "valid_auc": sum(b["auc"] for b in best) / len(best),  # mean over seeds: what selects
               "valid_auc_per_seed": [b["auc"] for b in best], "best_epoch": "/".join(str(b["epoch"]) for b in best),
               "last_valid_auc": sum(last) / len(last), "epochs": epochs_run, "train_rows": seen[0].get("train_rows"),
               "train_seconds_median": sorted(seconds)[len(seconds) // 2]}
        recs.append(rec)
        scored.append(rec)
        say(f"{label} trial {name}: valid AUC {rec['valid_auc']:.4f} at epoch {rec['best_epoch']}")
    if not scored:
        raise BenchError(f"tune system {label!r}: every trial was refused by the config (see above)")
    chosen = max(scored, key=lambda r: r["valid_auc"])
    say(f"{label}: chose {chosen['trial']} (valid AUC {chosen['valid_auc']:.4f}); training it afresh")
    final_seeds = system.get("final_seeds") or [None]
    for rep, seed in enumerate(final_seeds):
        run_name = f"{_safe(label)}-final-{rep}"
        seed_over = [f"run.seed={int(seed)}"] if seed is not None else []
        epochs_seen = runners.run_wdl(config=config, overrides=[*common, *chosen["overrides"], *seed_over],
                                      out=out / "runs", name=run_name, log=out / "logs" / f"{run_name}.log",
                                      threads=threads)
        summary = json.loads((out / "runs" / run_name / "summary.json").read_text())
        test = summary.get("test")
        if not test:
            raise BenchError(f"{run_name}: no test score in summary.json (the trainer scores the validation-selected "
                             "epoch's model on the test split once, at the end)")
        recs.append({"system": f"{label} (chosen: {chosen['trial']})", "group": label, "kind": "tune", "rep": rep,
                     "warmup": False, "trial": chosen["trial"], "overrides": chosen["overrides"], "seed": seed,
                     "epoch": test["epoch"], "auc": test["auc"], "logloss": test["logloss"],
                     "valid_auc": summary.get("best_auc"), "test_split": summary.get("test_split"),
                     "train_seconds": sorted(r["train_seconds"] for r in epochs_seen)[len(epochs_seen) // 2],
                     "train_rows": epochs_seen[0].get("train_rows"),
                     "peak_rss_mb": summary.get("peak_rss_mb")})
        say(f"{label} final run {rep + 1}/{len(final_seeds)}: test AUC {test['auc']:.4f} at the validation-selected "
            f"epoch {test['epoch']}")
    return recs


def report(result: dict) -> list[str]:
    """report.md section: every trial by validation AUC, then the chosen config's test AUC."""
    ms = result["measurements"]
    trial_recs = sorted((m for m in ms if m.get("kind") == "tune_trial"), key=lambda m: -m["valid_auc"])
    finals = [m for m in ms if m.get("kind") == "tune"]
    if not trial_recs:
        return []
    out = ["## Tuning (selected on validation; test scored once per final run)", "",
           "| trial | best valid AUC | epoch | valid AUC at last epoch |", "|---|---:|---:|---:|"]
    out += [f"| {m['trial']} | {m['valid_auc']:.4f} | {m['best_epoch']} | {m['last_valid_auc']:.4f} |"
            for m in trial_recs]
    out += ["", "| chosen | seed | valid AUC | test AUC (validation-selected epoch) | epoch |", "|---|---|---:|---:|---:|"]
    out += [f"| {m['trial']} | {m['seed'] if m['seed'] is not None else 'config'} | {fmt(m['valid_auc'])} "
            f"| {fmt(m['auc'])} | {m['epoch']} |" for m in finals]
    return out + [""]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
