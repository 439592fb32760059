"""`wdl predict`: score rows with a trained model.

    wdl predict runs/NAME [--checkpoint best|latest|PATH] [--data DIR|FILES [--raw]] [--split S]
                [--key COL ...] --out scores.parquet
    torchrun --nproc_per_node N -m wdl.cli predict runs/NAME ...   (each rank scores its own part)

The model is rebuilt from the run's config.yaml exactly as training built it (same tables,
same placement code) and only its weights are loaded. Input is a wdl data set folder (the
training one by default), or Parquet files with the columns the run's feature spec reads; ids
and normalisation come from the training data set's manifest. With --raw, the files hold raw
values as `wdl data import` read them, mapped here through the import's vocabularies
(wdl.data.raw_rows). Rows are read in file order without shuffling, each rank a contiguous
part, so the output holds every input row exactly once, in input order: `row` (position in
the input), `score` (probability), `label` when the input has one, and the --key columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wdl.errors import CheckpointError, ConfigError, DataError


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--data", default=None, metavar="DIR|FILES",
                   help="a wdl data set folder, or Parquet files (a file, folder or quoted glob) with the data "
                        "set's columns (default: the run's training data set)")
    p.add_argument("--raw", action="store_true",
                   help="--data files hold raw values as `wdl data import` read them (a model of an imported set)")
    p.add_argument("--split", default=None, help="split of a data set folder to score (default: the run's data.eval_split)")
    p.add_argument("--key", action="append", default=[], metavar="COL",
                   help="an input column to copy to the output beside the score, e.g. an id (repeatable)")
    p.add_argument("--out", required=True, help="Parquet file to write (row, score, label, --key columns)")
    p.add_argument("--batch-size", type=int, default=16384)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """RUN (positionally or --run) and --checkpoint: which trained model a command uses."""
    p.add_argument("run", nargs="?", default=None, help="run folder of a trained model (holds config.yaml and checkpoints/)")
    # Also as an option; under torchrun give it positionally (torchrun takes --run for its own --run-path).
    p.add_argument("--run", dest="run_option", default=None, metavar="RUN", help="the same as RUN")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|PATH",
                   help="best: the validation-selected epoch (latest when the run had no validation split); "
                        "latest: the newest good checkpoint; or a checkpoint folder")


def predict_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.data.parquet import StreamingLoader, concat_tables, list_row_groups, read_schema
    from wdl.data.raw_rows import raw_vocabularies
    from wdl.distributed.env import all_gather_cat, all_reduce_sum, close_distributed, init_distributed
    from wdl.train import run_log
    from wdl.train.evaluate import predict

    run = run_folder(args, "predict")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = output_path(args.out)
    cfg = load_config(run / "config.yaml")
    ckpt = pick_checkpoint(run, cfg, args.checkpoint)
    run_log.capture()
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    try:
        manifest = open_dataset(cfg.data)  # ids and statistics of training
        spec = feature_spec(cfg, manifest)
        files, where, source = _inputs(args, manifest, cfg.data.eval_split)
        if source is not None:
            check_readable(ckpt, cfg, manifest, spec, source)
        read = raw_rows_spec(cfg, manifest, spec) if args.raw else spec
        if not args.raw:
            _refuse_raw_values(files[0], manifest, spec, cfg.data.train_split)
        names = set(read_schema(files[0]).names)
        read.has_labels = spec.label in names
        _check_keys(args.key, files)
        loader = StreamingLoader(list_row_groups(files, read), read, args.batch_size, rank=env.rank,
                                 world_size=env.world_size, shuffle=False)

        placed = load_trained_model(cfg, spec, env, ckpt)
        scores, labels = predict(placed.model, loader, env.device)
        scores, labels = all_gather_cat(scores), all_gather_cat(labels)  # rank order = input order
        unknown = loader.unknown_counts(all_reduce_sum)  # every rank's rows
        if env.is_main:
            columns = {"row": pa.array(np.arange(len(scores), dtype=np.int64)),
                       "score": pa.array(scores.numpy().astype(np.float32))}
            if read.has_labels:
                columns["label"] = pa.array(labels.numpy().astype(np.int8))
            for key in args.key:  # read in file order, as the rows were (widened as the scoring read them)
                columns[key] = concat_tables([pq.read_table(f, columns=[key]) for f in files], files)[key]
            write_parquet(pa.table(columns), out)
            print(f"wdl: scored {len(scores)} rows of {where} with {ckpt} -> {out}", flush=True)
            _say_unknown(unknown, where, cfg.data.max_unknown_fraction,
                         hint=not args.raw and bool(raw_vocabularies(manifest, spec)))
    finally:
        run_log.release()
        close_distributed()
    return 0


def _say_unknown(counts: dict[str, dict[str, int]], where: str, max_fraction: float, hint: bool) -> None:
    """The ids the vocabularies could not honour (scored as the unknown id 0), on stderr: a
    warning when a column's share passes data.max_unknown_fraction, where training would stop.
    (Scoring goes on: new users and items are what a trained model often meets.)"""
    from wdl.data.dataset import check_unknown

    line = check_unknown({where: counts}, 1.0)
    if line is None:
        return
    worst = max((c["out_of_vocab"] / max(c["values"], 1) for c in counts.values()), default=0.0)
    if worst > max_fraction:
        line = f"warning: {line}" + ("; raw values of an imported set? score them with --raw" if hint else "")
    print(f"wdl: {line}", file=sys.stderr, flush=True)


def _inputs(args: argparse.Namespace, manifest, eval_split: str) -> tuple[list[Path], str, object]:
    """The Parquet files to score, in order, how to name them in messages, and the data set
    they belong to (None for loose files)."""
    from wdl.data.manifest import MANIFEST, load_manifest
    from wdl.ingest.importer import expand_inputs

    data = Path(args.data) if args.data else None
    # A folder laid out as a data set but without its manifest (an interrupted preparation) is
    # refused as load_manifest refuses it, never scored as loose files.
    looks_like_data_set = data is not None and data.is_dir() and any((data / d).is_dir() for d in ("train", "vocab"))
    if data is None or looks_like_data_set or (data.is_dir() and (data / MANIFEST).is_file()):
        if args.raw:
            raise ConfigError("--raw scores raw files: give them with --data FILES (a file, folder or quoted glob), "
                              "not a data set folder")
        source = load_manifest(data) if data else manifest
        split = args.split or eval_split
        files = [f.path for f in source.split(split).files]
        if not files:
            raise DataError(f"the {split!r} split of {source.root} has no files")
        return files, f"{source.root}/{split}", source
    if args.split:
        raise ConfigError(f"--split picks a split of a data set folder; {args.data} is files")
    found = expand_inputs([args.data])
    if any(fmt != "parquet" for _, fmt in found):
        raise DataError(f"--data {args.data}: wdl predict reads Parquet files (import CSV with wdl data import, "
                        "or convert it)")
    return [Path(f) for f, _ in found], args.data, None


def check_readable(ckpt: Path, cfg, manifest, spec, source) -> None:
    """A model is applied only to data whose ids and numbers mean what they meant in training:
    the data set it was trained on (the manifest hash its checkpoint records), or one that
    encodes every column the model reads alike (vocabularies, sizes, bucket edges, dense
    statistics) as the run's data set does. Otherwise one line pointing at --raw."""
    from wdl.data.dataset import feature_spec

    try:
        recorded = json.loads((ckpt / "meta.json").read_text()).get("read_order", {}).get("data set (manifest hash)")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if source.identity in (recorded, manifest.identity) or source.root == manifest.root:
        return
    try:
        theirs = feature_spec(cfg, source)
        why = encoding_difference(spec, theirs, manifest, source)
    except (ConfigError, DataError) as e:
        why = str(e)
    if why:
        raise DataError(f"--data {source.root} is not the data set this model was trained on ({manifest.root}), and "
                        f"{why}: its rows would be scored as something else; score raw rows with --data FILES --raw "
                        "(a model of an imported set), or a data set encoded as the training one")


def encoding_difference(spec, theirs, manifest, source) -> str | None:
    """How data set `source` (read by `theirs`) encodes a column the model reads otherwise than
    its training data set `manifest` (read by `spec`) does, or None when every one agrees."""
    if spec.label != theirs.label:
        return f"its label column is {theirs.label!r}"
    for name, a in spec.sparse.items():
        b = theirs.sparse[name]
        if (a.kind, a.mode, a.num_embeddings) != (b.kind, b.mode, b.num_embeddings):
            return f"column {name!r} has {b.num_embeddings} ids ({b.mode}) there, {a.num_embeddings} ({a.mode}) here"
        if a.edges is not None and not np.array_equal(a.edges, b.edges):
            return f"column {name!r} has other bucket edges"
        if a.vocab is not None and not a.vocab.equals(b.vocab):
            return f"column {name!r} has another vocabulary"
        mine, other = manifest.columns.get(name, {}), source.columns.get(name, {})
        if mine.get("encoding") != other.get("encoding") or not _same_file(manifest.vocab_path(name), source.vocab_path(name)):
            return f"column {name!r} maps its values to ids through another vocabulary"
    for a, b in zip(spec.dense, theirs.dense):
        if a != b:
            return f"dense column {a.name!r} has other statistics (mean {b.mean:g}, std {b.std:g} there; {a.mean:g}, {a.std:g} here)"
    if [d.name for d in spec.dense] != [d.name for d in theirs.dense]:
        return "it leaves out other dense columns (features.max_missing_fraction)"
    return None


def _same_file(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def raw_rows_spec(cfg, manifest, spec):
    """What reads raw rows for this model (RawRows over the import's vocabularies); a one-line
    error for a model of a data set that `wdl data import` did not write."""
    from wdl.data.dataset import feature_spec
    from wdl.data.parquet import read_schema
    from wdl.data.raw_rows import RawRows, numeric_types, raw_vocabularies

    raw = raw_vocabularies(manifest, spec)
    if not raw:
        raise ConfigError(f"--raw needs a model trained on a data set from `wdl data import` (its vocabularies map "
                          f"raw values to ids); {manifest.root} was not imported, or the model reads its columns "
                          "other than by their ids: score its rows as the data set holds them (no --raw)")
    columns = dict(cfg.features.columns)
    for name, r in raw.items():
        columns[name] = dataclasses.replace(columns[name], vocab_size=None, vocab_file=str(r["vocab_file"]))
    raw_cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, columns=columns))
    schema = read_schema(manifest.split(cfg.data.train_split).files[0].path)
    raw_spec = feature_spec(raw_cfg, manifest)
    return RawRows(raw_spec, raw, numeric_types(raw_spec, schema))


def _refuse_raw_values(path: Path, manifest, spec, train_split: str) -> None:
    """A one-line error, naming --raw, for raw files of an imported set given without it: a
    column the data set holds as integer ids that holds strings here."""
    from wdl.data.parquet import read_schema
    from wdl.data.raw_rows import raw_vocabularies

    ids = read_schema(manifest.split(train_split).files[0].path)
    given = read_schema(path)
    for name in raw_vocabularies(manifest, spec):
        if name not in given.names or name not in ids.names:
            continue
        t, want = (f.type.value_type if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) else f.type
                   for f in (given.field(name), ids.field(name)))
        if not pa.types.is_integer(t) and pa.types.is_integer(want):
            raise DataError(f"{path}: column {name!r} holds {t} where the data set holds ids; raw rows of the "
                            "imported files are scored with --raw")


def _check_keys(keys: list[str], files: list[Path]) -> None:
    from wdl.data.parquet import read_schema

    taken = {"row", "score", "label"}
    for key in keys:
        if key in taken or keys.count(key) > 1:
            raise ConfigError(f"--key {key}: the output already has a column of that name")
    for f in files if keys else []:  # each file's footer read once, whatever the number of keys
        names = set(read_schema(f).names)
        for key in keys:
            if key not in names:
                raise DataError(f"--key {key}: {f} has no such column")


def output_path(given: str, folder: bool = False) -> Path:
    """--out, checked before any work: its folder can be made and written, and it is not a
    folder (a file is replaced; with `folder`, the caller says which folders it replaces)."""
    out = Path(given).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {given}: cannot create {out.parent} ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {given}: cannot write into {out.parent} (permission denied)")
    if out.is_dir() and not folder:
        raise ConfigError(f"--out {given} is a folder; give a file name (e.g. {Path(given) / 'scores.parquet'})")
    return out


def write_parquet(table: pa.Table, out: Path) -> None:
    """`table` at `out`, never a half-written file under that name (written aside, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)


def refuse_torchrun(why: str) -> None:
    """For the commands that run in one process: a one-line error under torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{why}; run it without torchrun")


def run_folder(args: argparse.Namespace, command: str) -> Path:
    """The run folder given positionally or as --run (exactly once), checked to hold a config."""
    if bool(args.run) == bool(args.run_option):
        raise ConfigError(f"give the run folder once: wdl {command} RUN ... (or --run RUN)")
    run = Path(args.run or args.run_option)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml there (a run folder is runs/<name>)")
    return run


def load_trained_model(cfg, spec, env, ckpt: Path):
    """The model rebuilt as training built it (tables, placement) with `ckpt`'s weights only
    (the checkpoint's signature is verified first). Returns build_model's placement (`Placed`)."""
    from wdl.checkpoint import Checkpointer
    from wdl.model.embeddings import resolve_backend
    from wdl.train.build import build_model, deep_fused_optimizer, model_signature

    backend = resolve_backend(cfg.model.embedding_backend)
    _, model_cfg, placed = build_model(cfg, spec, env, backend, deep_fused_optimizer(cfg, env, backend))
    checkpointer = Checkpointer(ckpt.parent, 1, env.rank, env.world_size, signature=model_signature(model_cfg, spec))
    checkpointer.load_weights(ckpt, {"model": placed.state_module.state_dict()})
    return placed


def pick_checkpoint(run: Path, cfg, which: str) -> Path:
    from wdl.checkpoint import newest_good_checkpoint

    folder = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints"
    if which in ("best", "latest"):
        if which == "best" and (folder / "best").is_dir():
            return folder / "best"
        if which == "best" and (cfg.data.valid_split or cfg.data.valid_fraction > 0):
            # The run selects on validation, and selected no whole epoch: its newest checkpoint
            # is no choice of its own (perhaps a model cut mid-epoch), so it is not picked silently.
            raise CheckpointError(f"{run} selected no epoch on validation (no {folder / 'best'}); score with "
                                  "--checkpoint latest or a checkpoint folder")
        found = newest_good_checkpoint(folder)
        if found is None:
            raise CheckpointError(f"{run} has no complete checkpoint to score with (looked in {folder})")
        return found
    path = Path(which)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"--checkpoint {which}: not a checkpoint folder (no meta.json)")
    return path
