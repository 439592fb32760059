"""Suites: YAML files in benchmarks/suites, each reproducible from its name.

A suite names its data, the systems to run and how: epochs, warm-up epochs (timed but
excluded from the timing summaries), repetitions, world sizes, batch sizes. Command-line
`key=value` items change the suite (`epochs=2`, `repetitions=3`); items whose first part is a
config section (`train.`, `data.`, `model.`, `optim.`, `run.`, `features.`, `checkpoint.`,
`distributed.`) are passed on to every run of our trainer instead.

Which protocol a run of our trainer followed is read from the run itself (runners.run_wdl: its
records' `eval_split`, its summary.json `test`), whatever set it: the config (configs/movielens-100k.yaml
holds out `data.valid_fraction: 0.1`), an override, or the suite. The suite decides only when it says so:
`valid_fraction: F` (on the suite or on one system) passes `data.valid_fraction=F` (hold out that share
of the train rows, score every epoch on it and the test split once, with the selected epoch's model);
`valid_fraction: 0` passes `data.valid_fraction=0` (every train row trains, every epoch is scored on
the test split), for suites whose timings must cover the same rows as their stored results or their
peers. Either clears a `data.valid_split` the config names (`data.valid_split=`). Unset, the config
decides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.machine import ROOT
from wdl.config import load_config
from wdl.errors import ConfigError

SUITES = Path(__file__).resolve().parent / "suites"
CONFIG_SECTIONS = ("train", "data", "model", "optim", "run", "features", "checkpoint", "distributed")
DEFAULTS = {"repetitions": 1, "warmup_epochs": 1, "epochs": 1, "threads": None, "valid_fraction": None, "systems": []}
KINDS = ("wdl", "sklearn_lr", "peer", "reference", "throughput", "planted", "mlp_floor", "tune")
# Kinds whose runs are our trainer's and can hold out a validation split (`tune` always does);
# peers and scikit-learn train on the whole train split, so ours beside them must too, unless a
# system of ours asks for the split itself (knowingly). Other kinds score nothing and ignore it.
VALIDATING_KINDS = ("wdl", "planted", "tune")
WHOLE_TRAIN_KINDS = ("sklearn_lr", "peer")


def list_suites() -> list[tuple[str, str]]:
    out = []
    for path in sorted(SUITES.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        desc = " ".join(str(raw.get("description") or "").split())
        out.append((path.stem, desc.split(": ")[0].split(". ")[0][:100]))
    return out


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = SUITES / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    known = ", ".join(n for n, _ in list_suites())
    raise ConfigError(f"no benchmark suite {name_or_path!r} (known: {known}; or give a path to a YAML file)")


def load_suite(name_or_path: str, overrides: list[str] = ()) -> dict[str, Any]:
    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    suite = {**copy.deepcopy(DEFAULTS), **raw}
    suite.setdefault("name", path.stem)
    suite["path"] = str(path)
    suite["trainer_overrides"] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key.split(".")[0] in CONFIG_SECTIONS:
            suite["trainer_overrides"].append(item)
            continue
        node, parts = suite, key.split(".")
        if parts[0] not in suite:  # a typo would otherwise run the whole suite unchanged
            known = ", ".join(sorted(k for k in suite if k not in ("path", "trainer_overrides")))
            raise ConfigError(f"{path.stem}: unknown suite key {parts[0]!r} in {item!r} (suite keys: {known}; "
                              f"trainer keys start with {', '.join(sorted(CONFIG_SECTIONS))})")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    suite["overrides"] = list(overrides)
    for i, s in enumerate(suite["systems"]):
        if s.get("kind") not in KINDS:
            raise ConfigError(f"{path}: systems[{i}].kind must be one of {', '.join(KINDS)}, got {s.get('kind')!r}")
        s.setdefault("name", s["kind"])
        _check_valid_fraction(path, suite, s)
    _check_same_train_rows(path, suite)
    return suite


def _check_valid_fraction(path: Path, suite: dict[str, Any], system: dict[str, Any]) -> None:
    name, kind = system["name"], system["kind"]
    if system.get("valid_fraction") is not None and kind not in VALIDATING_KINDS:
        raise ConfigError(f"{path}: system {name!r}: valid_fraction applies to our trainer's systems "
                          f"({', '.join(VALIDATING_KINDS)}), not to kind {kind}")
    if (valid_fraction(suite, {}) or 0) != 0 and kind in WHOLE_TRAIN_KINDS:
        raise ConfigError(f"{path}: valid_fraction for the whole suite would train ours on fewer rows than "
                          f"system {name!r} ({kind}, which trains on the whole train split); set "
                          "systems.N.valid_fraction on our systems instead, knowing that")
    fraction = valid_fraction(suite, system)
    if kind == "tune" and system.get("valid_fraction") is not None and not 0 < fraction < 1:
        raise ConfigError(f"{path}: valid_fraction of system {name!r} must be in (0, 1) (a tune system always "
                          f"selects on validation), got {fraction}")
    if kind in VALIDATING_KINDS and fraction is not None and not 0 <= fraction < 1:
        raise ConfigError(f"{path}: valid_fraction of system {name!r} must be in [0, 1) (0: every train row "
                          f"trains, every epoch is scored on test), got {fraction}")


def _check_same_train_rows(path: Path, suite: dict[str, Any]) -> None:
    """Beside a peer or scikit-learn (whole train split), ours must not hold out rows it was not
    asked to by its own `valid_fraction`: a config (or override) that holds them out is refused."""
    enabled = [s for s in suite["systems"] if s.get("enabled", True)]
    whole = next((s for s in enabled if s["kind"] in WHOLE_TRAIN_KINDS), None)
    if whole is None:
        return
    for s in enabled:
        knowingly = (valid_fraction({}, s) or 0) > 0  # the system's own setting holds rows out
        if s["kind"] not in ("wdl", "planted") or knowingly:
            continue
        try:
            data = load_config(*system_config(suite, s, protocol_overrides(suite, s))).data
        except ConfigError as e:
            raise ConfigError(f"{path}: system {s['name']!r}: {e}") from None
        if data.valid_fraction or data.valid_split:
            held = (f"data.valid_fraction={data.valid_fraction:g}" if data.valid_fraction
                    else f"data.valid_split={data.valid_split}")
            raise ConfigError(f"{path}: system {s['name']!r} would hold out a validation split ({held}, from its "
                              f"config or overrides) and train on fewer rows than {whole['name']!r} ({whole['kind']}, "
                              "which trains on the whole train split); set valid_fraction: 0 on the suite (every "
                              "train row for ours too) or systems.N.valid_fraction on ours, knowing that")


def valid_fraction(suite: dict[str, Any], system: dict[str, Any]) -> float | None:
    """What `system`'s `valid_fraction` (its own, else the suite's) asks of our trainer: a share of
    the train rows to hold out for validation, 0 for none (every epoch scored on the test split),
    or None: not set, the config decides."""
    f = system.get("valid_fraction", suite.get("valid_fraction"))
    if f is None:
        return None
    try:
        return float(f)
    except (TypeError, ValueError):
        whose = f"system {system['name']!r}" if "valid_fraction" in system else "the suite"
        raise ConfigError(f"valid_fraction of {whose} must be a number, got {f!r}") from None


def protocol_overrides(suite: dict[str, Any], system: dict[str, Any], fraction: float | None = None) -> list[str]:
    """The trainer overrides of what `valid_fraction` asks (`fraction` if given, else the system's
    or the suite's): none when unset; else `data.valid_fraction=F` (F = 0: every train row trains),
    and `data.valid_split=` when the config (with the system's and the command line's overrides)
    names a validation split, so that the suite's setting is the only split held out (never two);
    with F = 0 also `train.refit=false`."""
    fraction = valid_fraction(suite, system) if fraction is None else fraction
    if fraction is None:
        return []
    try:
        named = bool(load_config(*system_config(suite, system)).data.valid_split)
    except ConfigError:  # e.g. early stopping, valid only with the split asked for here: clearing costs nothing
        named = True
    # nothing held out, nothing to refit on (train.refit): the run already trains every row
    return [f"data.valid_fraction={fraction:g}", *(["data.valid_split="] if named else []),
            *(["train.refit=false"] if fraction == 0 else [])]


def abs_path(path: str | Path) -> Path:
    """Relative paths in suites are from the source tree's root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def system_config(suite: dict[str, Any], system: dict[str, Any], extra: list[str] = ()) -> tuple[str, list[str]]:
    """(config path, overrides) of one system: its own overrides, `extra`, then the command line's."""
    overrides = [*system.get("overrides", []), *extra, *suite["trainer_overrides"]]
    if suite.get("data", {}).get("path"):
        overrides.insert(0, f"data.path={abs_path(suite['data']['path'])}")
    return str(abs_path(system.get("config") or suite["config"])), overrides


@dataclass
class SuiteRun:
    """One run of a suite: its settings, its output folder, and what the systems leave beside
    their measurements (skipped systems with the reason, notes for the report)."""

    suite: dict[str, Any]
    out: Path
    install_peers: bool = False
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peer_features: Path | None = None  # the peers' exported features, made once per run

    @property
    def reps(self) -> int:
        return int(self.suite["repetitions"])

    @property
    def threads(self) -> int | None:
        """One intra-op thread count for every system, so that none wins by using more cores."""
        return int(self.suite["threads"]) if self.suite.get("threads") else None

    def epochs(self, system: dict[str, Any]) -> int:
        return int(system.get("epochs", self.suite["epochs"]))

    def config(self, system: dict[str, Any], extra: list[str] = ()) -> tuple[str, list[str]]:
        return system_config(self.suite, system, extra)

    def skip(self, name: str, reason: str) -> None:
        print(f"bench: skipping {name}: {reason}", flush=True)
        self.skipped.append({"system": name, "reason": reason})

    def mark(self, records: list[dict], system: dict[str, Any], label: str, rep: int, *,
             warmup_epochs: int | None = None, **extra) -> list[dict]:
        """Records of one repetition as measurements: which system, which repetition, and whether
        each epoch is warm-up (timed, but left out of the timing summaries): the system's
        `warmup_epochs`, else `warmup_epochs` given here, else the suite's."""
        default = self.suite["warmup_epochs"] if warmup_epochs is None else warmup_epochs
        warm = int(system.get("warmup_epochs", default))
        return [{"system": label, "group": system["name"], "kind": system["kind"], "rep": rep,
                 "warmup": bool(r.get("epoch") is not None and r["epoch"] <= warm), **extra, **r} for r in records]


def script_main(prog: str, doc: str, run: Any, argv: list[str] | None = None) -> int:
    """The command line of a suite with a runner of its own (scale, continual): `--suite`, `--out`
    and key=value overrides; `run(suite, out)` writes report.md into `out`, which is printed."""
    import argparse
    import datetime as dt

    from wdl.cli import run_guarded

    name = prog.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=name, help=f"suite name or YAML path (default {name})")
    p.add_argument("--out", default=None, help=f"result folder (default benchmarks/out/{name}-<date>)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)

    def go(a: argparse.Namespace) -> int:
        suite = load_suite(a.suite, a.overrides)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(a.out) if a.out else ROOT / "benchmarks" / "out" / f"{suite['name']}-{stamp}"
        run(suite, out.resolve())
        print((out / "report.md").read_text())
        return 0

    return run_guarded(go, a)
