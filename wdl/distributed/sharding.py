"""Model placement across ranks: the ONLY module that imports torchrec.distributed.

The model is built with its embedding tables on the `meta` device (described, not allocated);
placement gives every rank its part and initialises it, so no table ever exists whole on one
host:

1. wdl's fused embedding groups (the wide part always; the deep part with the torch backend):
   one process keeps all rows (`LocalRows`); W ranks split them row-wise with wdl's own
   all-to-all (`wdl.distributed.rows.ShardedRows`), so any row optimiser (FTRL included)
   stays sparse and sharded. Memory is checked before anything is allocated.
2. TorchRec tables (the deep part with the torchrec backend), in TorchRec's order: FBGEMM
   optimiser applied in backward -> planner -> DistributedModelParallel (dense layers in DDP
   when there are several ranks)
   -> each local shard initialised from wdl.model.init.
3. Otherwise the dense layers go into DDP (world size > 1). Neither DDP sees the fused groups'
   rows: each rank's rows are its own, and their updates never need an all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wdl.config import SHARDING_TYPES, DistributedConfig
from wdl.data.tables import LOCAL_SCRATCH_BYTES
from wdl.distributed.env import DistEnv
from wdl.distributed.rows import ShardedRows, block, check_memory
from wdl.errors import ConfigError
from wdl.model.embeddings import LocalRows, TorchRecEmbeddingBags
from wdl.model.init import normal_block
from wdl.model.wide_deep import WideDeepTrain


def allowed_sharding(kind: str, where: str, device_type: str) -> list[str]:
    """The sharding types TorchRec's planner may choose from for a table asked to be `kind`
    (`auto`: any the device supports) on `device_type`; a ConfigError naming `where` when the
    device lacks it. Row-wise types need CUDA (FBGEMM's CPU kernels lack them); data_parallel is
    never one (it replicates a table and all-reduces its whole gradient every step)."""
    supported = SHARDING_TYPES if device_type == "cuda" else tuple(t for t in SHARDING_TYPES if "row" not in t)
    if kind == "auto":
        return list(supported)
    if kind not in supported:
        raise ConfigError(f"{where}={kind} needs CUDA; on CPU (gloo) TorchRec offers only {', '.join(supported)}")
    return [kind]


@dataclass
class Placed:
    """What `place` returns.

    model: the module the trainer calls (DistributedModelParallel, DDP or the module itself);
    state_module: the module whose state_dict is checkpointed (the same keys at any world size);
    fused_optimizer: TorchRec's in-backward optimiser of its tables, or None;
    plan: a readable description of where every table lives.
    """

    model: nn.Module
    state_module: nn.Module
    fused_optimizer: Any
    plan: str


def check_placement(cfg: DistributedConfig, deep_table_names: list[str], env: DistEnv) -> None:
    """What can be refused before any data is read: CUDA-only sharding types on CPU, and
    per-table settings for tables TorchRec does not place."""
    for table in cfg.tables:
        if table not in deep_table_names:
            raise ConfigError(
                f"distributed.tables.{table}: not a TorchRec table (those are the deep tables with "
                f"model.embedding_backend=torchrec: {', '.join(deep_table_names) or 'none here'}); wide tables are "
                "one fused table that wdl splits row-wise over the ranks"
            )
    for table in ["", *cfg.tables]:  # "": the default, distributed.sharding
        allowed_sharding(*cfg.sharding_of(table), env.device.type)


def place(train_module: WideDeepTrain, cfg: DistributedConfig, env: DistEnv, *, seed: int,
          row_bytes: dict[str, int], fused: tuple[type, dict[str, Any]] | None = None, planner: Any = None) -> Placed:
    """Give every rank its part of the model and initialise it.

    row_bytes: table name -> bytes per row, weights and optimiser state (wdl.data.tables), for
    the memory check; fused: the optimiser class and args FBGEMM applies to TorchRec's tables;
    planner: TorchRec's planner for them (wdl.distributed.planning.torchrec_planner).
    """
    model = train_module.model
    groups = [(part, g) for part, p in model.parts().items() for g in p.tables]

    # 1. wdl's fused groups: this rank's rows, after checking they fit.
    need, detail, mib = 0, [], {}
    for part, g in groups:
        lo, hi = block(g.num_rows, env.world_size, env.rank)
        scratch = 0 if env.distributed else LOCAL_SCRATCH_BYTES
        n = (hi - lo) * (row_bytes[g.tables[0].name] + scratch)  # a group's tables share dim and optimiser
        need += n
        mib[id(g)] = n / 2**20
        detail.append(f"{part} dim {g.dim}: {hi - lo:,} rows, {n / 2**20:,.0f} MiB")
    # Every GPU has memory of its own; ranks on CPU share their host's.
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) if env.device.type == "cpu" else 1
    check_memory(need, "; ".join(detail), env.device, env.world_size, sharing)
    for _, g in groups:
        g.rows = (ShardedRows(g.num_rows, g.dim, torch.distributed.GroupMember.WORLD, env.device)
                  if env.distributed else LocalRows(g.num_rows, g.dim, env.device))
    model.init_parameters(seed)  # dense layers and the fused groups' rows held here
    own_rows = [n for n, p in train_module.named_parameters() if not p.requires_grad]
    plan = [_describe_group(part, g, env, mib[id(g)]) for part, g in groups]

    # 2. TorchRec's tables.
    emb = model.deep.embeddings if model.deep is not None else None
    if isinstance(emb, TorchRecEmbeddingBags):
        return _torchrec(train_module, emb, env, fused, planner, own_rows, seed, plan)

    # 3. Dense layers in DDP.
    wrapped: nn.Module = train_module
    if env.distributed:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(train_module, own_rows)
        ids = [env.device] if env.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(train_module, device_ids=ids, broadcast_buffers=False)
        plan.append(f"dense layers: DDP over {env.world_size} ranks")
    return Placed(wrapped, train_module, None, "\n".join(plan))


def _describe_group(part: str, g: nn.Module, env: DistEnv, mib: float) -> str:
    lo, hi = g.rows.row_range
    tables = ", ".join(f"{t.name} ({t.num_embeddings:,})" for t in g.tables)
    if g.bias_row is not None:
        tables += ", bias (1)"
    where = (f"rows split over {env.world_size} ranks, rank {env.rank} holds [{lo:,}, {hi:,})"
             if env.distributed else "all rows on this rank")
    return f"wdl fused {part} table, dim {g.dim}, {g.num_rows:,} rows: {where}, {mib:,.1f} MiB with optimiser state; {tables}"


def _torchrec(train_module: WideDeepTrain, emb: TorchRecEmbeddingBags, env: DistEnv,
              fused: tuple[type, dict[str, Any]] | None, planner: Any, own_rows: list[str], seed: int,
              plan: list[str]) -> Placed:
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.distributed.types import ShardingEnv

    if fused is None or planner is None:
        raise ValueError("TorchRec tables need their FBGEMM optimiser (fused) and a planner")
    # 1. FBGEMM's optimiser, applied in the backward pass (the planner's storage estimate reads it).
    _apply_optimizer_in_backward(fused[0], emb.ebc.parameters(), fused[1])

    # 2. Planner: TorchRec chooses among the allowed sharding types; rank 0 plans, all get its plan.
    sharding_env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
    sharders = [EmbeddingBagCollectionSharder()]
    sharding_plan = planner.collective_plan(train_module, sharders, sharding_env.process_group)

    # 3. DistributedModelParallel: allocates each rank's shards, wraps the dense layers in DDP
    #    (which must leave wdl's own rows alone). One process has nothing to all-reduce: its dense
    #    layers stay unwrapped, as with the torch backend (DDP there cost 0.4 of 22 ms per step).
    wrapper = DefaultDataParallelWrapper(params_to_ignore=own_rows) if env.distributed else _no_data_parallel()
    dmp = DistributedModelParallel(train_module, env=sharding_env, device=env.device, plan=sharding_plan,
                                   sharders=sharders, data_parallel_wrapper=wrapper)

    # 4. Each local shard gets the values the whole table would have had at its offsets.
    _init_torchrec_shards(dmp, {t.name: t for t in emb.tables}, seed)
    return Placed(dmp, dmp, dmp.fused_optimizer, "\n".join([str(dmp.plan), *plan]))


def _no_data_parallel() -> Any:
    """TorchRec's DataParallelWrapper that leaves the dense layers as they are (one process)."""
    from torchrec.distributed.model_parallel import DataParallelWrapper

    class NoDataParallel(DataParallelWrapper):
        def wrap(self, dmp: nn.Module, env: Any, device: torch.device) -> None:
            dmp._dmp_wrapped_module.to(device)

    return NoDataParallel()


@torch.no_grad()
def _init_torchrec_shards(dmp: nn.Module, tables: dict[str, Any], seed: int) -> None:
    state = dmp.state_dict()
    for key, value in state.items():
        parts = key.split(".")
        if not (key.endswith(".weight") and len(parts) >= 2 and parts[-2] in tables and "embedding_bags" in parts):
            continue
        t = tables[parts[-2]]
        for shard in value.local_shards():
            row0, col0 = shard.metadata.shard_offsets
            normal_block(shard.tensor, seed, t.name, t.init_std, row0=row0, col0=col0, dim=t.dim)
    dmp.load_state_dict(state)
