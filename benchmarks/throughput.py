"""Throughput of one training configuration, next to its two floors, measured in-process.

- ours: the Trainer's own loader, model and optimisers (built by `Trainer`), stepped the way
  `Trainer.train_epoch` steps them, each step timed from the end of the previous one, so the
  time includes reading and converting the data (streaming, or in memory if the config says so).
- compute floor: the same model and optimisers fed from batches already built in memory, timing
  forward, backward and optimiser step only.
- hardware floor: bytes of embedding traffic / memory bandwidth + MLP FLOPs / peak FLOP/s, both
  measured on this device (see benchmarks/floors.py), for the same batches.
- on CUDA, kernels, memcpys and host syncs per training step (benchmarks/floors.py).
- reader: the StreamingLoader alone (Parquet -> Batches) vs a bare pyarrow read of the same row
  groups and columns, in rows per second.
Warm-up steps are run first and not timed.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch

from wdl.config import Config
from wdl.data.batch import Batch


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _endless(loader) -> Iterator[Batch]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        loader.load_state_dict({"epoch": epoch, "batches_done": 0})
        yield from loader
        epoch += 1


def _step(model, optimizer, batch: Batch) -> None:
    loss, _ = model(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _timed(model, optimizer, batches: Iterator[Batch], device, warmup: int, steps: int) -> dict[str, float]:
    """`batches` are already on `device`. On CUDA the host never waits inside the window (the
    step times come from CUDA events, the total from one synchronize at the end), so the host
    may queue a step while the previous one runs, as in training."""
    model.train()
    for _ in range(warmup):
        _step(model, optimizer, next(batches))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
    times, rows = [], 0
    start = last = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        _step(model, optimizer, batch)
        rows += len(batch)
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        else:
            now = time.perf_counter()
            times.append(now - last)
            last = now
    if cuda:
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])]
    total = time.perf_counter() - start
    return {"samples_per_second": rows / total, "step_p50_ms": 1000 * _percentile(times, 0.5),
            "step_p90_ms": 1000 * _percentile(times, 0.9), "steps": steps, "timed_seconds": total}


def measure(cfg: Config, run_dir: Path, *, warmup_steps: int, steps: int,
            profile_steps: int = 5) -> list[dict[str, Any]]:
    """Records for `ours`, `compute_floor` and `hardware_floor` on one configuration; on CUDA,
    `ours` also carries kernels, memcpys and host syncs per step (None elsewhere)."""
    from benchmarks import floors
    from wdl.data.prefetch import to_device
    from wdl.distributed.env import init_distributed
    from wdl.train.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    cfg.train.progress = False
    trainer = Trainer(cfg, init_distributed(cfg.run.device))
    device = trainer.device
    hw = floors.machine(device)  # before the tables are touched; cached per process
    # Ours: the loader's batches reach the device the way Trainer.train_epoch moves them.
    ours = _timed(trainer.model, trainer.optimizer, to_device(_endless(trainer.train_loader), device), device,
                  warmup_steps, steps)
    # The floor: the same batches, built before the clock starts.
    it = _endless(trainer.train_loader)
    cached = [next(it).to(device) for _ in range(min(steps, 64))]
    cycle = (cached[i % len(cached)] for i in range(10**12))
    floor = _timed(trainer.model, trainer.optimizer, cycle, device, warmup_steps, steps)
    hard = floors.hardware_floor(trainer.wide_deep, cfg.optim, cached, device, hw)
    launches: dict[str, Any] = {k: None for k in ("kernels_per_step", "memcpy_per_step", "syncs_per_step")}
    if device.type == "cuda":
        try:
            launches = floors.cuda_launches(lambda b: _step(trainer.model, trainer.optimizer, b), cached, profile_steps)
        except Exception as e:  # the profiler (CUPTI) may be unavailable: say so, keep the timings
            launches["launch_error"] = f"{type(e).__name__}: {e}"
    common = {"backend": trainer.backend, "device": str(device)}
    return [{"variant": "ours", **common, **ours, **launches}, {"variant": "compute_floor", **common, **floor},
            {"variant": "hardware_floor", **common, **hard}]


def measure_reader(cfg: Config, *, max_rows: int) -> list[dict[str, Any]]:
    """StreamingLoader vs bare pyarrow over the same row groups (up to about max_rows rows)."""
    from wdl.data.dataset import feature_spec
    from wdl.data.parquet import StreamingLoader, list_row_groups
    from wdl.ingest.prepare import open_or_prepare

    manifest = open_or_prepare(cfg.data)
    spec = feature_spec(cfg, manifest)
    # Whole files (the loader reads whole files) until about max_rows rows.
    chosen, n = [], 0
    for f in manifest.split(cfg.data.train_split).files:
        if n >= max_rows:
            break
        chosen.append(f.path)
        n += sum(u.rows for u in list_row_groups([f.path], spec))
    units = list_row_groups(chosen, spec)
    for path in chosen:  # warm the page cache for both readers alike
        path.read_bytes()

    # Bare pyarrow: read the same row groups and columns, nothing else.
    start = time.perf_counter()
    rows = 0
    handles: dict[Path, pq.ParquetFile] = {}
    for u in units:
        pf = handles.get(u.path) or handles.setdefault(u.path, pq.ParquetFile(u.path))
        rows += pf.read_row_group(u.index, columns=spec.columns).num_rows
    arrow_s = time.perf_counter() - start

    loader = StreamingLoader(chosen, spec, cfg.data.batch_size, shuffle=True,
                             shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed)
    start = time.perf_counter()
    loader_rows = sum(len(b) for b in loader)
    loader_s = time.perf_counter() - start
    return [{"variant": "bare_pyarrow", "rows": rows, "rows_per_second": rows / arrow_s, "seconds": arrow_s},
            {"variant": "reader", "rows": loader_rows, "rows_per_second": loader_rows / loader_s, "seconds": loader_s}]


def summary_stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}
