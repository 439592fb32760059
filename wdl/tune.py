"""`wdl tune`: a hyper-parameter search that selects on validation only, and scores test once.

    wdl tune --config configs/movielens-100k.yaml --space configs/tune/movielens-100k.yaml --trials 9

The space file maps config keys to what to draw for them:

    optim.deep.lr: {log_uniform: [0.005, 0.1]}   # exp(uniform(log lo, log hi))
    optim.wide.beta: {uniform: [0.0001, 0.01]}
    model.deep.hidden: [[64, 32], [256, 128, 64]] # a list: one of its values
    features.crosses.user_genres.hash_buckets: {int: [10000, 100000]}

Each trial is `--trials` random points of that space (seeded by --seed, default run.seed), each a
list of `key=value` overrides over the config (a point the config refuses is reported and another
is drawn). Successive halving then spends the epochs: every trial trains --min-epochs, the best
1/eta of them by best validation AUC go on to eta times as many epochs (continuing from their
own checkpoint: a resumed run with a larger train.epochs is the same run as one trained that long
from the start), and so on, until one trial is left or a rung reaches --max-epochs (default
train.epochs). Optuna's SuccessiveHalvingPruner does the same, for those who prefer a library.

Selection reads the validation split only: data.valid_split or data.valid_fraction of the config
(data.valid_fraction=0.1 when it has neither, said so). Trials run with data.eval_split set to the
train split and never score it at the end, so the test split is not even opened until the winner
is chosen. The winner is written as a complete config, `best.yaml` (the config file with its
overrides applied, and a header saying how it was chosen); it is then trained once from scratch
with `wdl train`'s own code (its full train.epochs, the epoch chosen on validation), and that run
scores the test split once. `trials.jsonl` and `report.md` beside it hold every trial.

One process; the trials share it one after another (run folders under --out/trials, their console
output under --out/logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from wdl.config import Config, apply_overrides, key_type, load_config
from wdl.errors import ConfigError, TrainingError, WdlError, first_line

KINDS = ("log_uniform", "uniform", "int")
# Keys the search sets itself (run folders, budgets, the splits): one validation set and one
# seed for every trial, or their AUCs would not compare.
RESERVED = ("run.name", "run.out_dir", "run.seed", "data.path", "data.train_split", "data.eval_split",
            "data.valid_split", "data.valid_fraction", "train.epochs", "train.eval_only", "train.init_from",
            "checkpoint.resume", "checkpoint.dir")


# ----------------------------------------------------------------------------- the space file
@dataclass
class Spec:
    kind: str  # choice | log_uniform | uniform | int
    values: list[Any]  # choice: the values; else [lo, hi]

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.values)
        lo, hi = self.values
        if self.kind == "int":
            return rng.randint(lo, hi)
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if self.kind == "log_uniform" else rng.uniform(lo, hi)
        return float(f"{x:.4g}")  # readable overrides; 4 digits are finer than any search resolves


def load_space(path: str | Path) -> dict[str, Spec]:
    """The space file's `config key -> Spec`, in file order; a ConfigError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"space file {path}: invalid YAML ({first_line(e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space file {path}: expected a mapping of config keys to values or ranges")
    return {str(k): _spec(path, str(k), v) for k, v in raw.items()}


def _spec(path: Path, key: str, v: Any) -> Spec:
    where = f"space file {path}: {key}"
    if key_type(key) is None:
        raise ConfigError(f"{where}: not a config key (see `wdl config show`)")
    if any(key == r or r.startswith(key + ".") for r in RESERVED):
        raise ConfigError(f"{where}: set by the search itself ({', '.join(RESERVED)} are)")
    if isinstance(v, list):
        if not v:
            raise ConfigError(f"{where}: an empty list of values")
        return Spec("choice", v)
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in KINDS:
        kind, bounds = next(iter(v.items()))
        numbers = isinstance(bounds, list) and len(bounds) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
        if not numbers or not bounds[0] <= bounds[1]:
            raise ConfigError(f"{where}: {kind} takes [lo, hi], two numbers with lo <= hi; got {bounds!r}")
        if kind == "int" and not all(isinstance(b, int) for b in bounds):
            raise ConfigError(f"{where}: int takes two integers; got {bounds!r}")
        if kind == "log_uniform" and bounds[0] <= 0:
            raise ConfigError(f"{where}: log_uniform takes bounds > 0; got {bounds!r}")
        return Spec(kind, list(bounds))
    raise ConfigError(f"{where}: {v!r} is neither a list of values nor one of "
                      f"{', '.join('{' + k + ': [lo, hi]}' for k in KINDS)}")


def override(key: str, value: Any) -> str:
    """`key=value` as the config's overrides read it (value as YAML; JSON is YAML)."""
    if isinstance(value, str) and yaml.safe_load(value) == value and "=" not in value:
        return f"{key}={value}"
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a number
        return f"{key}={mantissa}{'.0' * ('.' not in mantissa and bool(e))}{e}{exponent}"
    return f"{key}={json.dumps(value)}"


def draw_points(space: dict[str, Spec], n: int, seed: int,
                check: Callable[[list[str]], Any]) -> tuple[list[list[str]], list[tuple[list[str], str]]]:
    """Up to `n` distinct points (override lists) that `check` accepts, and those it refused with
    its reason. A space with fewer distinct points than `n` gives fewer."""
    rng = random.Random(seed)
    points: list[list[str]] = []
    refused: list[tuple[list[str], str]] = []
    seen: set[tuple[str, ...]] = set()
    for _ in range(20 * n):  # bounded: a small discrete space runs out of new points
        if len(points) == n:
            break
        point = [override(k, s.draw(rng)) for k, s in space.items()]
        if tuple(point) in seen:
            continue
        seen.add(tuple(point))
        try:
            check(point)
        except ConfigError as e:
            refused.append((point, str(e)))
            continue
        points.append(point)
    return points, refused


# -------------------------------------------------------------------------- successive halving
@dataclass
class Trial:
    id: str
    overrides: list[str]
    rung: int = -1  # the last rung it trained in
    epochs: int = 0  # epochs trained so far
    valid_auc: float | None = None  # its best validation AUC so far (None: failed)
    best_epoch: int | None = None
    seconds: float = 0.0
    error: str = ""


def rung_budgets(min_epochs: int, max_epochs: int, eta: int) -> list[int]:
    """Epochs of each rung: min_epochs * eta^i below max_epochs, then max_epochs."""
    budgets, e = [], min_epochs
    while e < max_epochs:
        budgets.append(e)
        e *= eta
    return budgets + [max_epochs]


def successive_halving(trials: list[Trial], budgets: list[int], eta: int,
                       train: Callable[[Trial, int, int], None],
                       promoted: Callable[[int, list[Trial]], None] = lambda rung, kept: None) -> Trial:
    """The winner. `train(trial, rung, epochs)` trains a trial to `epochs` in all and sets its
    valid_auc (None when it failed); the best len(rung) // eta of a rung (at least one) go on, and
    the search ends when one is left or at the last rung. Ties go to the earlier trial."""
    alive = list(trials)
    for rung, epochs in enumerate(budgets):
        for t in alive:
            train(t, rung, epochs)
        ranked = sorted((t for t in alive if t.valid_auc is not None), key=lambda t: -t.valid_auc)
        if not ranked:
            raise TrainingError(f"every trial of rung {rung} failed ({alive[0].id}: {alive[0].error}); "
                                "see their logs under the search's logs/ folder")
        keep = max(1, len(alive) // eta)
        if keep == 1 or rung == len(budgets) - 1:
            return ranked[0]
        alive = ranked[:keep]
        promoted(rung, alive)
    raise AssertionError("unreachable: the last rung returns")


# ------------------------------------------------------------------------------- the search
@dataclass
class Search:
    config: Path
    space: dict[str, Spec]
    out: Path
    base: list[str]  # overrides of every trial and of best.yaml: the user's, and a validation split if added
    budgets: list[int]
    eta: int
    command: str
    train_split: str = "train"
    env: Any = None  # the process's DistEnv, made on first use
    log: Any = print

    def trial_config(self, t: Trial, epochs: int) -> Config:
        """The trial's config for `epochs` in all: its own run folder, continued when it has trained."""
        folder = self.out / "trials" / t.id
        return load_config(self.config, self.base + t.overrides + [
            f"run.out_dir={json.dumps(str(folder.parent))}", f"run.name={t.id}", f"train.epochs={epochs}",
            # The trainer opens its eval split (a trial never scores it, see run()): the train
            # split's rows, so the test split is not read at all.
            f"data.eval_split={json.dumps(self.train_split)}",
            "train.progress=false", "checkpoint.keep=1", "checkpoint.at_epoch_end=true",
        ] + ([f"checkpoint.resume={json.dumps(str(folder))}"] if t.epochs else []))

    def train(self, t: Trial, rung: int, epochs: int) -> None:
        start = time.perf_counter()
        t.rung = rung
        try:
            summary = self.run(self.trial_config(t, epochs), self.out / "logs" / f"{t.id}.log", trial=True)
            auc = summary.get("best_auc")
            t.valid_auc = auc if isinstance(auc, float) and math.isfinite(auc) else None
            t.best_epoch, t.epochs = summary.get("best_epoch"), summary.get("epochs") or epochs
            t.error = "" if t.valid_auc is not None else "no finite validation AUC"
        except WdlError as e:  # e.g. a drawn learning rate that diverges: this trial loses, the search goes on
            t.valid_auc, t.error = None, first_line(e)
        t.seconds += time.perf_counter() - start
        record = {"id": t.id, "rung": rung, "epochs": t.epochs, "valid_auc": t.valid_auc, "best_epoch": t.best_epoch,
                  "seconds": round(t.seconds, 2), "overrides": t.overrides, **({"error": t.error} if t.error else {})}
        with (self.out / "trials.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        score = f"valid AUC {t.valid_auc:.4f} (epoch {t.best_epoch})" if t.valid_auc is not None else f"failed: {t.error}"
        self.log(f"{t.id} rung {rung} ({t.epochs} epoch{'s' * (t.epochs != 1)}, {time.perf_counter() - start:.1f} s): "
                 f"{score}  {' '.join(t.overrides)}")

    def run(self, cfg: Config, log_path: Path, trial: bool) -> dict[str, Any]:
        """Train `cfg` in this process, its console output into `log_path`; its summary."""
        from wdl.distributed.env import init_distributed
        from wdl.train.trainer import Trainer

        class TrialTrainer(Trainer):
            def score_selected(self) -> None:  # a trial reads validation only; its eval split is never scored
                return None

        if self.env is None:
            self.env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            trainer = (TrialTrainer if trial else Trainer)(cfg, self.env)
            try:
                summary = trainer.train()
            finally:
                trainer.close()
            if not trial and cfg.train.refit:  # as `wdl train` does (wdl/train/refit.py)
                from wdl.train.refit import refit

                summary["refit"] = refit(cfg, self.env, trainer.run_dir, summary)
            return summary

    def write_best(self, winner: Trial, trials: list[Trial]) -> Path:
        """best.yaml: the config file with the base and the winner's overrides applied, and a header."""
        path, resolved = self.out / "best.yaml", load_config(self.config, self.base + winner.overrides)
        raw = apply_overrides(yaml.safe_load(self.config.read_text()) or {}, self.base + winner.overrides)
        text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=110)
        path.write_text(text)
        try:
            same = load_config(path).to_dict() == resolved.to_dict()
        except ConfigError:
            same = False
        if not same:  # a value YAML does not write back as it was read: the resolved tree
            text = yaml.safe_dump(resolved.to_dict(), sort_keys=False, default_flow_style=None, width=110)
        ranked = _ranked(trials)
        head = [f"Launch: wdl train --config {path}",
                f"The winner of: {self.command}",
                f"{len(trials)} trials, successive halving over {', '.join(map(str, self.budgets))} epochs "
                f"(eta {self.eta}), selected on the best validation AUC; the test split was not read",
                f"Winner {winner.id}: valid AUC {winner.valid_auc:.4f} at epoch {winner.best_epoch} of "
                f"{winner.epochs} (rung {winner.rung}); {' '.join(winner.overrides)}",
                "Trials (rung reached, best valid AUC):"]
        head += [f"  {t.id} rung {t.rung} {_fmt(t.valid_auc)}  {' '.join(t.overrides)}" for t in ranked[:10]]
        head += [f"  ... {len(ranked) - 10} more in report.md"] * (len(ranked) > 10)
        path.write_text("".join(f"# {line}\n" for line in head) + text)
        return path

    def write_report(self, trials: list[Trial], refused: list[tuple[list[str], str]], winner: Trial,
                     final: dict[str, Any] | None) -> Path:
        lines = ["# Hyper-parameter search", "", f"`{self.command}`", "",
                 f"Successive halving over {', '.join(map(str, self.budgets))} epochs (eta {self.eta}); every "
                 "trial selected on the validation split (its best validation AUC); the test split scored once, "
                 "by the winner's final run.", "",
                 "| trial | rung | epochs | best valid AUC | at epoch | seconds | overrides |",
                 "|---|---|---|---|---|---|---|"]
        for t in _ranked(trials):
            note = f" (failed: {t.error})" if t.error else ""
            lines.append(f"| {t.id}{' **winner**' * (t is winner)} | {t.rung} | {t.epochs} | {_fmt(t.valid_auc)}"
                         f"{note} | {t.best_epoch or '-'} | {t.seconds:.1f} | `{' '.join(t.overrides)}` |")
        if refused:
            lines += ["", "Points the config refused (not trained):", ""]
            lines += [f"- `{' '.join(p)}`: {why}" for p, why in refused]
        lines += ["", f"Winner: {winner.id}, written to `best.yaml`."]
        if final is not None:
            test = final.get("test") or {}
            lines += ["", f"Trained again from `best.yaml` ({final['run']}): best valid AUC {_fmt(final.get('best_auc'))}"
                      f" at epoch {final.get('best_epoch')}; {final.get('test_split')} AUC of that model "
                      f"{_fmt(test.get('auc'))}, logloss {_fmt(test.get('logloss'))} (scored once)."]
            if final.get("refit"):
                lines += ["", f"Refit (train.refit) on every train row for {final['refit']['epochs']} epochs: test AUC "
                          f"{_fmt((final['refit'].get('test') or {}).get('auc'))} (scored once), in `{final['run']}/refit`."]
        path = self.out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _ranked(trials: list[Trial]) -> list[Trial]:
    """Furthest rung first, then best validation AUC (failed ones last)."""
    return sorted(trials, key=lambda t: (-t.rung, -(t.valid_auc if t.valid_auc is not None else -1.0)))


def _fmt(x: Any) -> str:
    """A metric with 4 decimals, or '-' for none."""
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# ---------------------------------------------------------------------------------- the command
def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file to tune (see configs/)")
    p.add_argument("--space", required=True,
                   help="YAML file: config key -> list of values, or {log_uniform|uniform|int: [lo, hi]}")
    p.add_argument("--trials", type=int, default=9, help="random points of the space to try (default 9)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="a new folder for the search (default: <run.out_dir>/<run.name>-tune, or -tune-1, ...)")
    p.add_argument("--seed", type=int, default=None, help="seeds the drawing of the points (default: run.seed)")
    p.add_argument("--min-epochs", type=int, default=1, help="epochs of the first rung (default 1)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs of the last rung (default: train.epochs); the winner is trained with train.epochs")
    p.add_argument("--eta", type=int, default=3, help="the best 1/eta of a rung go on to eta times its epochs (default 3)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="overrides of every trial and of the written config, e.g. train.threads=1")


def tune_main(args: argparse.Namespace) -> int:
    run_search(*prepare(args))
    return 0


def prepare(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[Search, list[list[str]], list]:
    """Check the arguments, the config and the space; draw the points; make the search folder."""
    for flag, n, least in (("--trials", args.trials, 1), ("--min-epochs", args.min_epochs, 1), ("--eta", args.eta, 2)):
        if n < least:
            raise ConfigError(f"{flag} {n}: must be at least {least}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("wdl tune runs its trials in one process, one after another; run it without torchrun")
    config, base = Path(args.config), list(args.overrides)
    cfg = load_config(config, base)
    space = load_space(args.space)
    if not (cfg.data.valid_split or cfg.data.valid_fraction > 0):
        base.append("data.valid_fraction=0.1")
        log("wdl tune: the config holds out no validation split; selecting on data.valid_fraction=0.1 of the train split")
    max_epochs = cfg.train.epochs if args.max_epochs is None else args.max_epochs
    if max_epochs < args.min_epochs:
        raise ConfigError(f"--max-epochs {max_epochs}: must be at least --min-epochs {args.min_epochs}")
    seed = cfg.run.seed if args.seed is None else args.seed
    points, refused = draw_points(space, args.trials, seed, lambda p: load_config(config, base + p))
    if not points:
        raise ConfigError(f"the config refuses every point drawn from {args.space}; the first: {refused[0][1]}")
    if len(points) < args.trials:
        log(f"wdl tune: the space holds {len(points)} distinct points the config accepts; trying those")
    out = _search_folder(args.out, cfg)
    command = (f"wdl tune --config {config} --space {args.space} --trials {args.trials} --seed {seed} "
               f"--min-epochs {args.min_epochs} --max-epochs {max_epochs} --eta {args.eta} --out {out}"
               + "".join(f" {o}" for o in args.overrides))
    budgets = rung_budgets(args.min_epochs, max_epochs, args.eta)
    return Search(config, space, out, base, budgets, args.eta, command, cfg.data.train_split, log=log), points, refused


def _search_folder(out: str | None, cfg: Config) -> Path:
    """A new (or empty) folder: an earlier search's files are never mixed with this one's."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"--out {path}: not an empty folder; give a new one")
    else:
        base = Path(cfg.run.out_dir) / f"{cfg.run.name}-tune"
        path, i = base, 0
        while path.exists() and (not path.is_dir() or any(path.iterdir())):
            i += 1
            path = base.with_name(f"{base.name}-{i}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def search(s: Search, points: list[list[str]], refused: list[tuple[list[str], str]]) -> tuple[Trial, list[Trial]]:
    """Train the trials by successive halving; write best.yaml and report.md. The winner, every trial."""
    from wdl.ingest.prepare import open_or_prepare

    open_or_prepare(load_config(s.config, s.base).data)  # a data set prepared on first use, in view
    for point, why in refused:
        s.log(f"refused: {' '.join(point)}: {why}")
        with (s.out / "trials.jsonl").open("a") as f:
            f.write(json.dumps({"id": None, "overrides": point, "refused": why}) + "\n")
    s.log(f"wdl tune: {len(points)} trials over {', '.join(s.space)}; successive halving over "
          f"{', '.join(map(str, s.budgets))} epochs (eta {s.eta}); selected on validation; search in {s.out}")
    trials = [Trial(f"t{i:02d}", p) for i, p in enumerate(points)]
    winner = successive_halving(
        trials, s.budgets, s.eta, s.train,
        lambda rung, kept: s.log(f"rung {rung}: {', '.join(t.id for t in kept)} go on to {s.budgets[rung + 1]} epochs"))
    s.write_best(winner, trials)
    s.write_report(trials, refused, winner, None)
    s.log(f"winner {winner.id}: valid AUC {winner.valid_auc:.4f} ({winner.epochs} epoch{'s' * (winner.epochs != 1)}): {' '.join(winner.overrides)}; "
          f"config in {s.out / 'best.yaml'}")
    return winner, trials


def final_run(s: Search, winner: Trial, trials: list[Trial], refused: list) -> dict[str, Any]:
    """Train best.yaml from scratch (its train.epochs, selected on validation); that run scores
    the test split once. Its summary, with `run`: the run folder."""
    cfg = load_config(s.out / "best.yaml", [f"run.out_dir={json.dumps(str(s.out))}", "run.name=final",
                                             "train.progress=false"])
    s.log(f"training the winner from best.yaml ({cfg.train.epochs} epochs) in {s.out / 'final'}")
    summary = s.run(cfg, s.out / "logs" / "final.log", trial=False)
    summary["run"] = str(s.out / "final")
    s.write_report(trials, refused, winner, summary)
    test = summary.get("test") or {}
    refitted = summary.get("refit") or {}
    s.log(f"final: best valid AUC {_fmt(summary.get('best_auc'))} at epoch {summary.get('best_epoch')}; "
          f"{summary.get('test_split')} AUC of that model {_fmt(test.get('auc'))} (scored once)"
          + (f"; refit on every train row: {_fmt((refitted.get('test') or {}).get('auc'))}" if refitted else "")
          + f"; report in {s.out / 'report.md'}")
    return summary


def run_search(s: Search, points: list[list[str]], refused: list) -> dict[str, Any]:
    """The whole command: the search, best.yaml, the final run. Library warnings go to run.log files."""
    from wdl.distributed.env import close_distributed
    from wdl.train import run_log

    run_log.capture()
    try:
        winner, trials = search(s, points, refused)
        return final_run(s, winner, trials, refused)
    finally:
        run_log.release()
        close_distributed()
