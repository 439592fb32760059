"""Model placement across ranks: the ONLY module that imports torchrec.distributed.

TorchRec backend, in TorchRec's order:
    fused embedding optimisers applied in backward -> planner -> DistributedModelParallel
    (dense MLP in DDP) -> optimisers for what is not fused -> one combined optimiser.
FTRL has no fused FBGEMM kernel, so wide tables trained with FTRL are placed data_parallel
(replicated, gradients all-reduced, FTRL applied per coordinate); wide tables trained with
AdaGrad/Adam/SGD are sharded and fused like the deep ones.

Pure-PyTorch backend: plain DDP, every table replicated.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wdl.config import Config, OptimizerConfig
from wdl.distributed.env import DistEnv
from wdl.errors import ConfigError
from wdl.model.wide_deep import WideDeepTrain
from wdl.train.optim import Optimizers, build_optimizer

# FBGEMM's CPU dense (data_parallel) look-up has no registered autograd kernel and torch warns
# on every backward; gradients are right (tests compare it with nn.EmbeddingBag), so silence it.
warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function")

CPU_SHARDING = ("table_wise", "column_wise", "table_column_wise", "data_parallel")


@dataclass
class Parallel:
    """What `parallelize` returns: the module to call, its optimiser and a readable plan."""

    model: nn.Module
    optimizer: Any  # .zero_grad(), .step(), .state_dict(), .load_state_dict()
    plan: str
    torchrec: bool


def parallelize(model: WideDeepTrain, cfg: Config, env: DistEnv) -> Parallel:
    if cfg.model.embedding_backend == "torch":
        return _plain(model, cfg, env)
    return _torchrec(model, cfg, env)


def _plain(model: WideDeepTrain, cfg: Config, env: DistEnv) -> Parallel:
    groups = model.model.param_groups()
    optimizer = Optimizers({p: build_optimizer(getattr(cfg.optim, p), ps) for p, ps in groups.items() if ps})
    plan = "pure-PyTorch embeddings: every table replicated on every rank"
    if env.distributed:
        ids = [env.device] if env.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        plan += f" (DDP over {env.world_size} ranks)"
    return Parallel(model, optimizer, plan, torchrec=False)


def _fused_class(cfg: OptimizerConfig) -> tuple[type, dict[str, Any]] | None:
    """The torch optimiser TorchRec maps to an FBGEMM fused kernel, or None (FTRL)."""
    # FBGEMM's kernels take lr and eps only (no initial accumulator, no weight decay here).
    if cfg.name in ("adagrad", "adam") and (cfg.initial_accumulator_value or cfg.weight_decay):
        raise ConfigError(f"{cfg.name} fused into TorchRec tables supports lr and eps only; "
                          "set initial_accumulator_value and weight_decay to 0 or use model.embedding_backend=torch")
    if cfg.name == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.name == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.name == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr}
    return None


def check_sharding_types(cfg: Config, env: DistEnv) -> None:
    """row-wise needs CUDA: say so before anything is built."""
    if env.device.type == "cuda":
        return
    asked = [("distributed.sharding", cfg.distributed.sharding)] + [
        (f"distributed.tables.{t}", k) for t, k in cfg.distributed.tables.items()
    ]
    for where, kind in asked:
        if kind not in ("auto", *CPU_SHARDING):
            raise ConfigError(
                f"{where}={kind} needs CUDA; on CPU (gloo) TorchRec offers only {', '.join(CPU_SHARDING)}"
            )


def _torchrec(model: WideDeepTrain, cfg: Config, env: DistEnv) -> Parallel:
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    check_sharding_types(cfg, env)
    inner = model.model
    parts = {"wide": inner.wide, "deep": inner.deep}

    # 1. Fused optimisers in backward for the tables whose optimiser FBGEMM implements.
    constraints: dict[str, ParameterConstraints] = {}
    for part, arch in parts.items():
        if arch is None or arch.embeddings is None:
            continue
        fused = _fused_class(getattr(cfg.optim, part))
        ebc = arch.embeddings.ebc
        if fused is not None:
            _apply_optimizer_in_backward(fused[0], ebc.parameters(), fused[1])
        for table in arch.embeddings.table_names:
            kind = cfg.distributed.tables.get(table, cfg.distributed.sharding)
            if fused is None:
                # The global default yields to data_parallel here; an explicit per-table ask is an error.
                asked = cfg.distributed.tables.get(table, "data_parallel")
                if asked != "data_parallel":
                    raise ConfigError(
                        f"distributed.tables.{table}={asked}: {getattr(cfg.optim, part).name} is not a fused FBGEMM "
                        f"optimiser, so {part} tables are replicated (data_parallel); use optim.{part}.name "
                        "adagrad/adam/sgd to shard them"
                    )
                kind = "data_parallel"
            if kind != "auto":
                constraints[table] = ParameterConstraints(sharding_types=[kind])
            elif env.device.type != "cuda":
                constraints[table] = ParameterConstraints(sharding_types=list(CPU_SHARDING))

    # 2. Planner: TorchRec chooses among the allowed sharding types for this topology.
    sharding_env = ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD)
    topology = Topology(world_size=env.world_size, compute_device=env.device.type,
                        local_world_size=_local_world_size(env))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, sharding_env.process_group)

    # 3. DistributedModelParallel: shards the tables, wraps the dense part in DDP.
    dmp = DistributedModelParallel(model, env=sharding_env, device=env.device, plan=plan, sharders=sharders)

    # 4. Optimisers for parameters not updated in backward: FTRL for replicated wide tables
    #    and the bias, the deep optimiser for the MLP.
    # The same split as WideDeep.param_groups (the bias belongs to the wide part when there is
    # one), by name: sharding replaced the table parameters with new objects.
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    wide_names = [] if inner.wide is None else [n for n in dense if ".wide." in n or n.endswith("model.bias")]
    deep_names = [n for n in dense if n not in wide_names]
    optimizers: list[tuple[str, Any]] = [("fused", dmp.fused_optimizer)]
    for part, names in (("wide", wide_names), ("deep", deep_names)):
        if names:
            ocfg = getattr(cfg.optim, part)
            optimizers.append((part, KeyedOptimizerWrapper({n: dense[n] for n in names},
                                                           lambda ps, c=ocfg: build_optimizer(c, list(ps)))))
    optimizer = CombinedOptimizer(optimizers)
    return Parallel(dmp, optimizer, str(dmp.plan), torchrec=True)


def _local_world_size(env: DistEnv) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))


# ---------------------------------------------------------------------------------------------
# State: initial values and checkpoints.


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy unsharded values (e.g. the deterministic initialisation) into a sharded model:
    each rank takes the slices of its local shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = model.state_dict()
    for key, value in state.items():
        src = full[_strip(key)]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                md = shard.metadata
                index = tuple(slice(o, o + n) for o, n in zip(md.shard_offsets, md.shard_sizes))
                shard.tensor.copy_(src[index])
        else:
            value.copy_(src)
    model.load_state_dict(state)


def _strip(key: str) -> str:
    for prefix in ("_dmp_wrapped_module.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def state_dicts(parallel: Parallel, for_loading: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimiser state dicts for DCP (sharded tensors stay sharded).

    for_loading: make lazily created optimiser state exist first, so DCP can fill it in place.
    """
    if parallel.torchrec:
        if for_loading:
            for name, opt in parallel.optimizer.optimizers:
                if name != "fused":  # fused state exists from the start
                    opt.init_state()
        return parallel.model.state_dict(), parallel.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(parallel.model, optimizers=list(parallel.optimizer.optimizers.values()))


def load_state_dicts(parallel: Parallel, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    if parallel.torchrec:
        parallel.model.load_state_dict(model_sd)
        parallel.optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(parallel.model, optimizers=list(parallel.optimizer.optimizers.values()),
                   model_state_dict=model_sd, optim_state_dict=optim_sd)
