"""Floors to measure a training step against, and what a step launches on a GPU.

- machine(): this device's memory bandwidth (a large tensor copy) and peak float32 matmul
  FLOP/s (a large matmul), measured with short micro-benchmarks; best of a few repetitions.
- hardware_floor(): the time a step cannot beat on this device under a simple model:
  bytes of embedding traffic / bandwidth + MLP FLOPs / peak (the two added, not overlapped).
  Traffic per fused table (all tables of one part and one dimension, as wdl fuses them) from
  the batch's DISTINCT ids U and its ids N:

      U x [ 2 x row(4 x dim)  +  sum over optimiser state tensors of 2 x row(bytes per row) ]
      + 8 N (the ids)

  i.e. every touched row and its optimiser state read once and written once. row(b) rounds b
  up to the memory system's granule (a 64-byte cache line on CPU, a 32-byte sector on CUDA):
  no memory reads less, which matters for the wide part's 4-byte rows. Plus the batch's dense
  features and labels (read once), and the dense parameters: forward and backward read the
  weights, the backward writes their gradients, the optimiser reads the gradients and reads and
  writes the weights and each state tensor: (6 + 2 x state tensors) x 4 bytes per parameter.
  Activations are assumed to stay on chip, so the floor is a lower bound.
  MLP FLOPs: forward 2 x B x sum(in x out) over the Linear layers; backward twice that.
- cuda_launches(): kernels, memcpys and memsets per step from torch.profiler, and host syncs
  per step from torch.cuda.set_sync_debug_mode("warn"); CUDA only.
- mlp_floor(): the bare MLP (Linear/ReLU, BCE-with-logits, Adam) on batches already in memory,
  seconds per "epoch" of a fixed number of steps: what a Wide & Deep epoch cannot beat.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from wdl.data.batch import Batch

# Bytes of each optimiser state tensor per row of a table of dimension `dim` (wdl's row
# optimisers; FBGEMM keeps the same for adagrad / rowwise_adagrad / sgd / adam).
def state_tensor_bytes(optimizer: str, dim: int) -> list[int]:
    """Bytes per row of each per-row state tensor of `optimizer` on a table of width `dim`, as
    wdl's row optimisers allocate them (FTRL: z and n; AdaGrad: the sum of squares; ...)."""
    from wdl.config import OptimizerConfig
    from wdl.train.sparse_optim import row_rule

    rule = row_rule(OptimizerConfig(name=optimizer))
    state = rule.init_state(1, dim, torch.device("meta"))
    return [state[k].numel() * state[k].element_size() for k in rule.per_row]


_MACHINE: dict[str, dict[str, Any]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()  # first touch, kernel selection
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def machine(device: torch.device, *, copy_mib: int | None = None, matmul_n: int | None = None,
            reps: int = 5) -> dict[str, Any]:
    """Memory bandwidth (GB/s, read + write of a large copy) and peak float32 matmul GFLOP/s,
    measured once per device and process with the current thread count and matmul precision."""
    key = f"{device}:{torch.get_num_threads()}:{copy_mib}:{matmul_n}"
    if key in _MACHINE:
        return _MACHINE[key]
    cuda = device.type == "cuda"
    copy_mib = copy_mib or (1024 if cuda else 256)  # well beyond any cache
    matmul_n = matmul_n or (8192 if cuda else 2048)
    src = torch.ones(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, reps)
    bandwidth = 2 * src.numel() * 4 / copy_s  # every byte read once and written once
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=device)
    b = torch.randn(matmul_n, matmul_n, device=device)
    mm_s = _best_seconds(lambda: a @ b, device, reps)
    peak = 2 * matmul_n**3 / mm_s
    _MACHINE[key] = {
        "device": str(device), "threads": torch.get_num_threads(),
        "memory_bandwidth_gbs": bandwidth / 1e9, "peak_gflops": peak / 1e9,
        "copy_mib": copy_mib, "matmul_n": matmul_n, "matmul_precision": torch.get_float32_matmul_precision(),
        "granule_bytes": granule(device),
    }
    return _MACHINE[key]


def granule(device: torch.device) -> int:
    """The smallest amount a random access moves: a 32-byte sector on CUDA, a 64-byte line on CPU."""
    return 32 if device.type == "cuda" else 64


def _round_up(nbytes: int, g: int) -> int:
    return -(-nbytes // g) * g


def table_groups(model, optim_cfg) -> list[dict[str, Any]]:
    """The fused tables of a WideDeep model: one per (part, dim), each feature at its row offset.

    model: wdl.model.wide_deep.WideDeep (unwrapped); optim_cfg: cfg.optim (wide and deep names).
    Works for both backends: TorchRec's per-feature tables touch the same distinct rows.
    """
    groups: dict[tuple[str, int], dict[str, Any]] = {}
    for t in model.table_specs():
        part = "wide" if t.name.startswith("wide_") else "deep"
        g = groups.setdefault((part, t.dim), {"part": part, "dim": t.dim, "features": [], "offsets": [], "rows": 0,
                                             "optimizer": getattr(optim_cfg, part).name})
        g["features"].append(t.feature)
        g["offsets"].append(g["rows"])
        g["rows"] += t.num_embeddings
    return list(groups.values())


def mlp_linear_sizes(model) -> list[tuple[int, int]]:
    """(in, out) of every Linear layer of the deep tower (empty for a wide-only model)."""
    if getattr(model, "deep", None) is None:
        return []
    return [(m.in_features, m.out_features) for m in model.deep.mlp if isinstance(m, nn.Linear)]


def mlp_flops(layers: list[tuple[int, int]], batch_size: int) -> float:
    """Forward + backward FLOPs of an MLP step: 3 x 2 x B x sum(in x out)."""
    return 3 * 2 * batch_size * sum(i * o for i, o in layers)


def dense_param_bytes(n_params: int, optimizer: str) -> int:
    return 4 * n_params * (6 + 2 * len(state_tensor_bytes(optimizer, 1)))


def embedding_traffic(batch: Batch, groups: list[dict[str, Any]], g: int) -> dict[str, Any]:
    """Bytes one step must move for the embedding tables, per the model in the module docstring."""
    total, detail = 0, []
    for grp in groups:
        ids = torch.cat([batch.sparse[f].values + off for f, off in zip(grp["features"], grp["offsets"])])
        n = ids.numel()
        u = int(torch.unique(ids).numel()) + (1 if grp["part"] == "wide" else 0)  # the wide bias row
        per_row = 2 * _round_up(4 * grp["dim"], g) + sum(2 * _round_up(b, g)
                                                          for b in state_tensor_bytes(grp["optimizer"], grp["dim"]))
        nbytes = u * per_row + 8 * n
        total += nbytes
        detail.append({"part": grp["part"], "dim": grp["dim"], "ids": n, "distinct": u, "bytes": nbytes})
    return {"bytes": total, "groups": detail}


def hardware_floor(model, optim_cfg, batches: list[Batch], device: torch.device, hw: dict[str, Any]) -> dict[str, Any]:
    """Per step, averaged over `batches`: bytes, FLOPs, and the floor's seconds and samples/s."""
    groups = table_groups(model, optim_cfg)
    layers = mlp_linear_sizes(model)
    dense_params = sum(p.numel() for p in model.deep.mlp.parameters()) if layers else 0
    g = granule(device)
    emb, flops, other, rows, distinct = 0.0, 0.0, 0.0, 0, {}
    for b in batches:
        t = embedding_traffic(b, groups, g)
        emb += t["bytes"]
        for d in t["groups"]:
            distinct.setdefault(f"{d['part']}_d{d['dim']}", []).append(d["distinct"])
        flops += mlp_flops(layers, len(b))
        other += b.dense.numel() * 4 + b.labels.numel() * 4 + dense_param_bytes(dense_params, optim_cfg.deep.name)
        rows += len(b)
    n = len(batches)
    emb, flops, other, batch_size = emb / n, flops / n, other / n, rows / n
    mem_s = (emb + other) / (hw["memory_bandwidth_gbs"] * 1e9)
    compute_s = flops / (hw["peak_gflops"] * 1e9)
    seconds = mem_s + compute_s
    return {
        "samples_per_second": batch_size / seconds, "step_seconds": seconds, "memory_seconds": mem_s,
        "compute_seconds": compute_s, "embedding_bytes_per_step": emb, "other_bytes_per_step": other,
        "flops_per_step": flops, "distinct_rows_per_step": {k: sum(v) / len(v) for k, v in distinct.items()},
        "memory_bandwidth_gbs": hw["memory_bandwidth_gbs"], "peak_gflops": hw["peak_gflops"],
    }


def cuda_launches(step: Callable[[Batch], None], batches: list[Batch], steps: int = 5) -> dict[str, Any]:
    """Kernels, memcpys, memsets and host syncs per training step, on batches already on the GPU.

    Kernels are the profiler's CUDA-side events (not the launch calls), so library kernels
    (cuBLAS, FBGEMM) count too; syncs are the warnings of sync debug mode (cudaStreamSynchronize
    behind .item(), nonzero, a blocking copy...), which the docs call best-effort.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = min(steps, len(batches))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches[:steps]:
            step(b)
        torch.cuda.synchronize()
    kernels = memcpy = memset = launch_calls = graph_launches = 0
    for e in prof.events():
        name = e.name.lower()
        if e.device_type == DeviceType.CUDA:
            if name.startswith("memcpy"):
                memcpy += 1
            elif name.startswith("memset"):
                memset += 1
            else:
                kernels += 1
        elif "launchkernel" in name:  # cudaLaunchKernel, cuLaunchKernel, cudaLaunchKernelExC: a cross-check
            launch_calls += 1
        elif "graphlaunch" in name:  # cudaGraphLaunch: a replayed CUDA graph's kernels from one call
            graph_launches += 1

    syncs = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches[:steps]:
                step(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    return {"kernels_per_step": kernels / steps, "memcpy_per_step": memcpy / steps, "memset_per_step": memset / steps,
            "launch_calls_per_step": launch_calls / steps, "graph_launches_per_step": graph_launches / steps,
            "syncs_per_step": syncs / steps, "profiled_steps": steps}


def mlp_floor_step(*, input_dim: int, hidden: Iterable[int], batch_size: int, steps: int, device: torch.device,
                   lr: float = 1e-3, seed: int = 0) -> Callable[[int], Tensor]:
    """The bare MLP's training step on batch i (of `steps`): nn.Sequential(Linear, ReLU, ...,
    Linear(., 1)), BCE with logits, Adam, rows sliced from tensors already on `device`; returns
    the loss (on the device)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    model = nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    x = torch.randn(steps * batch_size, input_dim, generator=gen).to(device)
    y = (torch.rand(steps * batch_size, generator=gen) < 0.3).float().to(device)

    def step(i: int) -> Tensor:
        sl = slice(i * batch_size, (i + 1) * batch_size)
        loss = loss_fn(model(x[sl]).squeeze(1), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def mlp_floor(*, input_dim: int, hidden: Iterable[int], batch_size: int, steps: int, epochs: int,
              device: torch.device, lr: float = 1e-3, seed: int = 0) -> list[dict[str, Any]]:
    """Seconds per epoch of the bare MLP (mlp_floor_step), `steps` batches of `batch_size` rows."""
    step = mlp_floor_step(input_dim=input_dim, hidden=hidden, batch_size=batch_size, steps=steps, device=device,
                          lr=lr, seed=seed)
    records = []
    for epoch in range(1, epochs + 1):
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        _sync(device)
        seconds = time.perf_counter() - start
        records.append({"epoch": epoch, "train_seconds": seconds, "samples_per_second": steps * batch_size / seconds,
                        "steps": steps, "batch_size": batch_size, "train_loss": float(loss)})
    return records
