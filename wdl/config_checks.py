"""The config tree's checks across fields and sections, run by `load_config` after the types are
checked: each failure is one ConfigError that names the key and what it accepts."""

from __future__ import annotations

import math

from wdl.config import (COMPILE_MODES, SHARDING_TYPES, Config, DataConfig, DeepConfig, DistributedConfig,
                        EarlyStoppingConfig, FeaturesConfig, ModelConfig, OptimConfig, ScheduleConfig)
from wdl.data.tables import model_reads
from wdl.errors import ConfigError


def validate(cfg: Config) -> None:
    _validate_run_name(cfg.run.name)
    sparse = _validate_features(cfg.features)
    _validate_model(cfg.model, cfg.features, sparse)
    _validate_distributed(cfg.distributed)
    _validate_training(cfg)
    _validate_selection(cfg.data, cfg.train.early_stopping)
    _validate_refit(cfg)
    _validate_schedule(cfg.optim.schedule, cfg.data)
    _validate_optim(cfg.optim)
    _validate_interaction(cfg.model.deep)


def _validate_run_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"run.name={name!r}: must be a plain folder name (no '/', not starting with '.'); "
                          "use run.out_dir for where runs go")


def _validate_features(features: FeaturesConfig) -> set[str]:
    """Columns and crosses; returns the names that give ids (sparse columns, bucketed dense ones)."""
    cols = features.columns
    sparse = {n for n, c in cols.items() if c.kind != "dense" or c.buckets is not None}
    if not 0 <= features.max_missing_fraction <= 1:
        raise ConfigError(f"features.max_missing_fraction: must be in [0, 1], got {features.max_missing_fraction}")
    for name, col in cols.items():
        where = f"features.columns.{name}"
        if col.kind == "dense":
            if col.fill is not None and not math.isfinite(col.fill):
                raise ConfigError(f"{where}.fill: must be a finite number (or null: the train mean), got {col.fill}")
            edges = col.buckets
            if isinstance(edges, list) and (not edges or any(b <= a for a, b in zip(edges, edges[1:]))):
                raise ConfigError(f"{where}.buckets: give strictly ascending edges (or auto), got {edges}")
            continue
        if col.buckets is not None:
            raise ConfigError(f"{where}.buckets: only dense columns are bucketed")
        given = [k for k in ("vocab_size", "hash_buckets", "vocab_file") if getattr(col, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"{where}: give exactly one of vocab_size, hash_buckets, vocab_file")
        if isinstance(col.vocab_size, str) and col.vocab_size != "auto":
            raise ConfigError(f"{where}.vocab_size: expected an integer or 'auto', got {col.vocab_size!r}")
        for k in ("vocab_size", "hash_buckets"):
            v = getattr(col, k)
            if isinstance(v, int) and v < 1:
                raise ConfigError(f"{where}.{k}: must be >= 1, got {v}")
    for name, cross in features.crosses.items():
        where = f"features.crosses.{name}"
        if name in cols:
            raise ConfigError(f"{where}: a column has the same name")
        if len(cross.columns) < 2:
            raise ConfigError(f"{where}: a cross needs at least two columns")
        for c in cross.columns:
            if c not in sparse:
                raise ConfigError(f"{where}: {c!r} is not a categorical or multi_hot column (or a dense one with buckets)")
        if sum(cols[c].kind == "multi_hot" for c in cross.columns) > 1:
            raise ConfigError(f"{where}: at most one multi_hot column per cross")
        if cross.hash_buckets < 1:
            raise ConfigError(f"{where}.hash_buckets: must be >= 1")
    return sparse


def _validate_model(m: ModelConfig, features: FeaturesConfig, sparse: set[str]) -> None:
    cols = features.columns
    wide_ok = sparse | set(features.crosses)
    for f in m.wide.features:
        if f not in wide_ok:
            raise ConfigError(f"model.wide.features: {f!r} is not a sparse column or cross")
    for f, dim in m.deep.embeddings.items():
        if f not in wide_ok:
            raise ConfigError(f"model.deep.embeddings: {f!r} is not a sparse column or cross")
        if dim < 1:
            raise ConfigError(f"model.deep.embeddings.{f}: dimension must be >= 1")
    for f in m.pooling:
        multi = features.crosses[f].columns if f in features.crosses else [f]
        if f not in wide_ok or not any(c in cols and cols[c].kind == "multi_hot" for c in multi):
            raise ConfigError(f"model.pooling: {f!r} is not a multi_hot column or a cross with one (only those "
                              "have several ids in a row to pool)")
    for f in m.deep.dense:
        if f not in cols or cols[f].kind != "dense":
            raise ConfigError(f"model.deep.dense: {f!r} is not a dense column")
    reads = model_reads(m)
    if reads.wide and not reads.wide_features:
        raise ConfigError(f"model.kind={m.kind} needs model.wide.features")
    if reads.deep and not (reads.deep_embeddings or reads.dense):
        raise ConfigError(f"model.kind={m.kind} needs model.deep.embeddings or model.deep.dense")
    if any(h < 1 for h in m.deep.hidden):
        raise ConfigError(f"model.deep.hidden: every layer needs >= 1 unit, got {m.deep.hidden}")
    if not 0.0 <= m.deep.dropout < 1.0:
        raise ConfigError(f"model.deep.dropout: must be in [0, 1), got {m.deep.dropout}")
    if not 0.0 <= m.deep.embedding_dropout < 1.0:
        raise ConfigError(f"model.deep.embedding_dropout: must be in [0, 1), got {m.deep.embedding_dropout}")


def _validate_distributed(d: DistributedConfig) -> None:
    """Sharding type names; which of them a device offers is placement's check (wdl.distributed.sharding)."""
    for where, kind in [("distributed.sharding", d.sharding), *((f"distributed.tables.{t}", k) for t, k in d.tables.items())]:
        allowed = SHARDING_TYPES if where != "distributed.sharding" else ("auto", *SHARDING_TYPES)
        if kind == "data_parallel":
            raise ConfigError(f"{where}: data_parallel replicates a table and all-reduces its whole gradient every "
                              f"step, a cost that grows with the table; use one of {', '.join(allowed)}")
        if kind not in allowed:
            raise ConfigError(f"{where}: {kind!r} is not one of {', '.join(allowed)}")


def _validate_training(cfg: Config) -> None:
    """Batches, epochs, steps, checkpoints and what each epoch reports."""
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.keep: must be >= 1")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {cfg.train.epochs}")
    t = cfg.train
    for where, n in (("train.max_steps", t.max_steps), ("checkpoint.every_steps", cfg.checkpoint.every_steps),
                     ("data.num_workers", cfg.data.num_workers), ("train.log_every_steps", t.log_every_steps),
                     ("train.eval_every_steps", t.eval_every_steps), ("train.eval_max_rows", t.eval_max_rows),
                     ("train.divergence_ratio", t.divergence_ratio)):
        if n < 0:
            raise ConfigError(f"{where}: must be >= 0, got {n}")
    if cfg.train.eval_only and not (cfg.checkpoint.resume or cfg.train.init_from):
        raise ConfigError("train.eval_only=true evaluates a checkpoint: give it with checkpoint.resume=PATH (or --resume), "
                          "or train.init_from=RUN (--init-from: its tables grown to this data set)")
    if cfg.train.ranking_group:
        g, m, cols = cfg.train.ranking_group, cfg.model, cfg.features.columns
        if g not in cols or cols[g].kind != "categorical" or g not in model_reads(m).sparse:
            raise ConfigError(f"train.ranking_group={g!r}: must be a categorical column the model reads "
                              "(in model.wide.features or model.deep.embeddings)")
        if cfg.train.ranking_k < 1:
            raise ConfigError(f"train.ranking_k: must be >= 1, got {cfg.train.ranking_k}")
    if cfg.train.compile not in COMPILE_MODES:
        raise ConfigError(f"train.compile: {cfg.train.compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if cfg.train.cuda_graph and (cfg.train.compile != "none" or cfg.model.embedding_backend == "torchrec"):
        raise ConfigError("train.cuda_graph=true captures wdl's own step: it needs model.embedding_backend=torch "
                          "and train.compile=none")


def _validate_optim(optim: OptimConfig) -> None:
    for part in ("wide", "deep"):
        o = getattr(optim, part)
        if not o.lr > 0:
            raise ConfigError(f"optim.{part}.lr: must be > 0, got {o.lr}")
        for k in ("weight_decay", "l1", "l2", "beta", "initial_accumulator_value"):
            if getattr(o, k) < 0:
                raise ConfigError(f"optim.{part}.{k}: must be >= 0, got {getattr(o, k)}")
        if not o.eps > 0:
            raise ConfigError(f"optim.{part}.eps: must be > 0, got {o.eps}")
        if o.name != "ftrl" and o.l1:  # would be silently ignored
            raise ConfigError(f"optim.{part}.l1 is FTRL's; with {o.name} use optim.{part}.l2 (a prior on the "
                              "table rows) or weight_decay (L2 on the rows a step touches)")


def _validate_selection(d: DataConfig, es: EarlyStoppingConfig) -> None:
    if d.valid_split and d.valid_fraction:
        raise ConfigError("data.valid_split and data.valid_fraction: give one (a split of the data set, or a share "
                          "of the train split to hold out)")
    if not 0 <= d.max_unknown_fraction <= 1:
        raise ConfigError(f"data.max_unknown_fraction: must be in [0, 1], got {d.max_unknown_fraction}")
    if not d.loader_timeout_s > 0:
        raise ConfigError(f"data.loader_timeout_s: must be > 0, got {d.loader_timeout_s}")
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction: must be in [0, 1), got {d.valid_fraction}")
    if d.valid_split and d.valid_split in (d.train_split, d.eval_split):
        raise ConfigError(f"data.valid_split={d.valid_split!r} is also the train or eval split; selecting the "
                          "epoch on it would make the reported numbers optimistic")
    if es.patience < 0 or es.min_delta < 0:
        raise ConfigError("train.early_stopping: patience and min_delta must be >= 0")
    if es.patience and not (d.valid_split or d.valid_fraction):
        raise ConfigError("train.early_stopping.patience needs a validation split: set data.valid_split or "
                          "data.valid_fraction (stopping on the test split would select on it)")


def _validate_refit(cfg: Config) -> None:
    """train.refit retrains on the rows a held-out fraction took, for the epochs chosen on them."""
    if not cfg.train.refit:
        return
    d, t = cfg.data, cfg.train
    if d.valid_split or not d.valid_fraction:
        raise ConfigError("train.refit retrains on the train rows data.valid_fraction held out: set data.valid_fraction, "
                          "or train.refit=false (a valid split of its own, data.valid_split, is not trained on)")
    if t.eval_every_steps:
        raise ConfigError("train.refit trains the epochs chosen on validation: evaluate at epoch ends (train.eval_every_steps=0)")
    if cfg.optim.schedule.plateau_factor < 1:
        raise ConfigError("train.refit cannot repeat optim.schedule's plateau decays: the refit has no validation to decay on")
    if t.eval_only or t.max_steps:
        raise ConfigError("train.refit trains whole epochs after a full run: not with train.eval_only or train.max_steps")


def _validate_schedule(sc: ScheduleConfig, d: DataConfig) -> None:
    if sc.warmup_steps < 0:
        raise ConfigError(f"optim.schedule.warmup_steps: must be >= 0, got {sc.warmup_steps}")
    if not 0 < sc.plateau_factor <= 1:
        raise ConfigError(f"optim.schedule.plateau_factor: must be in (0, 1], got {sc.plateau_factor}")
    if sc.plateau_patience < 1:
        raise ConfigError(f"optim.schedule.plateau_patience: must be >= 1, got {sc.plateau_patience}")
    if not 0 <= sc.min_scale <= 1:
        raise ConfigError(f"optim.schedule.min_scale: must be in [0, 1], got {sc.min_scale}")
    if sc.plateau_factor < 1 and not (d.valid_split or d.valid_fraction):
        raise ConfigError("optim.schedule.plateau_factor needs a validation split: set data.valid_split or "
                          "data.valid_fraction (decaying on the test split would tune on it)")


def _validate_interaction(deep: DeepConfig) -> None:
    """Pairs name two different embedded features of one dimension; all pairs need one dimension."""
    dims = deep.embeddings
    if deep.interaction == "none":
        if deep.interaction_pairs:
            raise ConfigError("model.deep.interaction_pairs is set but model.deep.interaction=none; "
                              "set model.deep.interaction=dot or fm")
        return
    where = f"model.deep.interaction={deep.interaction}"
    for i, pair in enumerate(deep.interaction_pairs):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigError(f"model.deep.interaction_pairs[{i}]: expected two different features, got {pair}")
        missing = [f for f in pair if f not in dims]
        if missing:
            raise ConfigError(f"model.deep.interaction_pairs[{i}]: {', '.join(missing)} not in model.deep.embeddings")
        if dims[pair[0]] != dims[pair[1]]:
            raise ConfigError(f"model.deep.interaction_pairs[{i}]: {pair[0]} (dim {dims[pair[0]]}) and {pair[1]} "
                              f"(dim {dims[pair[1]]}) need the same embedding dimension")
    if len({tuple(sorted(p)) for p in deep.interaction_pairs}) != len(deep.interaction_pairs):
        raise ConfigError("model.deep.interaction_pairs: a pair is listed twice")
    if deep.interaction_pairs:
        return
    if len(dims) < 2:
        raise ConfigError(f"{where} needs at least two features in model.deep.embeddings, got {len(dims)}")
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{f} {d}" for f, d in dims.items())
        raise ConfigError(f"{where} over all pairs needs one embedding dimension, got {listed}; make them equal "
                          "or name pairs of equal dimension in model.deep.interaction_pairs")
