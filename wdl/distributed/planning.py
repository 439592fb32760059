"""Planning on paper: how many devices the tables need and what a step will cost, with no GPU.

The tables are the model's own (`WideDeep.table_specs` on the `meta` device), placed as training
places them (wdl.distributed.sharding):

- TorchRec's tables (the deep part with the torchrec backend) go through TorchRec's planner:
  its enumerator, storage and perf estimators (`EmbeddingStorageEstimator`,
  `EmbeddingPerfEstimator`), proposers and `GreedyPerfPartitioner` choose a sharding per table
  and give each shard's memory and fwd/bwd compute and communication time.
- wdl's fused groups (the wide part always; the deep part with the torch backend) are split in
  contiguous row blocks (wdl.distributed.rows); their memory is the block's rows times
  (weight + optimiser state), their time the same bandwidth model TorchRec uses: bytes of the
  touched rows over memory bandwidth, and the three id/row/gradient all-to-alls over the
  topology's all-to-all bandwidth.
- The dense part: MLP FLOPs (forward + a backward twice as costly) over an assumed peak, and
  DDP's gradient all-reduce over TorchRec's all-reduce bandwidth.

The step estimate is the busiest rank's embedding time plus the dense part, with no overlap of
communication and compute (TorchRec's pipeline hides some of it: an upper bound in that respect).
Every bandwidth is TorchRec's default (torchrec/distributed/planner/constants.py) unless given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wdl.config import Config
from wdl.errors import ConfigError

GIB = 1 << 30
RESERVED = 0.15  # TorchRec planner's default storage reservation (dense layers, inputs, activations)
PEAK_TFLOPS = {"cuda": 67.0, "cpu": 0.1}  # dense fp32 without tensor cores: H100 SXM; a modest CPU


@dataclass
class Hardware:
    """The machines planned for. Bandwidths in GB/s (1e9 bytes); None: TorchRec's default."""

    device: str = "cuda"
    world_size: int = 1
    local_world_size: int = 8
    hbm_gib: float = 80.0
    ddr_gib: float = 512.0
    hbm_bw: float | None = None
    ddr_bw: float | None = None
    intra_bw: float | None = None
    inter_bw: float | None = None
    peak_tflops: float | None = None
    allow_uvm: bool = False  # let TorchRec keep tables in host memory behind an HBM cache


# ---------------------------------------------------------------------------------------------
# Tables: exactly the model's


def table_sizes(cfg: Config, table_rows: dict[str, int]) -> dict[str, int]:
    """Rows of every sparse column and cross the model reads: the manifest's when the data set is
    prepared, `table_rows` where given (they win), the config's hash_buckets otherwise."""
    from wdl.data.dataset import feature_spec
    from wdl.data.manifest import MANIFEST, Manifest, load_manifest

    features = copy.deepcopy(cfg.features)
    for name, rows in table_rows.items():
        if name in features.crosses:
            features.crosses[name].hash_buckets = rows
        elif name in features.columns and features.columns[name].kind != "dense":
            features.columns[name] = dataclasses.replace(features.columns[name], vocab_size=rows, hash_buckets=None,
                                                         vocab_file=None)
        else:
            raise ConfigError(f"--table-rows {name}={rows}: {name!r} is not a sparse column or cross of the config")
    root = Path(cfg.data.path)
    if (root / MANIFEST).is_file():
        manifest = load_manifest(root)
    else:  # not prepared: sizes must come from the config or --table-rows (never prepare data here)
        manifest = Manifest(root, "", cfg.features.label, {c: {"mean": 0.0, "std": 1.0} for c in cfg.model.deep.dense},
                            {}, {})
        wanted = {c for k in _sparse_keys(cfg) for c in (cfg.features.crosses[k].columns if k in cfg.features.crosses
                                                          else [k])}
        for c in sorted(wanted):
            col = features.columns[c]
            if col.vocab_size == "auto" or (col.vocab_file and not Path(col.vocab_file).is_absolute()):
                raise ConfigError(f"features.columns.{c} takes its size from the data set, and {root} has no "
                                  f"{MANIFEST}: give it with --table-rows {c}=ROWS (wdl plan never prepares data)")
    spec = feature_spec(dataclasses.replace(cfg, features=features), manifest)
    return {k: spec.num_embeddings(k) for k in spec.sparse_keys}


def _sparse_keys(cfg: Config) -> list[str]:
    m = cfg.model
    keys = list(m.wide.features) if m.kind in ("wide_deep", "wide") else []
    return keys + (list(m.deep.embeddings) if m.kind in ("wide_deep", "deep") else [])


def build_model(cfg: Config, sizes: dict[str, int]):
    """The model on `meta` with wdl's fused tables, whose groups are what wdl splits row-wise."""
    import torch  # torch loads when a plan is made, not when `wdl` builds its parser

    from wdl.model.wide_deep import WideDeep

    dense_dim = len(cfg.model.deep.dense) if cfg.model.kind != "wide" else 0
    meta = torch.device("meta")
    return WideDeep(dataclasses.replace(cfg.model, embedding_backend="torch"), sizes, dense_dim, device=meta,
                    table_device=meta)


# ---------------------------------------------------------------------------------------------
# TorchRec's planner


def _topology(hw: Hardware, hbm: float, ddr: float):
    from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

    bw = {k: getattr(hw, a) * 1e6 for k, a in (("hbm_mem_bw", "hbm_bw"), ("ddr_mem_bw", "ddr_bw"),
                                                 ("intra_host_bw", "intra_bw"), ("inter_host_bw", "inter_bw"))
          if getattr(hw, a) is not None}  # GB/s -> bytes/ms, TorchRec's unit
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=hw.world_size, local_world_size=min(hw.local_world_size, hw.world_size),
                                     hbm_cap_bytes=int(hbm), ddr_cap_bytes=int(ddr)),
        # use_hardware_based_bandwidth: take the given bandwidths (TorchRec's defaults fill the rest)
        hardware_config=HardwareConfig(**bw),
        kernel_config=KernelConfig(compute_device=hw.device, use_hardware_based_bandwidth=True))


class _OncePerShape:
    """A TorchRec shard estimator run once per distinct (table shape, sharding, kernel, shard size).

    A shard's estimate does not depend on its rank, but TorchRec estimates every shard of every
    option: at 1024 ranks a row-wise option has 1024 equal shards, and planning took minutes.
    Estimating one of each and copying the result gives the same numbers in seconds."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.done = inner, {}

    def estimate(self, sharding_options: list, sharder_data_map: Any = None) -> None:
        proxies = {}
        for so in sharding_options:
            key = self._key(so)
            for s in so.shards:
                if (key, tuple(s.size)) not in self.done:
                    p = proxies.setdefault(key, copy.copy(so))
                    if p is so or p.shards is so.shards:
                        p.shards = []
                    if all(tuple(q.size) != tuple(s.size) for q in p.shards):
                        p.shards.append(copy.copy(s))
        if proxies:
            self.inner.estimate(list(proxies.values()), sharder_data_map=sharder_data_map)
            for key, p in proxies.items():
                for s in p.shards:
                    self.done[key, tuple(s.size)] = s.perf
        for so in sharding_options:
            key = self._key(so)
            for s in so.shards:
                s.perf = copy.copy(self.done[key, tuple(s.size)])

    @staticmethod
    def _key(so: Any) -> tuple:
        return (so.sharding_type, so.compute_kernel, tuple(so.tensor.shape), so.tensor.dtype, tuple(so.input_lengths),
                so.batch_size, so.is_pooled, so.cache_load_factor, so.module_type_key)


def _torchrec_plan(cfg: Config, specs: list, hw: Hardware, dtype: str, batch_size: int, hbm: float, ddr: float) -> list:
    """TorchRec's chosen sharding options (one per table, shards with rank, storage and perf)."""
    import torch
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
    from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
    from torchrec.distributed.planner.stats import NoopEmbeddingStats
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from wdl.distributed.sharding import allowed_sharding
    from wdl.train.optim import fused_table_optimizer

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_embeddings, feature_names=[t.feature],
                           pooling=PoolingType.SUM, data_type=DataType.FP16 if dtype == "fp16" else DataType.FP32)
        for t in specs], device=torch.device("meta"))
    opt_cls, opt_args = fused_table_optimizer(cfg.optim.deep, hw.device, "deep")
    _apply_optimizer_in_backward(opt_cls, ebc.parameters(), opt_args)  # the storage estimator reads it

    kernels = ["fused", "fused_uvm_caching"] if hw.allow_uvm and hw.device == "cuda" else ["fused"]
    constraints = {}
    for t in specs:
        types = allowed_sharding(*cfg.distributed.sharding_of(t.name), hw.device)
        constraints[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    topology = _topology(hw, hbm, ddr)
    estimators = [_OncePerShape(EmbeddingPerfEstimator(topology, constraints)),
                  EmbeddingStorageEstimator(topology, constraints)]
    # Partitioning a proposal costs O(world size); the greedy search stops after this many
    # proposals without a better plan (TorchRec's default search never stops early).
    proposals = max(2, 1024 // hw.world_size)
    chosen: list = []
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        enumerator=EmbeddingEnumerator(topology, batch_size, constraints, estimator=estimators),
        storage_reservation=FixedPercentageStorageReservation(0.0),  # RESERVED is taken off the capacity already
        proposer=[UniformProposer(), GreedyProposer(threshold=proposals)], stats=[NoopEmbeddingStats()], debug=False,
        callbacks=[lambda plan: chosen.append(plan) or plan])
    planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    return chosen[0]


# ---------------------------------------------------------------------------------------------
# The plan


def plan(cfg: Config, hw: Hardware, *, batch_size: int, dtype: str = "fp32",
         table_rows: dict[str, int] | None = None) -> dict[str, Any]:
    """Where every table goes and what a step costs on `hw`; a plain dict (the --json output)."""
    import torch
    from torchrec.distributed.planner import constants as C
    from torchrec.distributed.planner.types import CollectiveType, PlannerError

    from wdl.model.embeddings import resolve_backend
    from wdl.train.sparse_optim import state_bytes_per_row

    logging.getLogger("torchrec").setLevel(logging.ERROR)  # its planner logs every proposal
    w, device = hw.world_size, hw.device
    backend = resolve_backend(cfg.model.embedding_backend)
    model = build_model(cfg, table_sizes(cfg, table_rows or {}))
    parts = model.parts()
    groups = [(p, g) for p in ("wide", "deep") for g in parts[p].tables]
    if backend == "torchrec":
        groups = [(p, g) for p, g in groups if p == "wide"]
    tr_specs = [t for t in model.table_specs() if t.name.startswith("deep_")] if backend == "torchrec" else []
    elt = 2 if dtype == "fp16" else 4

    # Memory: wdl's row blocks (the largest is rank 0's), then what is left for TorchRec per rank.
    dense_params = sum(p.numel() for p in parts["deep"].dense)
    dense_bytes = dense_params * 4 * (2 + state_bytes_per_row(cfg.optim.deep, 1) // 4)  # weight, grad, state
    wdl_rank, tables = _wdl_blocks(cfg, groups, w)
    tables_hbm = device == "cuda"
    hbm_cap, ddr_cap = hw.hbm_gib * GIB if tables_hbm else 0.0, hw.ddr_gib * GIB
    cap = hbm_cap if tables_hbm else ddr_cap
    usable = (1 - RESERVED) * cap - max(wdl_rank) - dense_bytes
    need = sum(t["bytes"] for t in tables) + dense_bytes * w + sum(
        t.num_embeddings * (elt * t.dim + state_bytes_per_row(cfg.optim.deep, t.dim)) for t in tr_specs)
    where = "HBM" if tables_hbm else "host memory"
    short = (f"the tables and optimiser state need {need / GIB:,.1f} GiB of {where} in all, {w} rank(s) x "
             f"{cap / GIB:,.1f} GiB less TorchRec's {RESERVED:.0%} reserve give {(1 - RESERVED) * cap * w / GIB:,.1f} GiB")
    if usable < 0 or need > (1 - RESERVED) * cap * w + (ddr_cap * w if hw.allow_uvm and tables_hbm else 0):
        missing = need - (1 - RESERVED) * cap * w
        ranks = math.ceil(need / ((1 - RESERVED) * cap)) if cap else 0
        raise ConfigError(f"{short}: {max(missing, 0) / GIB:,.1f} GiB missing; use at least {ranks} ranks, more memory "
                          "per rank, --dtype fp16, fewer rows or optim.deep.name=rowwise_adagrad")

    shards: list = []
    if tr_specs:
        hbm_left, ddr_left = (usable, ddr_cap) if tables_hbm else (0.0, usable)
        try:
            shards = _torchrec_plan(cfg, tr_specs, hw, dtype, batch_size, hbm_left, ddr_left)
        except PlannerError as e:
            raise ConfigError(f"{short}; TorchRec's planner found no placement for the tables one by one "
                              f"({str(e).splitlines()[0].strip()}); use more ranks or smaller tables") from None
    topology = _topology(hw, hbm_cap, ddr_cap)

    # Per rank: memory and embedding time (ms), TorchRec's shards plus wdl's blocks.
    mem = [{"rank": r, "hbm_bytes": wdl_rank[r] + dense_bytes if tables_hbm else 0,
            "host_bytes": 0 if tables_hbm else wdl_rank[r] + dense_bytes,
            "tables_bytes": wdl_rank[r]} for r in range(w)]
    keys = ("lookup_fwd", "lookup_bwd", "input_comms", "output_comms")
    t_rank = [dict.fromkeys(keys, 0.0) for _ in range(w)]
    state_of = {t.name: state_bytes_per_row(cfg.optim.deep, t.dim) for t in tr_specs}
    tables += _add_torchrec_shards(shards, state_of, elt, dtype, mem, t_rank)

    # wdl's blocks: every rank looks up batch x features ids (pooling factor 1, as TorchRec
    # assumes) and serves as many; (W-1)/W of them travel.
    dev_bw = topology.hbm_mem_bw if tables_hbm else topology.ddr_mem_bw
    a2a = topology.comms_bandwidths.get_bw(local_world_size=topology.local_world_size, world_size=w,
                                           collective_type=CollectiveType.ALL_TO_ALL)
    away = (w - 1) / w
    for part, g in groups:
        ids = batch_size * (len(g.tables) + (g.bias_row is not None))
        state = state_bytes_per_row(getattr(cfg.optim, part), g.dim)
        for t in t_rank:
            t["lookup_fwd"] += ids * (4 * g.dim + 8) / dev_bw
            t["lookup_bwd"] += ids * (3 * 4 * g.dim + 2 * state) / dev_bw  # grad read, weight and state r/w
            t["input_comms"] += away * ids * 8 / a2a
            t["output_comms"] += away * ids * 2 * 4 * g.dim / a2a

    # Dense part: MLP FLOPs over an assumed peak, DDP's all-reduce of its gradients.
    layers = [m for m in model.deep.mlp if isinstance(m, torch.nn.Linear)] if model.deep is not None else []
    flops = 3 * 2 * batch_size * sum(m.in_features * m.out_features for m in layers)
    peak = hw.peak_tflops or PEAK_TFLOPS[device]
    ar_bw = topology.comms_bandwidths.get_bw(local_world_size=topology.local_world_size, world_size=w,
                                             collective_type=CollectiveType.ALL_REDUCE)
    dense_ms = {"dense_compute": flops / (peak * 1e12) * 1e3,
                "dense_allreduce": 2 * away * dense_params * 4 / ar_bw if w > 1 else 0.0}
    emb = [sum(t.values()) for t in t_rank]
    busiest = max(range(w), key=lambda r: emb[r])
    step = {**t_rank[busiest], **dense_ms}
    step["total"] = sum(step.values())
    return {
        "world_size": w, "local_world_size": topology.local_world_size, "device": device, "backend": backend,
        "batch_size": batch_size, "global_batch_size": batch_size * w, "dtype": dtype,
        "capacity": {"hbm_bytes": hbm_cap, "host_bytes": ddr_cap, "reserved_fraction": RESERVED},
        "tables": tables, "memory_per_rank": mem, "step_ms": step, "busiest_rank": busiest,
        "busiest_share": emb[busiest] / sum(emb) if sum(emb) else 1.0,
        "samples_per_second": batch_size * w / (step["total"] / 1e3),
        "dense": {"flops_per_step": flops, "peak_tflops": peak, "params": dense_params},
        "assumptions": {
            "source": C.__file__.split("site-packages/")[-1],
            "hbm_bw_gbs": topology.hbm_mem_bw / 1e6, "ddr_bw_gbs": topology.ddr_mem_bw / 1e6,
            "intra_node_bw_gbs": topology.intra_host_bw / 1e6, "inter_node_bw_gbs": topology.inter_host_bw / 1e6,
            "all_to_all_bw_gbs": a2a / 1e6, "all_reduce_bw_gbs": ar_bw / 1e6,
            "bwd_compute_multiplier": C.BWD_COMPUTE_MULTIPLIER, "pooling_factor": C.POOLING_FACTOR,
            "overlap": "none: communication and compute add up"},
    }


def _wdl_blocks(cfg: Config, groups: list, w: int) -> tuple[list[int], list[dict[str, Any]]]:
    """wdl's fused groups split in row blocks over `w` ranks: bytes per rank (rows, optimiser
    state and, on one rank, the dedupe scratch) and a table entry per group."""
    from wdl.distributed.rows import block
    from wdl.train.sparse_optim import state_bytes_per_row

    wdl_rank = [0] * w
    tables: list[dict[str, Any]] = []
    for part, g in groups:
        per_row = 4 * g.dim + state_bytes_per_row(getattr(cfg.optim, part), g.dim) + (4 if w == 1 else 0)
        for r in range(w):
            lo, hi = block(g.num_rows, w, r)
            wdl_rank[r] += (hi - lo) * per_row
        names = [t.name for t in g.tables] + (["bias"] if g.bias_row is not None else [])
        tables.append({"name": f"{part} (wdl fused, {len(names)} tables: {', '.join(names)})", "owner": "wdl",
                       "rows": g.num_rows, "dim": g.dim, "dtype": "fp32", "sharding": "wdl_row_blocks",
                       "kernel": "wdl", "ranks": list(range(min(w, g.num_rows))), "bytes": g.num_rows * per_row,
                       "features": len(g.tables) + (g.bias_row is not None)})
    return wdl_rank, tables


def _add_torchrec_shards(shards: list, state_of: dict[str, int], elt: int, dtype: str, mem: list[dict],
                         t_rank: list[dict]) -> list[dict[str, Any]]:
    """Adds each TorchRec shard's memory and TorchRec's time estimates to its rank (in place);
    returns a table entry per sharded table."""
    tables = []
    for so in shards:
        nbytes = 0
        for s in so.shards:
            rows, cols = s.size
            b = rows * cols * elt + rows * state_of[so.name] * cols // so.tensor.shape[1]
            nbytes += b
            m = mem[s.rank]
            m["hbm_bytes"] += s.storage.hbm
            m["host_bytes"] += s.storage.ddr
            m["tables_bytes"] += b
            t = t_rank[s.rank]
            t["lookup_fwd"] += s.perf.fwd_compute
            t["lookup_bwd"] += s.perf.bwd_compute + s.perf.prefetch_compute
            t["input_comms"] += s.perf.input_dist_comms
            t["output_comms"] += s.perf.fwd_comms + s.perf.bwd_comms
        tables.append({"name": so.name, "owner": "torchrec", "rows": int(so.tensor.shape[0]),
                       "dim": int(so.tensor.shape[1]), "dtype": dtype, "sharding": so.sharding_type,
                       "kernel": so.compute_kernel, "ranks": sorted({s.rank for s in so.shards}), "bytes": nbytes,
                       "features": 1})
    return tables
