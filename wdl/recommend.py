"""`wdl recommend`: the top k movies for one user, scored with a trained run.

    wdl recommend --run runs/NAME --user ID [--k 10] [--checkpoint best|latest|PATH]
                  [--include-seen] [--out FILE.parquet]

For a data set that `wdl data prepare movielens` wrote: its `items.parquet` holds every movie
with its movie-side feature columns exactly as the rating rows carry them, and the user's own
rows in the train split give the user-side columns (every row of one user carries the same).
One row per movie (the user's columns repeated) goes through the same FeatureSpec encoding
and the same model call as `wdl predict`, in evaluation mode; the movies the user rated in the
train split are left out unless --include-seen. `--user` is the raw id of the source files,
mapped through the data set's vocabulary.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wdl.errors import ConfigError, DataError


def add_recommend_arguments(p: argparse.ArgumentParser) -> None:
    from wdl.predict import add_run_arguments

    add_run_arguments(p)
    p.add_argument("--user", required=True, metavar="ID", help="raw user id, as in the MovieLens files")
    p.add_argument("--k", type=int, default=10, help="how many movies to list (default 10)")
    p.add_argument("--include-seen", action="store_true",
                   help="also rank the movies the user rated in the train split (left out by default)")
    p.add_argument("--out", default=None, metavar="FILE.parquet",
                   help="also write the list (rank, movie_id, title, score, seen) as Parquet")
    p.add_argument("--batch-size", type=int, default=16384, help="movies scored per model call")


@dataclass
class Catalogue:
    """The data set's items table and which columns are whose (manifest key "items")."""
    table: pa.Table          # one row per item: the item feature columns, raw id, title
    id_column: str           # encoded item id, as in the rating rows
    raw_id_column: str
    title_column: str
    item_columns: list[str]  # feature columns taken from the items table
    user_id_column: str      # encoded user id, as in the rating rows
    user_columns: list[str]  # feature columns taken from the user's rows (the user id among them)


def recommend_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.distributed.env import close_distributed, init_distributed
    from wdl.predict import load_trained_model, output_path, pick_checkpoint, refuse_torchrun, run_folder, write_parquet
    from wdl.train import run_log
    from wdl.train.evaluate import predict

    run = run_folder(args, "recommend")
    if args.k < 1 or args.batch_size < 1:
        raise ConfigError(f"--k and --batch-size must be >= 1, got {args.k} and {args.batch_size}")
    out = output_path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as top.parquet")
    refuse_torchrun("wdl recommend scores one user in one process")
    cfg = load_config(run / "config.yaml")
    ckpt = pick_checkpoint(run, cfg, args.checkpoint)

    # The data first (cheap, and where a user's mistakes show), the model second.
    manifest = open_dataset(cfg.data)  # the training data set: ids and statistics
    items = read_catalogue(manifest)
    user = encode_user(manifest, items.user_id_column, args.user)
    user_row, seen, found_in = user_history(manifest, cfg.data.train_split, items, user, args.user)
    seen_mask = np.isin(items.table.column(items.id_column).to_numpy(), seen)
    keep = np.ones(len(seen_mask), bool) if args.include_seen else ~seen_mask
    candidates = items.table.filter(pa.array(keep))
    spec = feature_spec(cfg, manifest)
    spec.has_labels = False
    rows = candidate_rows(spec, items, candidates, user_row, manifest, cfg.data.train_split)

    run_log.capture()
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    try:
        placed = load_trained_model(cfg, spec, env, ckpt)
        features = spec.encode(rows, f"user {args.user} x {rows.num_rows} movies")
        batches = (features.slice(i, min(i + args.batch_size, len(features)))
                   for i in range(0, len(features), args.batch_size))
        scores, _ = predict(placed.model, batches, env.device)  # wdl predict's scoring path
    finally:
        run_log.release()
        close_distributed()

    scores = scores.numpy().astype(np.float32)
    top = np.argsort(-scores, kind="stable")[:args.k]  # ties: lower movie id first
    result = pa.table({
        "rank": pa.array(np.arange(1, len(top) + 1, dtype=np.int32)),
        "movie_id": candidates.column(items.raw_id_column).take(pa.array(top)),
        "title": candidates.column(items.title_column).take(pa.array(top)),
        "score": pa.array(scores[top]),
        "seen": pa.array(seen_mask[keep][top]),
    })
    left_out = "" if args.include_seen else f", {int(seen_mask.sum())} rated in {cfg.data.train_split} left out"
    where = "" if found_in == cfg.data.train_split else f" (no {cfg.data.train_split} rows: user features from {found_in})"
    print(f"wdl: top {len(top)} of {len(candidates)} movies for user {args.user}{left_out}{where}; {ckpt}")
    print(format_table(result, show_seen=args.include_seen), flush=True)
    if out is not None:
        write_parquet(result, out)
    return 0


def read_catalogue(manifest) -> Catalogue:
    """The items table of a MovieLens data set; one-line errors for other or older data sets."""
    entry = manifest.raw.get("items")
    if not isinstance(entry, dict):
        if manifest.raw.get("source", {}).get("kind") == "movielens":
            variant = manifest.raw["source"].get("variant", "VARIANT")
            raise DataError(f"data set {manifest.root} has no items table (prepared before wdl recommend existed); "
                            f"re-run `wdl data prepare movielens --variant {variant} --out {manifest.root} --overwrite`")
        raise DataError(f"data set {manifest.root} has no user and item tables to recommend from; wdl recommend "
                        "needs a MovieLens data set (`wdl data prepare movielens`)")
    try:
        path = manifest.root / entry["file"]
        table = pq.read_table(path)
        cat = Catalogue(table, entry["id_column"], entry["raw_id_column"], entry["title_column"],
                        list(entry["item_columns"]), entry["user_id_column"], list(entry["user_columns"]))
    except KeyError as e:
        raise DataError(f"{manifest.root}/manifest.json: the items entry lacks {e}; "
                        "re-run `wdl data prepare movielens`") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read the items table {path}: {str(e).splitlines()[0]}; "
                        "re-run `wdl data prepare movielens`") from None
    wanted = [cat.id_column, cat.raw_id_column, cat.title_column, *cat.item_columns]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(f"the items table {path} lacks columns {missing}; re-run `wdl data prepare movielens`")
    return cat


def encode_user(manifest, column: str, raw: str) -> int:
    """The data set's id of raw user id `raw` (vocab/<column>.json: position i holds id i's raw value)."""
    path = manifest.vocab_path(column)
    if path is None:
        raise DataError(f"data set {manifest.root} has no vocabulary for {column!r}; cannot map --user {raw}")
    vocab = json.loads(path.read_text(encoding="utf-8"))
    value: object = raw
    if all(isinstance(v, int) for v in vocab[1:]):
        try:
            value = int(raw)
        except ValueError:
            value = None
    try:
        return vocab.index(value, 1)
    except ValueError:
        raise DataError(f"--user {raw}: no such user in {manifest.root} ({len(vocab) - 1} users; "
                        "give the raw id of the MovieLens files)") from None


def user_history(manifest, train_split: str, items: Catalogue, user: int, raw: str):
    """(the user's feature columns as a 1-row table, the item ids they rated in `train_split`,
    the split the features came from). Each split is scanned with a filter, so only the
    user's rows are held. A user without train rows takes the features of their rows in
    another split (every row of a user carries the same), and has seen nothing."""
    import pyarrow.dataset as pads

    splits = [train_split, *(s for s in manifest.splits if s != train_split)]
    seen = np.zeros(0, np.int64)
    for name in splits:
        files = [str(f.path) for f in manifest.split(name).files]
        rows = pads.dataset(files, format="parquet").to_table(
            columns=[*items.user_columns, items.id_column], filter=pads.field(items.user_id_column) == user)
        if name == train_split:
            seen = rows.column(items.id_column).to_numpy()
        if rows.num_rows:
            return rows.select(items.user_columns).slice(0, 1), seen, name
    raise DataError(f"--user {raw} has no ratings in {manifest.root}, so their features are unknown")


def candidate_rows(spec, items: Catalogue, candidates: pa.Table, user_row: pa.Table, manifest,
                   train_split: str) -> pa.Table:
    """One row per candidate item: the item's columns and the user's, with the training schema."""
    schema = pq.read_schema(manifest.split(train_split).files[0].path)
    n = candidates.num_rows
    repeat = pa.array(np.zeros(n, np.int64))
    columns = {}
    for name in spec.columns:
        if name in items.item_columns:
            col = candidates.column(name)
        elif name in items.user_columns:
            col = user_row.column(name).take(repeat)
        else:
            raise DataError(f"the model reads column {name!r}, which is neither a user nor an item feature of "
                            f"{manifest.root}; wdl recommend cannot fill it")
        columns[name] = col.cast(schema.field(name).type)
    table = pa.table(columns)
    spec.check_schema(table.schema, f"{manifest.root} items x user")
    return table


def format_table(result: pa.Table, show_seen: bool) -> str:
    """rank | movie_id | score | title (| seen), one line per movie."""
    head = f"{'rank':>4} | {'movie_id':>8} | {'score':>6} | " + ("seen | " if show_seen else "") + "title"
    lines = [head]
    for r in result.to_pylist():
        seen = f"{'yes' if r['seen'] else '':>4} | " if show_seen else ""
        lines.append(f"{r['rank']:>4} | {r['movie_id']:>8} | {r['score']:.4f} | {seen}{r['title']}")
    return "\n".join(lines)
