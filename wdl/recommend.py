"""`wdl recommend`: the top k items for a user, scored with a trained run.

    wdl recommend RUN --user ID [--k 10] [--checkpoint best|latest|PATH] [--include-seen] [--out FILE.parquet]
    wdl recommend RUN --users FILE --out top.parquet           (a text file, one id a line, or Parquet)
                      [--user-column COL --item-column COL]    (any data set with a user and an item column)

The candidates are items with their item-side columns, the user gives the user-side ones; one
row per (user, item) goes through the same FeatureSpec encoding and model call as `wdl
predict`, so the scores are the ones it gives for the same rows. Items the user has in the
train split are left out unless --include-seen. `--user` is the raw id of the source files
(mapped through the data set's vocabulary, as `wdl data import` and MovieLens write one).

A MovieLens set (`wdl data prepare movielens`) names its columns in the manifest's `items`
entry and holds every movie in items.parquet (titles shown). Any other set needs the two
columns (`--user-column`, `--item-column`; train.ranking_group stands for the user column):
the items are those of the train split, each with the values of its last train row, and each
other column the model reads is item-side when it never varies within an item's train rows,
user-side when it never varies within a user's, and otherwise context, taken from the user's
last train row (and said). This reads the train split's model columns into memory once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wdl.errors import ConfigError, DataError


def add_recommend_arguments(p: argparse.ArgumentParser) -> None:
    from wdl.predict import add_run_arguments

    add_run_arguments(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="raw user id, as in the source files")
    who.add_argument("--users", metavar="FILE", help="users to recommend to: a text file (one id a line) or a Parquet "
                                                   "file with the user column; needs --out")
    p.add_argument("--k", type=int, default=10, help="how many items to list per user (default 10)")
    p.add_argument("--include-seen", action="store_true",
                   help="also rank the items the user has in the train split (left out by default)")
    p.add_argument("--user-column", default=None, metavar="COL", help="the user column (MovieLens: user_id)")
    p.add_argument("--item-column", default=None, metavar="COL", help="the item column (MovieLens: movie_id)")
    p.add_argument("--out", default=None, metavar="FILE.parquet",
                   help="also write the list (user, rank, item, title, score, seen) as Parquet")
    p.add_argument("--batch-size", type=int, default=16384, help="rows scored per model call")


@dataclass
class Catalogue:
    """The candidate items and which columns are whose."""
    table: pa.Table          # one row per item: the item feature columns, raw id (title)
    id_column: str           # the item column, as the data set's rows carry it
    raw_id_column: str
    title_column: str | None
    item_columns: list[str]  # feature columns taken from the items table
    user_id_column: str      # the user column, as the data set's rows carry it
    user_columns: list[str]  # feature columns taken from the user's last row (the user id among them)
    context: list[str]       # of those, the ones that vary within a user's rows too


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
    if args.users and not args.out:
        raise ConfigError("--users writes its lists to Parquet: give --out FILE.parquet")
    out = output_path(args.out) if args.out else None
    refuse_torchrun("wdl recommend runs in one process")
    cfg = load_config(run / "config.yaml")
    ckpt = pick_checkpoint(run, cfg, args.checkpoint)

    # The data first (cheap, and where a user's mistakes show), the model second.
    manifest = open_dataset(cfg.data)  # the training data set: ids and statistics
    spec = feature_spec(cfg, manifest)
    spec.has_labels = False
    cat = read_catalogue(manifest, cfg, spec, args.user_column, args.item_column)
    raw_users = [args.user] if args.user is not None else read_users(args.users, cat.user_id_column)
    found, skipped = [], []
    encode = id_encoder(manifest, spec, cfg.data.train_split, cat.user_id_column)
    for raw in raw_users:
        try:
            user = encode(raw)
            found.append((raw, *user_history(manifest, cfg.data.train_split, cat, user, raw)))
        except DataError:
            if args.user is not None:
                raise
            skipped.append(raw)
    if not found:
        raise DataError(f"--users {args.users}: none of its {len(raw_users)} users is in {manifest.root}")

    run_log.capture()
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    lists = []
    try:
        placed = load_trained_model(cfg, spec, env, ckpt)
        for raw, user_row, seen, found_in in found:
            seen_mask = np.isin(cat.table.column(cat.id_column).to_numpy(), seen)
            keep = np.ones(len(seen_mask), bool) if args.include_seen else ~seen_mask
            candidates = cat.table.filter(pa.array(keep))
            rows = candidate_rows(spec, cat, candidates, user_row, manifest, cfg.data.train_split)
            features = spec.encode(rows, f"user {raw} x {rows.num_rows} items")
            batches = (features.slice(i, min(i + args.batch_size, len(features)))
                       for i in range(0, len(features), args.batch_size))
            scores, _ = predict(placed.model, batches, env.device)  # wdl predict's scoring path
            lists.append((raw, candidates, seen_mask[keep], scores.numpy().astype(np.float32), found_in,
                          int(seen_mask.sum())))
    finally:
        run_log.release()
        close_distributed()

    tables = [top_k(cat, raw, c, s, scores, args.k) for raw, c, s, scores, *_ in lists]
    if args.user is not None:
        raw, candidates, _, _, found_in, n_seen = lists[0]
        left_out = "" if args.include_seen else f", {n_seen} in {cfg.data.train_split} left out"
        where = "" if found_in == cfg.data.train_split else f" (no {cfg.data.train_split} rows: user features from {found_in})"
        context = f"; context {', '.join(cat.context)} from the user's last row" if cat.context else ""
        print(f"wdl: top {tables[0].num_rows} of {len(candidates)} items for user {raw}{left_out}{where}{context}; {ckpt}")
        print(format_table(tables[0].drop_columns([cat.user_id_column]), cat, show_seen=args.include_seen), flush=True)
    else:
        print(f"wdl: top {args.k} items for {len(found)} users -> {out}; {ckpt}", flush=True)
    if skipped:
        print(f"wdl: {len(skipped)} users of {args.users} are not in {manifest.root} or have no rows, left out "
              f"(e.g. {', '.join(map(str, skipped[:5]))})", flush=True)
    if out is not None:
        write_parquet(pa.concat_tables(tables), out)
    return 0


def top_k(cat: Catalogue, raw, candidates: pa.Table, seen: np.ndarray, scores: np.ndarray, k: int) -> pa.Table:
    top = pa.array(np.argsort(-scores, kind="stable")[:k])  # ties: the catalogue's order (lower id first)
    columns = {cat.user_id_column: pa.array([raw] * len(top), pa.string()),
               "rank": pa.array(np.arange(1, len(top) + 1, dtype=np.int32)),
               cat.id_column: candidates.column(cat.raw_id_column).take(top)}
    if cat.title_column:
        columns["title"] = candidates.column(cat.title_column).take(top)
    return pa.table({**columns, "score": pa.array(scores).take(top), "seen": pa.array(seen).take(top)})


def read_users(path: str, column: str) -> list[str]:
    """Raw user ids from a Parquet file's `column`, or a text file's lines."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--users {path}: no such file")
    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
            if column not in table.column_names:
                raise DataError(f"--users {path}: no column {column!r} (the user column)")
            return [str(v) for v in table.column(column).to_pylist() if v is not None]
        return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, pa.ArrowInvalid) as e:
        raise DataError(f"--users {path}: cannot read it ({str(e).splitlines()[0]})") from None


def read_catalogue(manifest, cfg, spec, user_column: str | None, item_column: str | None) -> Catalogue:
    """A MovieLens set's items table (its columns as its manifest names them), or the items of
    the train split for any set with a user and an item column."""
    entry = manifest.raw.get("items")
    if isinstance(entry, dict) and user_column in (None, entry.get("user_id_column")) \
            and item_column in (None, entry.get("id_column")):
        return movielens_catalogue(manifest, entry)
    if manifest.raw.get("source", {}).get("kind") == "movielens" and not (user_column and item_column):
        variant = manifest.raw["source"].get("variant", "VARIANT")
        raise DataError(f"data set {manifest.root} has no items table (prepared before wdl recommend existed); "
                        f"re-run `wdl data prepare movielens --variant {variant} --out {manifest.root} --overwrite`")
    user_column = user_column or cfg.train.ranking_group or None
    if not (user_column and item_column):
        raise ConfigError(f"name the user and item columns of {manifest.root}: --user-column COL --item-column COL")
    for flag, name in (("--user-column", user_column), ("--item-column", item_column)):
        if name not in spec.sparse or spec.sparse[name].kind != "categorical":
            raise ConfigError(f"{flag} {name}: not a categorical column the model reads "
                              f"({', '.join(n for n, c in spec.sparse.items() if c.kind == 'categorical')})")
    return train_catalogue(manifest, cfg.data.train_split, spec, user_column, item_column)


def movielens_catalogue(manifest, entry: dict) -> Catalogue:
    try:
        path = manifest.root / entry["file"]
        table = pq.read_table(path)
        cat = Catalogue(table, entry["id_column"], entry["raw_id_column"], entry["title_column"],
                        list(entry["item_columns"]), entry["user_id_column"], list(entry["user_columns"]), [])
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


def train_catalogue(manifest, split: str, spec, user: str, item: str) -> Catalogue:
    """Every item of `split` with its last row's values; the model's columns sorted into
    item-side, user-side and context by whether they vary within an item's or a user's rows."""
    import pyarrow.dataset as pads

    columns = list(dict.fromkeys([user, item, *spec.columns]))
    files = [str(f.path) for f in manifest.split(split).files]
    rows = pads.dataset(files, format="parquet").to_table(columns=columns)
    rows = rows.append_column("__row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    item_side, user_side, context = [item], [user], []
    for name in columns[2:]:
        if _constant_within(rows, item, name):
            item_side.append(name)
        else:
            (user_side if _constant_within(rows, user, name) else context).append(name)
    last = rows.group_by(item).aggregate([("__row", "max")]).sort_by(item)
    table = rows.take(last.column("__row_max")).select(item_side)
    raw_ids = pa.array(raw_values(manifest, spec, item, table.column(item)))
    return Catalogue(table.append_column("__raw_id", raw_ids), item, "__raw_id", None, item_side, user,
                     user_side + context, context)


def _constant_within(rows: pa.Table, key: str, column: str) -> bool:
    """Whether `column` holds one value (or nulls) in all rows of each `key` value."""
    values = rows.column(column)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):  # a list as one comparable string
        values = pc.binary_join(values.cast(pa.list_(pa.string())), "\x1f")
    counts = pa.table({"k": rows.column(key), "v": values}).group_by("k").aggregate([("v", "count_distinct")])
    return counts.num_rows == 0 or pc.max(counts.column("v_count_distinct")).as_py() <= 1


def _vocab(manifest, spec, column: str) -> list | None:
    """Position i: the raw value of id i, where the data set holds ids looked up in its vocabulary."""
    path = manifest.vocab_path(column)
    if spec.sparse[column].mode != "ids" or path is None:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def raw_values(manifest, spec, column: str, stored: pa.ChunkedArray) -> list:
    """The source files' values of a column as the data set stores it."""
    vocab = _vocab(manifest, spec, column)
    return stored.to_pylist() if vocab is None else [vocab[i] for i in stored.to_pylist()]


def id_encoder(manifest, spec, split: str, column: str):
    """raw user id (text) -> the value the data set's rows hold in `column`: its id where the set
    maps values through a vocabulary, else the value itself, typed as the column is."""
    vocab = _vocab(manifest, spec, column)
    ids = {str(v): i for i, v in reversed(list(enumerate(vocab)))} if vocab is not None else None
    kind = pq.read_schema(manifest.split(split).files[0].path).field(column).type

    def encode(raw: str):
        if ids is not None:
            if ids.get(raw, 0) == 0:  # id 0 is null or unknown, never a user
                raise DataError(f"--user {raw}: no such user in {manifest.root} ({len(vocab) - 1} users; "
                                "give the raw id of the source files)")
            return ids[raw]
        try:
            return pa.scalar(raw).cast(kind).as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"--user {raw}: no such user in {manifest.root} (its {column!r} holds {kind})") from None
    return encode


def user_history(manifest, train_split: str, cat: Catalogue, user, raw: str):
    """(the user's columns from their last row as a 1-row table, the items they have in
    `train_split`, the split the columns came from). Each split is scanned with a filter, so
    only the user's rows are held. A user without train rows takes the columns of their rows in
    another split, and has seen nothing."""
    import pyarrow.dataset as pads

    splits = [train_split, *(s for s in manifest.splits if s != train_split)]
    seen = np.zeros(0, np.int64)
    columns = list(dict.fromkeys([*cat.user_columns, cat.id_column]))
    for name in splits:
        files = [str(f.path) for f in manifest.split(name).files]
        rows = pads.dataset(files, format="parquet").to_table(
            columns=columns, filter=pads.field(cat.user_id_column) == user)
        if name == train_split:
            seen = rows.column(cat.id_column).to_numpy(zero_copy_only=False)
        if rows.num_rows:
            return rows.select(cat.user_columns).slice(rows.num_rows - 1, 1), seen, name
    raise DataError(f"--user {raw} has no rows in {manifest.root}, so their features are unknown")


def candidate_rows(spec, cat: Catalogue, candidates: pa.Table, user_row: pa.Table, manifest,
                   train_split: str) -> pa.Table:
    """One row per candidate item: the item's columns and the user's, with the training schema."""
    schema = pq.read_schema(manifest.split(train_split).files[0].path)
    repeat = pa.array(np.zeros(candidates.num_rows, np.int64))
    columns = {}
    for name in spec.columns:
        if name in cat.item_columns:
            col = candidates.column(name)
        elif name in cat.user_columns:
            col = user_row.column(name).take(repeat)
        else:
            raise DataError(f"the model reads column {name!r}, which is neither a user nor an item feature of "
                            f"{manifest.root}; wdl recommend cannot fill it")
        columns[name] = col.cast(schema.field(name).type)
    table = pa.table(columns)
    spec.check_schema(table.schema, f"{manifest.root} items x user")
    return table


def format_table(result: pa.Table, cat: Catalogue, show_seen: bool) -> str:
    """rank | item | score (| seen) (| title), one line per item."""
    width = max(8, len(cat.id_column))
    head = f"{'rank':>4} | {cat.id_column:>{width}} | {'score':>6}" + (" | seen" if show_seen else "")
    lines = [head + (" | title" if cat.title_column else "")]
    for r in result.to_pylist():
        line = f"{r['rank']:>4} | {str(r[cat.id_column]):>{width}} | {r['score']:.4f}"
        line += f" | {'yes' if r['seen'] else '':>4}" if show_seen else ""
        lines.append(line + (f" | {r['title']}" if cat.title_column else ""))
    return "\n".join(lines)
