"""Warm start (`train.init_from`, `wdl train --init-from RUN_OR_CHECKPOINT`): a new run whose
model starts as another run's trained one, on a data set whose vocabularies may have grown.

A data set written with `wdl data import --vocab-from` (or `wdl data generate --days`) keeps every
known value's id and numbers new values after the old ones, so every table only grows at its end.
In wdl's fused tables each feature is a block of rows at its offset (the wide group ends with its
bias row), so growing one feature moves the blocks after it; TorchRec's tables are one per feature.

What is carried, row by row: the weights and optimiser state of every old row (FTRL's z and n,
AdaGrad's sums, lazy Adam's moments and step count, FBGEMM's momentum), the dense layers and their
optimiser state. New rows keep what this run's own initialisation gave them (the seeded
initialiser, zero or initial optimiser state): what a fresh run has. Progress counters, model
selection, the schedule and the loss sums start afresh: this is a new run at step 0.

It works from and to any world size and either backend (the same one on both sides): DCP's metadata
gives each saved tensor's global shape; a tensor of the same shape loads as a resume loads it
(resharded by DCP); a grown one is read whole, one table at a time, and each rank copies the old
rows into the rows it holds. What cannot be honoured is refused in one line: another model shape,
another optimiser, a table that shrank, a hashed table whose size changed, a column whose kind or
id source changed, a vocabulary that renumbers a known value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from wdl.checkpoint import _dcp_load, find_checkpoint, read_metadata
from wdl.config import Config
from wdl.data.features import FeatureSpec
from wdl.data.tables import model_reads
from wdl.errors import CheckpointError, ConfigError

CARRIED = ("model", "optim")  # the states (Trainer._states) a warm start takes from the checkpoint
TABLE_KEYS = ("wide_tables", "deep_tables")  # the signature's parts a warm start may grow


@dataclass(frozen=True)
class RowSpace:
    """The rows of one stored table: a wdl fused group (features in blocks at offsets, the bias
    row last) or one TorchRec table. `pattern` finds the state keys holding its rows (weights and
    optimiser state); old/new: rows per feature in the checkpoint and in this run."""

    name: str
    pattern: re.Pattern
    old: tuple[int, ...]
    new: tuple[int, ...]
    bias: bool
    fresh: tuple[tuple[int, ...], ...] = ()  # per feature, ids recycled since (rows started afresh)

    @property
    def old_rows(self) -> int:
        return sum(self.old) + self.bias

    @property
    def new_rows(self) -> int:
        return sum(self.new) + self.bias

    def source_rows(self) -> Tensor:
        """[new_rows]: the checkpoint's row each row of this run starts from, -1 for a new row."""
        src = torch.full((self.new_rows,), -1, dtype=torch.int64)
        o = n = 0
        for k, (a, b) in enumerate(zip(self.old, self.new)):
            src[n:n + a] = torch.arange(o, o + a)
            if k < len(self.fresh) and self.fresh[k]:
                src[n + torch.tensor(self.fresh[k], dtype=torch.int64)] = -1
            o, n = o + a, n + b
        if self.bias:
            src[n] = o
        return src


def warm_start(cfg: Config, spec: FeatureSpec, manifest: Any, signature: dict[str, Any], states: dict[str, Any],
               backend: str, is_main: bool) -> Path:
    """Fill the model and optimiser `states` (Trainer._states) from cfg.train.init_from; returns
    the checkpoint used."""
    src = cfg.train.init_from
    if src == "auto":
        raise ConfigError("train.init_from takes another run's folder, its checkpoints folder or a checkpoint; "
                          "`auto` is for checkpoint.resume (this run's own)")
    if not Path(src).exists():
        raise CheckpointError(f"--init-from {src}: no such folder (give a run folder, its checkpoints folder or a checkpoint)")
    path = find_checkpoint(src, Path(src))
    meta = json.loads((path / "meta.json").read_text())
    _check_columns(path, cfg, spec)
    _check_ids(path, meta, manifest, is_main)
    recycled = recycled_since(manifest, (meta.get("read_order") or {}).get("data set (manifest hash)"), path)
    spaces = row_spaces(cfg, backend, meta.get("signature", {}), signature, spec, path, recycled)

    app = {k: states[k].state_dict() for k in CARRIED}
    grown = load_grown(path, app, spaces)
    for k in CARRIED:
        states[k].load_state_dict(app[k])
    if is_main:
        what = ", ".join(f"{s.name} {s.old_rows:,} -> {s.new_rows:,}" for s in spaces if s.new != s.old)
        reset = ", ".join(f"{c} {len(ids):,}" for c, ids in recycled.items() if ids)
        print(f"wdl: warm start from {path} (its step {meta.get('step')}): model and optimiser state carried"
              + (f"; rows grown: {what}" if what else "; no table grew")
              + (f"; rows of recycled ids started afresh: {reset}" if reset else "") + f" ({grown} tensors rewritten)",
              flush=True)
    return path


def row_spaces(cfg: Config, backend: str, old: dict[str, Any], new: dict[str, Any], spec: FeatureSpec,
               path: Path, recycled: dict[str, set[int]] | None = None) -> list[RowSpace]:
    """The tables of this model with their rows then and now (and per feature the `recycled`
    ids, whose rows start afresh), after refusing what a warm start cannot honour: another model
    shape, a table that shrank or whose (hashed) size changed."""
    for key in sorted((set(old) | set(new)) - set(TABLE_KEYS)):
        if old.get(key) != new.get(key):
            raise CheckpointError(f"--init-from {path} holds another model: {key} is {old.get(key)} there, "
                                  f"{new.get(key)} now (a warm start grows tables, nothing else)")
    rows_then = {f: r for f, r in old.get("wide_tables", {}).items()} | \
        {f"deep:{f}": rd[0] for f, rd in old.get("deep_tables", {}).items()}
    rows_now = {f: r for f, r in new["wide_tables"].items()} | {f"deep:{f}": rd[0] for f, rd in new["deep_tables"].items()}
    if set(rows_then) != set(rows_now):
        raise CheckpointError(f"--init-from {path} holds another model: its tables read "
                              f"{_names(rows_then)}, this model's {_names(rows_now)}")
    for f, (_, d_new) in new["deep_tables"].items():
        if old["deep_tables"][f][1] != d_new:
            raise CheckpointError(f"--init-from {path} holds another model: deep_{f} has dim "
                                  f"{old['deep_tables'][f][1]} there, {d_new} now")
    for key, n in rows_now.items():
        f, o = key.removeprefix("deep:"), rows_then[key]
        fixed = f in spec.crosses or spec.sparse[f].mode in ("hash", "buckets")
        if fixed and n != o:
            raise CheckpointError(f"--init-from {path}: {f} has {o:,} hashed rows there, {n:,} now; a changed hash size "
                                  "gives every value another row (train it afresh)")
        if n < o:
            raise CheckpointError(f"--init-from {path}: {f} has {o:,} rows there, {n:,} now; a warm start grows "
                                  "vocabularies, it never shrinks them (import with --vocab-from the earlier data set)")

    reads = model_reads(cfg.model)
    ids = lambda feats: tuple(tuple(sorted((recycled or {}).get(f, ()))) for f in feats)  # noqa: E731
    out = []
    if reads.wide:
        feats = list(reads.wide_features)
        out.append(RowSpace("wide", _keys(r"wide\.embeddings"), tuple(rows_then[f] for f in feats),
                            tuple(rows_now[f] for f in feats), bias=True, fresh=ids(feats)))
    if reads.deep and backend == "torchrec":
        out += [RowSpace(f"deep_{f}", _keys(re.escape(f"deep_{f}")), (rows_then[f"deep:{f}"],),
                         (rows_now[f"deep:{f}"],), bias=False, fresh=ids([f])) for f in reads.deep_embeddings]
    elif reads.deep:
        by_dim: dict[int, list[str]] = {}  # FusedEmbeddingBags: one group per dim, in first-seen order
        for f, d in reads.deep_embeddings.items():
            by_dim.setdefault(d, []).append(f)
        out += [RowSpace(f"deep dim {d}", _keys(rf"deep\.embeddings\.groups\.{i}"),
                         tuple(rows_then[f"deep:{f}"] for f in feats), tuple(rows_now[f"deep:{f}"] for f in feats),
                         bias=False, fresh=ids(feats)) for i, (d, feats) in enumerate(by_dim.items())]
    return out


def _keys(name: str) -> re.Pattern:
    return re.compile(rf"(^|\.){name}\.")


def _names(rows: dict[str, int]) -> str:
    return ", ".join(sorted(k.replace("deep:", "deep ") for k in rows)) or "none"


def load_grown(path: Path, app: dict[str, Any], spaces: list[RowSpace]) -> int:
    """Fill `app` (nested state dicts) from the checkpoint at `path`: same-shaped values as DCP
    loads them; each grown table's tensors read whole and copied row by row. Returns how many grown."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = read_metadata(path / ".metadata").state_dict_metadata
    flat, mapping = flatten_state_dict(app)
    same, grown = {}, []
    for key, value in flat.items():
        md = saved.get(key)
        if md is None:
            raise CheckpointError(f"--init-from {path} has no {key}: saved with another optimiser (optim.*.name) "
                                  "or model")
        shape = tuple(value.size()) if isinstance(value, Tensor) else None  # global, for split tensors too
        if shape is None or not isinstance(md, TensorStorageMetadata) or tuple(md.size) == shape:
            same[key] = value
            continue
        space = next((s for s in spaces if s.pattern.search(key)), None)
        if space is None or tuple(md.size)[1:] != shape[1:] or md.size[0] != space.old_rows or shape[0] != space.new_rows:
            raise CheckpointError(f"--init-from {path}: {key} is {list(md.size)} there, {list(shape)} now, "
                                  "which no table's growth explains")
        grown.append((key, value, md, space))
    _dcp_load(path, same)
    for key, value in same.items():  # DCP fills tensors in place; other values are replaced
        set_element(app, mapping[key], value)
    # One old table in memory at a time. Each load is collective and ranks may hold different keys
    # (TorchRec keeps a table's optimiser state on the ranks of its shards): every rank takes part
    # in a load per key any rank grows, with nothing to read where it holds none of it.
    mine = {key: rest for key, *rest in grown}
    for key in _union(sorted(mine)):
        if key not in mine:
            _dcp_load(path, {})
            continue
        value, md, space = mine[key]
        old = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        _dcp_load(path, {key: old})
        _copy_rows(old, value, space.source_rows())
    return len(grown)


def _union(keys: list[str]) -> list[str]:
    """Every rank's `keys`, sorted, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, keys)
    return sorted(set().union(*parts))


@torch.no_grad()
def _copy_rows(old: Tensor, new: Any, src: Tensor) -> None:
    """Into each piece of `new` this rank holds, the rows of `old` that `src` maps them from."""
    for local, offsets in _local_pieces(new):
        if local.numel() == 0:
            continue
        s = src[offsets[0]:offsets[0] + local.shape[0]]
        keep = (s >= 0).nonzero().squeeze(1)
        rows = old.index_select(0, s[keep])
        if local.dim() > 1:  # a column-wise shard holds some of the columns
            rows = rows[:, offsets[1]:offsets[1] + local.shape[1]]
        local.index_copy_(0, keep.to(local.device), rows.to(local.device, local.dtype))


def _local_pieces(t: Any) -> list[tuple[Tensor, tuple[int, ...]]]:
    """(tensor, its global offsets) of each piece of `t` held here: a DTensor's local block,
    a ShardedTensor's local shards (TorchRec), or a whole plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        chunks = t.__create_chunk_list__()
        return [(t.to_local(), tuple(chunks[0].offsets))] if chunks else []
    if hasattr(t, "local_shards"):
        return [(s.tensor, tuple(s.metadata.shard_offsets)) for s in t.local_shards()]
    return [(t, (0,) * t.dim())]


# --- what the ids mean ------------------------------------------------------------------------

def _check_columns(path: Path, cfg: Config, spec: FeatureSpec) -> None:
    """A column read with another kind or id source than in the run that saved `path` (its
    config.yaml, when the checkpoint lies in a run folder) is refused."""
    saved = path.parent.parent / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = (yaml.safe_load(saved.read_text()) or {}).get("features", {}).get("columns", {}) or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return
    for name in spec.sparse:
        then, now = old.get(name), cfg.features.columns[name]
        if not isinstance(then, dict):
            continue
        kind = then.get("kind", "categorical")
        if kind != now.kind:
            raise CheckpointError(f"--init-from {path}: column {name} is {kind} there, {now.kind} now (its rows "
                                  "would be read another way)")
        source = lambda c: "hash_buckets" if c.get("hash_buckets") is not None else "ids"  # noqa: E731
        if source(then) != source({"hash_buckets": now.hash_buckets}):
            raise CheckpointError(f"--init-from {path}: column {name} is {'hashed' if source(then) == 'hash_buckets' else 'looked up'} "
                                  f"there, {'hashed' if now.hash_buckets is not None else 'looked up'} now: its ids mean other values")


def _check_ids(path: Path, meta: dict[str, Any], manifest: Any, is_main: bool) -> None:
    """The checkpoint's data set must be this one or an ancestor (`lineage` of a data set written
    with --vocab-from / --days): then every known value kept its id. Otherwise each vocabulary
    of the earlier data set (found through the run's config) must be a prefix of this one's."""
    then = (meta.get("read_order") or {}).get("data set (manifest hash)")
    if then is None or then == manifest.identity or then in manifest.raw.get("lineage", []):
        return
    earlier = _earlier_data_set(path, then)
    if earlier is None:
        if is_main:
            print(f"wdl: warning: --init-from {path} was trained on another data set ({then}), which is not an ancestor "
                  f"of {manifest.root} and was not found: that its ids mean the same values is not checked",
                  flush=True)
        return
    for name, col in earlier.columns.items():
        a, b = earlier.vocab_path(name), manifest.vocab_path(name)
        if a is None or b is None:
            continue
        old, new = json.loads(a.read_text()), json.loads(b.read_text())
        if new[:len(old)] != old:
            i = next((i for i, (x, y) in enumerate(zip(old, new)) if x != y), len(new))
            raise CheckpointError(f"--init-from {path}: column {name}'s vocabulary is not an extension of the one "
                                  f"trained on (id {i} was {old[i]!r} there, {new[i] if i < len(new) else 'absent'!r} "
                                  f"now); import with --vocab-from {earlier.root}")


def recycled_since(manifest: Any, identity: str | None, path: Path) -> dict[str, set[int]]:
    """Per column, the ids given to other values (bounded vocabularies: wdl/ingest/vocab_from.py)
    in the data sets after the one with `identity`, up to `manifest`: found through each one's parent."""
    from wdl.data.manifest import load_manifest
    from wdl.errors import DataError

    out: dict[str, set[int]] = {}
    m = manifest
    while identity is not None and m.identity != identity and identity in m.raw.get("lineage", []):
        for col, ids in m.raw.get("recycled", {}).items():
            out.setdefault(col, set()).update(ids)
        parent = m.raw.get("parent")
        if not parent:
            break
        try:
            m = load_manifest(parent["path"])
        except DataError as e:
            raise CheckpointError(f"--init-from {path}: the data set {m.root} descends from cannot be read, so the ids "
                                  f"recycled since are unknown ({e})") from None
    return out


def _earlier_data_set(path: Path, identity: str) -> Any:
    from wdl.data.manifest import load_manifest
    from wdl.errors import DataError

    saved = path.parent.parent / "config.yaml"
    try:
        where = (yaml.safe_load(saved.read_text()) or {}).get("data", {}).get("path")
        m = load_manifest(where) if where else None
    except (OSError, yaml.YAMLError, AttributeError, DataError):
        return None
    return m if m is not None and m.identity == identity else None
