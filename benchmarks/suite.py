"""Suites: YAML files in benchmarks/suites, each reproducible from its name.

A suite names its data, the systems to run and how: epochs, warm-up epochs (timed but
excluded from the timing summaries), repetitions, world sizes, batch sizes. Command-line
`key=value` items change the suite (`epochs=2`, `repetitions=3`); items whose first part is a
config section (`train.`, `data.`, `model.`, `optim.`, `run.`, `features.`) are passed on to
every run of our trainer instead.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from wdl.errors import ConfigError

SUITES = Path(__file__).resolve().parent / "suites"
CONFIG_SECTIONS = ("train", "data", "model", "optim", "run", "features")
DEFAULTS = {"repetitions": 1, "warmup_epochs": 1, "epochs": 1, "threads": None, "systems": []}
KINDS = ("wdl", "sklearn_lr", "peer", "reference", "throughput", "planted", "mlp_floor", "tune")


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
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    suite["overrides"] = list(overrides)
    for i, s in enumerate(suite["systems"]):
        if s.get("kind") not in KINDS:
            raise ConfigError(f"{path}: systems[{i}].kind must be one of {', '.join(KINDS)}, got {s.get('kind')!r}")
        s.setdefault("name", s["kind"])
    return suite
