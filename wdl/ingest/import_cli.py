"""`wdl data import` on the command line: its flags (the fields of ImportOptions and the split's),
and the summary it prints, then the training config it wrote into the data set folder. The
import itself is wdl.ingest.importer."""

from __future__ import annotations

import yaml

from wdl.errors import ConfigError
from wdl.ingest import import_spec as S
from wdl.ingest.importer import import_data
from wdl.ingest.options import from_args
from wdl.ingest.vocab_from import growth_lines


def add_import_arguments(parser) -> None:
    """Flags of `wdl data import`: the inputs and output, the fields of S.ImportOptions (--spec is
    its path, --kind COL=KIND its kinds) and the split flags."""
    d = S.ImportOptions()
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="Parquet or CSV files, folders or globs (quoted)")
    add("--out", required=True, help="output data set folder")
    add("--spec", default=None, help="YAML: label, columns (kind, min_frequency, top_k) and split")
    add("--label", default=None, help="the 0/1 label column (infers the other columns' kinds without --spec)")
    add("--kind", action="append", default=[], metavar="COL=KIND",
        help="with inference: force a column's kind (categorical, multi_hot, dense); repeatable")
    add("--min-frequency", type=int, default=d.min_frequency, help="with inference: values seen fewer times in train -> id 0")
    add("--top-k", type=int, default=d.top_k, help="with inference: keep the K most frequent values per column")
    add("--max-categories", type=int, default=d.max_categories,
        help="with inference: integer columns with at most this many distinct values are categorical")
    add("--separator", default=d.separator, help="with inference: a string column given --kind COL=multi_hot is split on it")
    add("--split", choices=S.SPLITS, default=None, help="random (default), time or files; replaces the spec's split")
    add("--seed", type=int, default=None, help="random split: seed (default 2021)")
    add("--test-fraction", type=float, default=None, help="random split: test share (default 0.2)")
    add("--valid-fraction", type=float, default=None, help="random split: valid share (default 0)")
    add("--time-column", default=None, help="time split: the column compared with the cut points")
    add("--valid-from", default=None, help="time split: first time of the valid split")
    add("--test-from", default=None, help="time split: first time of the test split")
    for k in S.SPLIT_NAMES:
        add(f"--{k}-files", nargs="+", default=None, help=f"files split: the {k} files, folders or globs")
    add("--format", dest="fmt", choices=S.FORMATS, default=d.fmt, help="input format (default: by file name)")
    add("--null-values", action="append", default=None, metavar="TEXT",
        help="CSV: a text read as null (missing); repeatable; replaces the default, the empty field only "
             "(so NA, null, NaN are values unless listed; a dense column's NaN is missing anyway)")
    add("--workers", type=int, default=d.workers,
        help=f"processes over Parquet row groups / files (default {d.workers}; at most the usable cores)")
    add("--buckets", type=int, default=d.buckets,
        help=f"dense columns: equal-frequency bucket edges to record (default {d.buckets})")
    add("--overwrite", action="store_true", help="replace an existing data set at --out")
    add("--vocab-from", default=None, metavar="DATASET",
        help="continue DATASET's ids: its values keep them, new values get ids after them (for wdl train --init-from)")
    add("--row-group-rows", type=int, default=d.row_group_rows, help="rows per Parquet row group of the output")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars")


def split_from_args(args, base: S.SplitSpec | None) -> S.SplitSpec | None:
    """The spec's split with the flags given on the command line applied; None if neither."""
    files = {k: getattr(args, f"{k}_files") for k in S.SPLIT_NAMES if getattr(args, f"{k}_files")}
    kind = args.split or ("files" if files else "time" if args.time_column else None)
    def cut(text):  # as YAML: 1700900000 is a number, 2024-03-01 a date, like in a spec
        return None if text is None else yaml.safe_load(text)

    flags = {"seed": args.seed, "test_fraction": args.test_fraction, "valid_fraction": args.valid_fraction,
             "column": args.time_column, "valid_from": cut(args.valid_from), "test_from": cut(args.test_from)}
    given = {k: v for k, v in flags.items() if v is not None}
    if kind is None and not given:
        return base
    s = base if base is not None and kind in (None, base.kind) else S.SplitSpec(kind=kind or "random")
    belongs = {"random": {"seed", "test_fraction", "valid_fraction"}, "time": {"column", "valid_from", "test_from"}}
    stray = [k for k in given if k not in belongs.get(s.kind, set())]
    if stray:
        flag = "--time-column" if stray[0] == "column" else "--" + stray[0].replace("_", "-")
        raise ConfigError(f"{flag} does not apply to a {s.kind} split"
                          + (" (a time split: --split time --time-column COL)" if stray[0] in belongs["time"] else ""))
    for k, v in given.items():
        setattr(s, k, v)
    if files:
        s.files = files
    return S.check_split("command line: split", s)


def run_import(args) -> int:
    kinds = dict(item.partition("=")[::2] for item in args.kind)  # COL=KIND, checked by S.ImportOptions
    spec = S.load_spec(args.spec) if args.spec else None
    given = {k: v for k, v in from_args(S.ImportOptions, args).items() if not (k == "null_values" and v is None)}
    options = {**given, "spec": spec, "kinds": kinds,
               "split": split_from_args(args, spec.split if spec else None)}
    summary = import_data(args.inputs, args.out, **options)
    print(format_summary(args.out, summary))
    print(f"\n# {summary['config_path']}:\n" + summary["training_config"], end="")
    return 0


def format_summary(out, s: dict) -> str:
    lines = [f"wrote {out}", "  rows: " + ", ".join(f"{k} {n:,}" for k, n in s["rows"].items()),
             "  positive rate: " + ", ".join(f"{k} {p:.4f}" for k, p in s["positive_rate"].items()),
             "  vocab sizes (with id 0): " + (" ".join(f"{n}={v:,}" for n, v in s["vocab_sizes"].items()) or "none"),
             "  unknown or missing values (id 0 / null) per split:"]
    for split, cols in s["unknown_values"].items():
        parts = [f"{n} {c['unknown']:,}/{c['values']:,}" for n, c in cols.items() if c["unknown"]]
        lines.append(f"    {split}: {', '.join(parts) or 'none'}")
    if "vocab_growth" in s:
        lines += ["  new values per column (ids after the parent's):", *growth_lines(s["vocab_growth"])]
    crosses = [f"{' x '.join(x['columns'])} (z {x['z']:.1f})" for x in s.get("proposed_crosses", [])]
    lines.append(f"  proposed crosses (manifest: proposed_crosses): {', '.join(crosses) or 'none'}")
    pairs = [f"{' x '.join(x['columns'])} (z {x['z']:.1f})" for x in s.get("proposed_fm_pairs", [])]
    lines.append(f"  proposed fm pairs (manifest: proposed_fm_pairs): {', '.join(pairs) or 'none'}")
    lines.append(f"  {s['seconds']:.1f} s, {s['rows_per_second']:,.0f} rows/s with {s['workers']} worker(s)")
    if "config_path" in s:
        lines.append(f"  training config: {s['config_path']} (wdl train --config {s['config_path']})")
    return "\n".join(lines)
