"""What `wdl data import` reads: the label, each feature column's kind and vocabulary rule, and
the split. Given as YAML (`--spec columns.yaml`) or inferred from the input's schema and first
rows, and printed back as YAML so that an inferred spec can be saved, edited and reused. The
command's other options (ImportOptions) are checked here too, and the training config it prints
at the end is written here (`training_config`; what it does not read from the data is
TRAINING_DEFAULTS).

    label: clicked
    columns:
      user_id: {kind: categorical, min_frequency: 2}     # ids for values seen >= 2 times in train
      item_id: {kind: categorical, top_k: 100000}        # the 100,000 most frequent values
      tags:    {kind: multi_hot}                         # a list column (or a string + separator)
      price:   {kind: dense}
    split: {kind: random, seed: 2021, test_fraction: 0.2, valid_fraction: 0.1}
    # split: {kind: time, column: ts, valid_from: 2024-03-01, test_from: 2024-04-01}
    # split: {kind: files, files: {train: [raw/train/*.parquet], test: [raw/test/*.parquet]}}
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from wdl.errors import ConfigError
from wdl.ingest.options import seed_problem

KINDS = ("categorical", "multi_hot", "dense")
SPLITS = ("random", "time", "files")
SPLIT_NAMES = ("train", "valid", "test")
FORMATS = ("auto", "parquet", "csv")  # of the input files; auto: by file name
# Integer columns named like identifiers are categorical whatever their number of values.
_ID_NAME = re.compile(r"(^|_)(id|key|code)$|[a-z]Id$", re.IGNORECASE)


@dataclass
class ColumnSpec:
    kind: str = "categorical"
    min_frequency: int = 1  # categorical / multi_hot: values seen fewer times in train -> id 0
    top_k: int | None = None  # keep at most the k most frequent values
    separator: str | None = None  # multi_hot from a string column: "a|b|c" -> [a, b, c]
    # With --vocab-from: at most this many ids (0 included); new values past it take the ids of the
    # values unseen in train for the longest (recycled: a warm start resets their rows).
    max_rows: int | None = None


@dataclass
class SplitSpec:
    kind: str = "random"
    seed: int = 2021  # random: each row by a hash of (seed, file, row), whatever the workers
    test_fraction: float = 0.2
    valid_fraction: float = 0.0
    column: str | None = None  # time: rows with column < valid_from -> train, < test_from -> valid, else test
    valid_from: Any = None
    test_from: Any = None
    files: dict[str, list[str]] = field(default_factory=dict)  # files: split -> files, folders or globs


@dataclass
class ImportSpec:
    label: str
    columns: dict[str, ColumnSpec]
    split: SplitSpec = field(default_factory=SplitSpec)


@dataclass(frozen=True)
class ImportOptions:
    """What `wdl data import` reads and how it writes: its flags, one field each.

    The columns come from `spec`, or are inferred from the first file given `label` (with the
    `kinds` overrides and the vocabulary rule min_frequency / top_k for every column, integer
    columns with at most max_categories values categorical, strings split on `separator` where a
    kind says multi_hot); `split` replaces the spec's split.
    """

    spec: ImportSpec | None = None
    label: str | None = None
    split: SplitSpec | None = None
    kinds: dict[str, str] | None = None  # column -> kind, with inference only
    fmt: str = "auto"  # FORMATS: auto by file name
    workers: int = 1  # processes (fewer than 1 counts as 1)
    min_frequency: int = 1
    top_k: int | None = None
    max_categories: int = 1000
    separator: str = "|"
    null_values: tuple[str, ...] = ("",)  # CSV: the texts read as null (others, "NA" too, are values)
    buckets: int = 20  # dense columns: equal-frequency buckets whose inner edges are recorded
    sample_size: int = 65536  # dense values kept for the bucket edges
    overwrite: bool = False
    progress: bool = True
    row_group_rows: int = 16384
    rows_per_file: int = 1_000_000
    vocab_from: str | None = None  # an earlier data set whose ids are continued (wdl/ingest/vocab_from.py)
    log: Callable[[str], None] = print  # where an inferred spec is printed

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        for col, kind in (self.kinds or {}).items():
            if kind not in KINDS:
                raise ConfigError(f"--kind {f'{col}={kind}'!r}: expected COL=KIND with KIND one of {', '.join(KINDS)}")
        if self.spec is not None and self.kinds:
            raise ConfigError("--kind is for inferred columns; with --spec, give kinds in the spec")
        if isinstance(self.null_values, str) or not all(isinstance(v, str) for v in self.null_values):
            raise ConfigError(f"--null-values: expected a list of texts, got {self.null_values!r}")
        for flag, value, low in [("--min-frequency", self.min_frequency, 1), ("--top-k", self.top_k, 1),
                                 ("--max-categories", self.max_categories, 0), ("--buckets", self.buckets, 0)]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")


def _check_keys(where: str, raw: Any, cls) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return raw


def parse_spec(raw: Any, where: str) -> ImportSpec:
    """An ImportSpec from parsed YAML; every value is checked, unknown keys are errors."""
    raw = _check_keys(where, raw, ImportSpec)
    if not isinstance(raw.get("label"), str):
        raise ConfigError(f"{where}: 'label' must name the 0/1 label column")
    columns = {}
    if not isinstance(raw.get("columns") or {}, dict):
        raise ConfigError(f"{where}: 'columns' must be a mapping of column name to its kind "
                          f"(columns: {{user: {{kind: categorical}}}}), not a {type(raw['columns']).__name__}")
    for name, c in (raw.get("columns") or {}).items():
        c = _check_keys(f"{where}: columns.{name}", c or {}, ColumnSpec)
        columns[str(name)] = check_column(f"{where}: columns.{name}", ColumnSpec(**c))
    if not columns:
        raise ConfigError(f"{where}: 'columns' must list at least one feature column")
    split = SplitSpec(**_check_keys(f"{where}: split", raw.get("split") or {}, SplitSpec))
    return ImportSpec(raw["label"], columns, check_split(f"{where}: split", split))


def load_spec(path) -> ImportSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read spec {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(raw, str(path))


def check_column(where: str, c: ColumnSpec) -> ColumnSpec:
    if c.kind not in KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {c.kind!r}")
    if not isinstance(c.min_frequency, int) or c.min_frequency < 1:
        raise ConfigError(f"{where}.min_frequency: must be an integer >= 1, got {c.min_frequency!r}")
    if c.top_k is not None and (not isinstance(c.top_k, int) or c.top_k < 1):
        raise ConfigError(f"{where}.top_k: must be an integer >= 1, got {c.top_k!r}")
    if c.max_rows is not None and (isinstance(c.max_rows, bool) or not isinstance(c.max_rows, int) or c.max_rows < 2):
        raise ConfigError(f"{where}.max_rows: must be an integer >= 2 (id 0 and one value), got {c.max_rows!r}")
    if c.separator is not None and (c.kind != "multi_hot" or not isinstance(c.separator, str) or not c.separator):
        raise ConfigError(f"{where}.separator: only for multi_hot columns, a non-empty string")
    return c


def check_split(where: str, s: SplitSpec) -> SplitSpec:
    if s.kind not in SPLITS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(SPLITS)}, got {s.kind!r}")
    if s.kind == "random":
        if (problem := seed_problem(s.seed)) is not None:
            raise ConfigError(f"{where}.seed: {problem}")
        tf, vf = s.test_fraction, s.valid_fraction
        if not all(isinstance(x, (int, float)) for x in (tf, vf)) or not (0 <= tf < 1 and 0 <= vf < 1 and tf + vf < 1):
            raise ConfigError(f"{where}: test_fraction {tf} and valid_fraction {vf} must be in [0, 1) and leave rows to train on")
    if s.kind == "time":
        if not s.column or s.test_from is None:
            raise ConfigError(f"{where}: a time split needs 'column' and 'test_from' (and optionally 'valid_from')")
        try:
            empty_valid = s.valid_from is not None and not s.valid_from < s.test_from
        except TypeError:  # a date and a number: compared once the column's type is known
            empty_valid = False
        if empty_valid:
            raise ConfigError(f"{where}: valid_from {s.valid_from} is not before test_from {s.test_from}: "
                              "the valid split would be empty")
    if s.kind == "files":
        bad = sorted(set(s.files) - set(SPLIT_NAMES))
        if bad or "train" not in s.files:
            raise ConfigError(f"{where}.files: needs 'train' and may have 'valid', 'test' (got {', '.join(s.files) or 'none'})")
        s.files = {k: [v] if isinstance(v, str) else list(v) for k, v in s.files.items()}
    return s


# ---------------------------------------------------------------------------------- inference
def infer_spec(schema: pa.Schema, sample: pa.Table, label: str, split: SplitSpec, *, kinds: dict[str, str],
               min_frequency: int, top_k: int | None, max_categories: int,
               separator: str = "|") -> tuple[ImportSpec, dict[str, str]]:
    """Kinds from types: lists -> multi_hot, strings and booleans -> categorical, floats -> dense,
    integers -> categorical when named like an id or with at most `max_categories` distinct values
    in `sample`, else dense. `kinds` overrides (a string column forced to multi_hot is split on
    `separator`); returns the spec and a comment per column."""
    columns, notes = {}, {}
    skip = {label, split.column}
    for f in schema:
        if f.name in skip:
            continue
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        kind, note = kinds.get(f.name), ""
        if kind is None:
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                kind, note = "multi_hot", f"a list of {t.value_type}"
            elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
                kind, note = "categorical", str(t)
            elif pa.types.is_floating(t) or pa.types.is_decimal(t):
                kind, note = "dense", str(t)
            elif pa.types.is_integer(t):
                distinct = pc.count_distinct(sample.column(f.name)).as_py() if f.name in sample.column_names else 0
                few = distinct <= max_categories
                kind = "categorical" if _ID_NAME.search(f.name) or few else "dense"
                note = f"{t}, {distinct:,} distinct in the first {sample.num_rows:,} rows" + (
                    "" if kind == "dense" else ", named like an id" if not few else "")
            else:
                notes[f.name] = f"skipped: {t} is not a feature type"
                continue
        is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
        sep = separator if kind == "multi_hot" and is_str else None
        columns[f.name] = check_column(f"--kind {f.name}", ColumnSpec(kind=kind, separator=sep))
        if kind != "dense":
            columns[f.name].min_frequency, columns[f.name].top_k = min_frequency, top_k
        notes[f.name] = note
    unknown = sorted(set(kinds) - set(columns))
    if unknown:
        what = "is the label or the time column" if unknown[0] in skip else f"no such column (has: {', '.join(schema.names)})"
        raise ConfigError(f"--kind {unknown[0]}: {what}")
    if not columns:
        raise ConfigError(f"no feature columns besides the label {label!r} (has: {', '.join(schema.names)})")
    return ImportSpec(label, columns, split), notes


# ---------------------------------------------------------------------------------- printing
def _scalar(v: Any) -> str:
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    text = v if isinstance(v, str) else json.dumps(v)
    try:  # plain when YAML reads it back as the same value (not "yes", "1e3", "2024-01-01", "*.csv")
        plain = bool(text) and yaml.safe_load(text) == v and not any(ch in text for ch in ",:#{}[]&*!|>'\"%@`")
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(v)


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_value, v)) + "]"
    return _scalar(v)


def spec_yaml(spec: ImportSpec, notes: dict[str, str] | None = None) -> str:
    """The spec as YAML that `load_spec` reads back; defaults are left out."""
    notes = notes or {}
    lines = [f"label: {_scalar(spec.label)}", "columns:"]
    for name, c in spec.columns.items():
        d = {"kind": c.kind}
        d.update({k: getattr(c, k) for k in ("min_frequency", "top_k", "separator", "max_rows")
                  if getattr(c, k) != getattr(ColumnSpec, k)})
        lines.append(f"  {_scalar(name)}: {_value(d)}" + (f"  # {notes[name]}" if notes.get(name) else ""))
    for name, note in notes.items():
        if name not in spec.columns:
            lines.append(f"  # {name}: {note}")
    s = spec.split
    d = {"kind": s.kind}
    if s.kind == "random":
        d.update(seed=s.seed, test_fraction=s.test_fraction, valid_fraction=s.valid_fraction)
    elif s.kind == "time":
        d.update({k: getattr(s, k) for k in ("column", "valid_from", "test_from") if getattr(s, k) is not None})
    else:
        d["files"] = s.files
    lines.append(f"split: {_value(d)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- training config
# What the training config that `wdl data import` prints (and writes as OUT/train-config.yaml)
# does not read from the data: one place to change the model every import proposes. The keys
# are the config's own (wdl/config.py), merged into the model / optim / train sections.
TRAINING_DEFAULTS = {
    # The deep part embeds the columns of the fm pairs proposed from the data (wdl.ingest.fm_pairs)
    # and only those: fm over every pair of many embedded columns fits the pairs without
    # interaction too. Each gets this dimension: fm needs one, 16 holds a rank-8 user-item
    # interaction with room and is divisible by 4 (FBGEMM's CPU tables).
    "embedding_dim": 16,
    # Candidates for an fm pair: columns with at least this many train rows per id on average (an
    # id's vector has embedding_dim weights; with fewer than two rows per weight it memorises its
    # rows: fm over the planted Criteo-shaped set's columns of 21-57 rows per id overfit); 0: all.
    "min_rows_per_embedded_id": 32,
    # ... and with at least this many ids: a pair of smaller columns has at most
    # cross_proposal.PAIR_CELLS_MAX cells, so the cross proposal tests it and a cross learns it exactly.
    "min_ids_per_embedded_column": 316,
    # Larger batches average out the noise of rarely seen rows' updates: 4096 had the best valid
    # AUC over both planted sets re-imported (8192 was better on one, worse on the other); a small
    # train split gets smaller ones, halved until an epoch has enough steps.
    "batch_size": 4096,
    "min_batch_size": 256,
    "min_steps_per_epoch": 64,
    # optim.*.l2 is a N(0, 1 / (2 lambda)) prior on every table row (wdl/train/sparse_optim.py);
    # the loss is a batch mean, so l2 = 2 * lambda / batch_size is printed for each optimiser.
    # lambda 3 for both had the best summed valid AUC over the planted sets re-imported (against
    # deep 6, and both at batch 8192): benchmarks/results/cpu-x86_64-2c/import-quality-2026-12-08.
    "prior_lambda": {"wide": 3.0, "deep": 3.0},
    # A list column (and a cross with one) averaged over a row's values rather than summed, so a
    # row with three values does not weigh their effects three times (on the planted MovieLens-
    # shaped set, whose genre effects are averages, valid AUC 0.7391 against 0.7360).
    "multi_hot_pooling": "mean",
    # hidden []: the deep part is fm plus a linear layer over the embeddings and numbers; an MLP
    # over many embedded columns memorised rare ids ([256, 128, 64] overfit, [64, 32] no better).
    "model": {"kind": "wide_deep", "embedding_backend": "torch",  # wdl's tables take the row prior
              "deep": {"hidden": [], "dropout": 0.0, "interaction": "fm"}},
    "optim": {"wide": {"name": "ftrl", "lr": 0.1, "beta": 0.001},
              "deep": {"name": "adam", "lr": 0.01}},
    "train": {"epochs": 20, "early_stopping": {"patience": 2}},
    "valid_fraction": 0.1,  # of train, to choose the epoch when the import wrote no valid split
    "in_memory_bytes": 4 << 30,  # larger train splits are streamed (data.in_memory: false)
}


def batch_size(train_rows: int, defaults: dict = TRAINING_DEFAULTS) -> int:
    """defaults' batch size, halved (not below its minimum) until an epoch has its minimum of steps."""
    size = defaults["batch_size"]
    while size // 2 >= defaults["min_batch_size"] and train_rows < defaults["min_steps_per_epoch"] * size:
        size //= 2
    return size


def row_prior(size: int, part: str, defaults: dict = TRAINING_DEFAULTS) -> float:
    """optim.<part>.l2 for batches of `size` rows, to two significant digits."""
    return float(f"{2 * defaults['prior_lambda'][part] / size:.2g}")


def fm_candidates(columns: dict[str, dict], train_rows: int, defaults: dict = TRAINING_DEFAULTS) -> list[str]:
    """The columns an fm pair may join: categorical or list columns with enough ids and train rows per id."""
    per_id, fewest = defaults["min_rows_per_embedded_id"], defaults["min_ids_per_embedded_column"]
    return [n for n, c in columns.items() if c["kind"] != "dense"
            and c["vocab_size"] * per_id <= max(train_rows, 1) and c["vocab_size"] >= fewest]


def training_config(out: str, label: str, columns: dict[str, dict], normalize: dict[str, str], rows: dict[str, int],
                    crosses: list[dict], fm_pairs: list[list[str]] = (), defaults: dict = TRAINING_DEFAULTS) -> str:
    """A complete training config (YAML) for the data set just written at `out`: every column
    (ids, dense statistics and bucket edges from its manifest), the `crosses` proposed
    (wdl.ingest.cross_proposal), a wide part over ids, bucketed numbers and crosses, a deep part
    over the numbers and embeddings of one dimension of the columns in the `fm_pairs` proposed
    (wdl.ingest.fm_pairs) with fm over those pairs, batches and row priors fitted to the train
    rows, and `defaults`. `rows`: the rows of each split written."""
    sparse = [n for n, c in columns.items() if c["kind"] != "dense"]
    dense = [n for n, c in columns.items() if c["kind"] == "dense"]
    bucketed = [n for n in dense if columns[n].get("bucket_edges")]  # auto buckets need the manifest's edges
    lines = [f"# wdl train --config {_scalar(str(Path(out) / 'train-config.yaml'))}",
             "# Written by `wdl data import`: ids, dense statistics and bucket edges come from the data set's",
             "# manifest; the crosses are its proposed_crosses (z: how far the pair's joint label rate is",
             "# from what the columns explain alone), the fm pairs its proposed_fm_pairs (z: the held-out",
             "# gain of a latent term for the pair).",
             f"run: {{name: {_scalar(Path(out).name or 'import')}}}"]
    present = {k for k, n in rows.items() if n}
    data = {"path": str(out)}
    if "valid" in present and "test" in present:
        data["valid_split"] = "valid"
    else:
        data["valid_fraction"] = defaults["valid_fraction"]
    data["eval_split"] = "test" if "test" in present else "valid" if "valid" in present else "train"
    data["batch_size"] = size = batch_size(rows.get("train", 0), defaults)
    width = 8 * len(sparse) + 4 * len(dense) + 1  # bytes a row holds in memory, about (lists count one id)
    if rows.get("train", 0) * width > defaults["in_memory_bytes"]:
        data["in_memory"] = False
    lines += [f"data: {_value(data)}", "features:", f"  label: {_scalar(label)}", "  columns:"]
    for name in columns:
        c = {"kind": columns[name]["kind"]}
        if name in dense:
            c["normalize"] = normalize.get(name, "standard")
            c.update({"buckets": "auto"} if name in bucketed else {})
        else:
            c["vocab_size"] = "auto"
        lines.append(f"    {_scalar(name)}: {_value(c)}")
    names = []
    if crosses:
        lines.append("  crosses:")
    for x in crosses:
        name = "_x_".join(x["columns"])
        while name in columns or name in names:
            name += "_"
        names.append(name)
        lines.append(f"    {_scalar(name)}: {_value({'columns': x['columns'], 'hash_buckets': x['hash_buckets']})}"
                     f"  # z {x['z']:.1f}")
    dim, model = defaults["embedding_dim"], defaults["model"]
    embedded = [n for n in sparse if any(n in p for p in fm_pairs)]
    deep = {"embeddings": {n: dim for n in embedded}, "dense": dense, **model.get("deep", {})}
    if fm_pairs:
        deep["interaction_pairs"] = [list(p) for p in fm_pairs]
    else:
        deep["interaction"] = "none"  # no pair interacts: the deep part is a linear layer over the numbers
    kind = model.get("kind", "wide_deep") if embedded or dense else "wide"
    multi = {n for n in sparse if columns[n]["kind"] == "multi_hot"}
    pooled = [n for n in sparse if n in multi] + [n for n, x in zip(names, crosses) if multi & set(x["columns"])]
    lines += ["model:", f"  kind: {kind}"]
    if pooled and defaults["multi_hot_pooling"] != "sum":
        lines.append(f"  pooling: {_value({n: defaults['multi_hot_pooling'] for n in pooled})}")
    lines += [f"  {k}: {_value(v)}" for k, v in model.items() if k not in ("kind", "wide", "deep")]
    lines += [f"  wide: {_value({'features': sparse + bucketed + names, **model.get('wide', {})})}",
              f"  deep: {_value(deep)}"]
    lam = defaults["prior_lambda"]
    lines += ["# optim.*.l2: a N(0, 1/(2 lambda)) prior on every table row, lambda "
              + ", ".join(f"{lam[k]:g} ({k})" for k in defaults["optim"]) + "; the loss",
              f"# is a batch mean, so l2 = 2 * lambda / data.batch_size ({size}): scale l2 with the batch size.",
              "optim:"]
    lines += [f"  {k}: {_value({**v, 'l2': row_prior(size, k, defaults)})}" for k, v in defaults["optim"].items()]
    lines.append("train:")
    lines += [f"  {k}: {_value(v)}" for k, v in defaults["train"].items()]
    return "\n".join(lines) + "\n"
