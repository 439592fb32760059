"""Planning: how many devices the tables need and what a step will cost, on paper (`wdl plan`)
and for a run (its plan.txt): one planner, built the same way for both (wdl.train.build).

The tables are the model's own (wdl.data.tables describes them; the model's fused groups on the
`meta` device), placed as training places them (wdl.distributed.sharding):

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
from wdl.data.tables import LOCAL_SCRATCH_BYTES, Table, model_reads, state_bytes
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
# Table sizes, when no data set says them


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
        reads = model_reads(cfg.model)
        manifest = Manifest(root, "", cfg.features.label, {c: {"mean": 0.0, "std": 1.0} for c in reads.dense}, {}, {})
        wanted = {c for k in reads.sparse for c in (cfg.features.crosses[k].columns if k in cfg.features.crosses
                                                    else [k])}
        for c in sorted(wanted):
            col = features.columns[c]
            if col.vocab_size == "auto" or (col.vocab_file and not Path(col.vocab_file).is_absolute()):
                raise ConfigError(f"features.columns.{c} takes its size from the data set, and {root} has no "
                                  f"{MANIFEST}: give it with --table-rows {c}=ROWS (wdl plan never prepares data)")
    spec = feature_spec(dataclasses.replace(cfg, features=features), manifest)
    return {k: spec.num_embeddings(k) for k in spec.sparse_keys}


# ---------------------------------------------------------------------------------------------
# TorchRec's planner, built one way for `wdl plan` and for a run


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


@dataclass
class Budget:
    """Memory per rank before TorchRec places its tables: wdl's row blocks (bytes per rank and a
    table entry per group), the dense layers, the capacities, and what is left for TorchRec."""

    wdl_rank: list[int]
    wdl_tables: list[dict[str, Any]]
    dense_params: int
    dense_bytes: int
    hbm_cap: float
    ddr_cap: float
    hbm_left: float
    ddr_left: float
    short: str  # the memory sentence a refusal starts with

    @property
    def tables_hbm(self) -> bool:
        return self.hbm_cap > 0


def budget(cfg: Config, hw: Hardware, model: Any, described: list[Table]) -> Budget:
    """What every rank holds of wdl's tables and the dense layers, checked against the capacity
    (a ConfigError saying what is missing when the tables do not fit)."""
    w = hw.world_size
    parts = model.parts()
    dense_params = sum(p.numel() for p in parts["deep"].dense)
    dense_bytes = dense_params * (8 + state_bytes(cfg.optim.deep, 1))  # weight, grad, optimiser state
    wdl_rank, wdl_tables = _wdl_blocks(model, described, w)
    tables_hbm = hw.device == "cuda"
    hbm_cap, ddr_cap = hw.hbm_gib * GIB if tables_hbm else 0.0, hw.ddr_gib * GIB
    cap = hbm_cap if tables_hbm else ddr_cap
    usable = (1 - RESERVED) * cap - max(wdl_rank) - dense_bytes
    need = sum(t["bytes"] for t in wdl_tables) + dense_bytes * w + sum(t.bytes for t in described
                                                                          if t.owner == "torchrec")
    where = "HBM" if tables_hbm else "host memory"
    short = (f"the tables and optimiser state need {need / GIB:,.1f} GiB of {where} in all, {w} rank(s) x "
             f"{cap / GIB:,.1f} GiB less TorchRec's {RESERVED:.0%} reserve give {(1 - RESERVED) * cap * w / GIB:,.1f} GiB")
    if usable < 0 or need > (1 - RESERVED) * cap * w + (ddr_cap * w if hw.allow_uvm and tables_hbm else 0):
        missing = need - (1 - RESERVED) * cap * w
        ranks = math.ceil(need / ((1 - RESERVED) * cap))
        raise ConfigError(f"{short}: {max(missing, 0) / GIB:,.1f} GiB missing; use at least {ranks:,} ranks, more "
                          "memory per rank, --dtype fp16, fewer rows or optim.deep.name=rowwise_adagrad")
    hbm_left, ddr_left = (usable, ddr_cap) if tables_hbm else (0.0, usable)
    return Budget(wdl_rank, wdl_tables, dense_params, dense_bytes, hbm_cap, ddr_cap, hbm_left, ddr_left, short)


def torchrec_planner(cfg: Config, hw: Hardware, described: list[Table], batch_size: int, room: Budget,
                     chosen: list):
    """TorchRec's planner for the TorchRec tables of `described` on `hw` with what `room` leaves
    them; each plan it finds (its sharding options) is appended to `chosen` on the rank that plans.
    `wdl plan` calls its `plan`, a run its `collective_plan`: the same placement."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
    from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
    from torchrec.distributed.planner.stats import NoopEmbeddingStats
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import ParameterConstraints

    from wdl.distributed.sharding import allowed_sharding

    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)  # it logs every proposal
    kernels = ["fused", "fused_uvm_caching"] if hw.allow_uvm and hw.device == "cuda" else ["fused"]
    constraints = {}
    for t in described:
        if t.owner == "torchrec":
            types = allowed_sharding(*cfg.distributed.sharding_of(t.name), hw.device)
            constraints[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    topology = _topology(hw, room.hbm_left, room.ddr_left)
    estimators = [_OncePerShape(EmbeddingPerfEstimator(topology, constraints)),
                  EmbeddingStorageEstimator(topology, constraints)]
    # Partitioning a proposal costs O(world size); the greedy search stops after this many
    # proposals without a better plan (TorchRec's default search never stops early).
    proposals = max(2, 1024 // hw.world_size)
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        enumerator=EmbeddingEnumerator(topology, batch_size, constraints, estimator=estimators),
        storage_reservation=FixedPercentageStorageReservation(0.0),  # RESERVED is taken off the capacity already
        proposer=[UniformProposer(), GreedyProposer(threshold=proposals)], stats=[NoopEmbeddingStats()], debug=False,
        callbacks=[lambda plan: chosen.append(plan) or plan])


# ---------------------------------------------------------------------------------------------
# The plan


def report(cfg: Config, hw: Hardware, model: Any, described: list[Table], room: Budget, shards: list, *,
           batch_size: int, dtype: str, backend: str) -> dict[str, Any]:
    """Where every table goes and what a step costs on `hw`; a plain dict (the --json output).
    shards: TorchRec's chosen sharding options (empty without TorchRec tables)."""
    import torch
    from torchrec.distributed.planner import constants as C
    from torchrec.distributed.planner.types import CollectiveType

    w, device = hw.world_size, hw.device
    parts = model.parts()
    groups = [(p, g) for p in ("wide", "deep") for g in parts[p].tables]
    tables_hbm = room.tables_hbm
    topology = _topology(hw, room.hbm_cap, room.ddr_cap)
    by_name = {t.name: t for t in described}

    # Per rank: memory and embedding time (ms), TorchRec's shards plus wdl's blocks.
    mem = [{"rank": r, "hbm_bytes": room.wdl_rank[r] + room.dense_bytes if tables_hbm else 0,
            "host_bytes": 0 if tables_hbm else room.wdl_rank[r] + room.dense_bytes,
            "tables_bytes": room.wdl_rank[r]} for r in range(w)]
    keys = ("lookup_fwd", "lookup_bwd", "input_comms", "output_comms")
    t_rank = [dict.fromkeys(keys, 0.0) for _ in range(w)]
    tables = room.wdl_tables + _add_torchrec_shards(shards, by_name, dtype, mem, t_rank)

    # wdl's blocks: every rank looks up batch x features ids (pooling factor 1, as TorchRec
    # assumes) and serves as many; (W-1)/W of them travel.
    dev_bw = topology.hbm_mem_bw if tables_hbm else topology.ddr_mem_bw
    a2a = topology.comms_bandwidths.get_bw(local_world_size=topology.local_world_size, world_size=w,
                                           collective_type=CollectiveType.ALL_TO_ALL)
    away = (w - 1) / w
    for part, g in groups:
        ids = batch_size * (len(g.tables) + (g.bias_row is not None))
        state = by_name[g.tables[0].name].state_bytes
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
                "dense_allreduce": 2 * away * room.dense_params * 4 / ar_bw if w > 1 else 0.0}
    emb = [sum(t.values()) for t in t_rank]
    busiest = max(range(w), key=lambda r: emb[r])
    step = {**t_rank[busiest], **dense_ms}
    step["total"] = sum(step.values())
    return {
        "world_size": w, "local_world_size": topology.local_world_size, "device": device, "backend": backend,
        "batch_size": batch_size, "global_batch_size": batch_size * w, "dtype": dtype,
        "capacity": {"hbm_bytes": room.hbm_cap, "host_bytes": room.ddr_cap, "reserved_fraction": RESERVED},
        "tables": tables, "memory_per_rank": mem, "step_ms": step, "busiest_rank": busiest,
        "busiest_share": emb[busiest] / sum(emb) if sum(emb) else 1.0,
        "samples_per_second": batch_size * w / (step["total"] / 1e3),
        "dense": {"flops_per_step": flops, "peak_tflops": peak, "params": room.dense_params},
        "assumptions": {
            "source": C.__file__.split("site-packages/")[-1],
            "hbm_bw_gbs": topology.hbm_mem_bw / 1e6, "ddr_bw_gbs": topology.ddr_mem_bw / 1e6,
            "intra_node_bw_gbs": topology.intra_host_bw / 1e6, "inter_node_bw_gbs": topology.inter_host_bw / 1e6,
            "all_to_all_bw_gbs": a2a / 1e6, "all_reduce_bw_gbs": ar_bw / 1e6,
            "bwd_compute_multiplier": C.BWD_COMPUTE_MULTIPLIER, "pooling_factor": C.POOLING_FACTOR,
            "overlap": "none: communication and compute add up"},
    }


def _wdl_blocks(model: Any, described: list[Table], w: int) -> tuple[list[int], list[dict[str, Any]]]:
    """wdl's fused groups split in row blocks over `w` ranks: bytes per rank (rows, optimiser
    state and, in one process, the dedupe scratch) and a table entry per group."""
    from wdl.distributed.rows import block

    by_name = {t.name: t for t in described}
    wdl_rank = [0] * w
    tables: list[dict[str, Any]] = []
    for part, p in model.parts().items():
        for g in p.tables:
            per_row = by_name[g.tables[0].name].bytes_per_row + (LOCAL_SCRATCH_BYTES if w == 1 else 0)
            for r in range(w):
                lo, hi = block(g.num_rows, w, r)
                wdl_rank[r] += (hi - lo) * per_row
            names = [t.name for t in g.tables] + (["bias"] if g.bias_row is not None else [])
            tables.append({"name": f"{part} (wdl fused, {len(names)} tables: {', '.join(names)})", "owner": "wdl",
                           "rows": g.num_rows, "dim": g.dim, "dtype": "fp32", "sharding": "wdl_row_blocks",
                           "kernel": "wdl", "ranks": list(range(min(w, g.num_rows))), "bytes": g.num_rows * per_row,
                           "features": len(g.tables) + (g.bias_row is not None)})
    return wdl_rank, tables


def _add_torchrec_shards(shards: list, by_name: dict[str, Table], dtype: str, mem: list[dict],
                         t_rank: list[dict]) -> list[dict[str, Any]]:
    """Adds each TorchRec shard's memory and TorchRec's time estimates to its rank (in place);
    returns a table entry per sharded table."""
    tables = []
    for so in shards:
        nbytes, t = 0, by_name[so.name]
        for s in so.shards:
            rows, cols = s.size
            b = rows * t.bytes_per_row * cols // t.dim  # a column shard holds its share of the row's state
            nbytes += b
            m = mem[s.rank]
            m["hbm_bytes"] += s.storage.hbm
            m["host_bytes"] += s.storage.ddr
            m["tables_bytes"] += b
            r = t_rank[s.rank]
            r["lookup_fwd"] += s.perf.fwd_compute
            r["lookup_bwd"] += s.perf.bwd_compute + s.perf.prefetch_compute
            r["input_comms"] += s.perf.input_dist_comms
            r["output_comms"] += s.perf.fwd_comms + s.perf.bwd_comms
        tables.append({"name": so.name, "owner": "torchrec", "rows": int(so.tensor.shape[0]),
                       "dim": int(so.tensor.shape[1]), "dtype": dtype, "sharding": so.sharding_type,
                       "kernel": so.compute_kernel, "ranks": sorted({s.rank for s in so.shards}), "bytes": nbytes,
                       "features": 1})
    return tables
