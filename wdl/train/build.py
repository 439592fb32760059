"""Building the placed model from config + feature spec, for the trainer, predict and `wdl plan`
alike: the tables come from their one description (wdl.data.tables), and TorchRec's planner is
built one way (wdl.distributed.planning), so the plan.txt of a run is the plan `wdl plan` prints
for the same ranks, memory and batch size."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from typing import Any

import torch

from wdl.config import Config, ModelConfig
from wdl.data.features import FeatureSpec
from wdl.data.tables import model_reads, tables
from wdl.distributed.env import DistEnv
from wdl.distributed.planning import GIB, Hardware, budget, report, table_sizes, torchrec_planner
from wdl.distributed.sharding import check_placement, place
from wdl.errors import ConfigError
from wdl.model.embeddings import TorchRecEmbeddingBags, resolve_backend, torchrec_available
from wdl.model.wide_deep import WideDeep, WideDeepTrain
from wdl.train.optim import fused_table_optimizer


def check_run(cfg: Config, env: DistEnv, backend: str) -> None:
    """A ConfigError (one line) for what this run asks and its device, backend or packages cannot
    give; checked before any data is touched."""
    deep_tables = [f"deep_{f}" for f in cfg.model.deep.embeddings] if backend == "torchrec" else []
    check_placement(cfg.distributed, deep_tables, env)
    device = env.device
    if cfg.train.cuda_graph and (device.type != "cuda" or backend != "torch" or env.world_size > 1):
        raise ConfigError(f"train.cuda_graph=true needs one process on a CUDA device with model.embedding_backend="
                          f"torch; this run has {env.world_size} process(es) on {device}, {backend} tables")
    if cfg.train.compile != "none" and device.type == "cpu" and cpu_compiler() is None:
        raise ConfigError(f"train.compile={cfg.train.compile} on a CPU needs a C++ compiler (g++, c++ or "
                          "clang++ on PATH, or $CXX); install one or set train.compile=none")
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, if there is one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def deep_fused_optimizer(cfg: Config, env: DistEnv, backend: str) -> Any:
    """FBGEMM's optimiser for TorchRec's deep tables (None without them); a ConfigError for one
    FBGEMM lacks, so it fails before anything is built."""
    if backend != "torchrec" or not model_reads(cfg.model).deep:
        return None
    return fused_table_optimizer(cfg.optim.deep, env.device.type, "deep")


def build_model(cfg: Config, spec: FeatureSpec, env: DistEnv, backend: str,
                fused: Any) -> tuple[WideDeep, ModelConfig, Any]:
    """The model (tables described on the meta device) and its placement on this rank. On rank 0
    `placed.plan` is the plan as `wdl plan` renders it (where TorchRec, whose estimates it uses,
    is installed; else placement's own description)."""
    from wdl.distributed.plan_report import render

    sizes = {k: spec.num_embeddings(k) for k in spec.sparse_keys}
    model_cfg = dataclasses.replace(cfg.model, embedding_backend=backend)
    model = WideDeep(model_cfg, sizes, spec.dense_dim, device=env.device, table_device=torch.device("meta"))
    described = tables(cfg, sizes, backend)
    planned = torchrec_available()
    hw = run_hardware(env) if planned else None
    room = budget(cfg, hw, model, described) if planned else None
    chosen: list = []
    planner = torchrec_planner(cfg, hw, described, cfg.data.batch_size, room, chosen) \
        if any(t.owner == "torchrec" for t in described) else None
    placed = place(WideDeepTrain(model), cfg.distributed, env, seed=cfg.run.seed,
                   row_bytes={t.name: t.bytes_per_row for t in described}, fused=fused, planner=planner)
    if planned and env.is_main:
        placed.plan = render(report(cfg, hw, model, described, room, chosen[0] if chosen else [],
                                    batch_size=cfg.data.batch_size, dtype="fp32", backend=backend))
    return model, model_cfg, placed


def run_hardware(env: DistEnv) -> Hardware:
    """This run's ranks and memory as `wdl plan` takes them: on CUDA the device's free memory, on
    CPU the host's available memory shared by its local ranks (as the memory check counts it).
    Rank 0 measures and every rank plans with its numbers, so all ranks agree."""
    from wdl.distributed.rows import available_bytes

    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    host = available_bytes(torch.device("cpu")) / local
    hbm = available_bytes(env.device) if env.device.type == "cuda" else 0.0
    box = [(hbm / GIB, host / GIB)]
    if env.distributed:
        torch.distributed.broadcast_object_list(box, src=0)
    hbm_gib, ddr_gib = box[0]
    return Hardware(env.device.type, env.world_size, local, hbm_gib=hbm_gib, ddr_gib=ddr_gib)


def plan(cfg: Config, hw: Hardware, *, batch_size: int, dtype: str = "fp32",
         table_rows: dict[str, int] | None = None) -> dict[str, Any]:
    """`wdl plan`: the placement and step estimate a run on `hw` would get, without data or
    devices (the model on `meta`); a plain dict (the --json output)."""
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.modules.embedding_configs import DataType

    backend = resolve_backend(cfg.model.embedding_backend)
    sizes = table_sizes(cfg, table_rows or {})
    meta = torch.device("meta")
    model = WideDeep(dataclasses.replace(cfg.model, embedding_backend=backend), sizes,
                     len(model_reads(cfg.model).dense), device=meta, table_device=meta)
    described = tables(cfg, sizes, backend, dtype)
    room = budget(cfg, hw, model, described)
    chosen: list = []
    emb = model.deep.embeddings if model.deep is not None else None
    if isinstance(emb, TorchRecEmbeddingBags):
        for c in emb.ebc.embedding_bag_configs():
            c.data_type = DataType.FP16 if dtype == "fp16" else DataType.FP32
        opt_cls, opt_args = fused_table_optimizer(cfg.optim.deep, hw.device, "deep")
        _apply_optimizer_in_backward(opt_cls, emb.ebc.parameters(), opt_args)  # the storage estimator reads it
        planner = torchrec_planner(cfg, hw, described, batch_size, room, chosen)
        try:
            planner.plan(WideDeepTrain(model), [EmbeddingBagCollectionSharder()])
        except PlannerError as e:
            raise ConfigError(f"{room.short}; TorchRec's planner found no placement for the tables one by one "
                              f"({str(e).splitlines()[0].strip()}); use more ranks or smaller tables") from None
    return report(cfg, hw, model, described, room, chosen[0] if chosen else [], batch_size=batch_size, dtype=dtype,
                  backend=backend)


def model_signature(m: ModelConfig, spec: FeatureSpec) -> dict[str, Any]:
    """What a checkpoint must agree on to be loaded: the model's shape, and what each row of a
    table means (a cross over other columns with the same bucket count has the same shape)."""
    rows, reads = spec.num_embeddings, model_reads(m)
    return {
        "crosses": {k: c.columns for k, c in spec.crosses.items()},
        "layout": 2,  # fused wide/deep tables with row optimiser state (earlier: a table per feature)
        "kind": m.kind,
        "backend": m.embedding_backend,
        "wide_tables": {f: rows(f) for f in reads.wide_features},
        "deep_tables": {f: [rows(f), d] for f, d in reads.deep_embeddings.items()},
        "dense_dim": spec.dense_dim if reads.deep else 0,
        # which dense inputs are missing indicators; left out when none, so older checkpoints load
        **({"missing_indicators": spec.missing_columns} if reads.deep and spec.missing_columns else {}),
        "hidden": list(m.deep.hidden) if reads.deep else [],
        # dot widens the MLP input, fm changes the logit; left out for none so older checkpoints load
        **({"interaction": [m.deep.interaction, m.deep.interaction_pairs]}
           if reads.deep and m.deep.interaction != "none" else {}),
    }
