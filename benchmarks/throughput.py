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
  groups and columns, in rows per second; with `reader_workers: N`, also with N loader processes.
Warm-up steps are run first and not timed.

`throughput_system` runs a suite's `kind: throughput` system: each point of its axes (backends x
table rows x batch sizes x embedding sizes), skipping, with the reason, the points whose tables
would not fit.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch

from benchmarks.runners import say
from benchmarks.suite import SuiteRun
from wdl.config import Config, load_config
from wdl.data.batch import Batch

# The five large columns of configs/synthetic-criteo-full.yaml (hash_buckets 131072 there).
LARGE_COLUMNS = ["C3", "C4", "C12", "C16", "C21"]


def throughput_system(run: SuiteRun, system: dict) -> list[dict]:
    """Every point of the system's axes, `repetitions` times, then the reader alone
    (`reader_rows`). Tables beyond `memory_fraction` (default 0.5) of the available memory are
    skipped and said so rather than risked: on a machine shared with other jobs, filling it
    would take them down too."""
    cfg_path, overrides = run.config(system)
    recs = []
    for parts, axis, fields in axes(system):
        cfg = load_config(cfg_path, overrides + axis)
        dim = fields["embedding_dim"]
        if dim:
            cfg.model.deep.embeddings = {k: int(dim) for k in cfg.model.deep.embeddings}
        label = "-".join(parts + [f"bs{cfg.data.batch_size}"] + ([f"d{dim}"] if dim else []))
        need = _fits(run, system, cfg, label)
        if need is not None:
            recs += _measure_point(run, system, cfg, label, fields, need)
    if system.get("reader_rows"):
        cfg = load_config(cfg_path, overrides)
        for rep in range(run.reps):
            say(f"reader vs bare pyarrow rep {rep + 1}/{run.reps}")
            for r in measure_reader(cfg, max_rows=int(system["reader_rows"]),
                                    workers=int(system.get("reader_workers", 0))):
                recs.append({"system": r["variant"], "group": r["variant"], "kind": "reader", "rep": rep,
                             "warmup": False, "batch_size": cfg.data.batch_size, **r})
    return recs


def _fits(run: SuiteRun, system: dict, cfg: Config, label: str) -> int | None:
    """The bytes the point's tables and optimiser state take, or None when it is skipped."""
    from wdl.distributed.env import pick_device
    from wdl.distributed.rows import available_bytes
    from wdl.errors import WdlError
    from wdl.model.embeddings import resolve_backend

    fraction = float(system.get("memory_fraction", 0.5))
    try:
        backend = resolve_backend(cfg.model.embedding_backend)
        need = estimate_table_bytes(cfg, backend)
        device = pick_device(cfg.run.device, 0)
        have = available_bytes(device)
    except WdlError as e:
        run.skip(f"{system['name']}@{label}", str(e))
        return None
    if need > fraction * have:
        run.skip(f"{system['name']}@{label}",
                 f"the tables and optimiser state need {need / 2**30:.1f} GiB, more than memory_fraction="
                 f"{fraction} of the {have / 2**30:.1f} GiB available on {device} (a bigger machine runs it; "
                 f"or systems.N.memory_fraction=0.9)")
        return None
    return need


def _measure_point(run: SuiteRun, system: dict, cfg: Config, label: str, fields: dict, need: int) -> list[dict]:
    """`repetitions` measurements of one point: ours, the compute floor and the hardware floor."""
    from wdl.errors import WdlError

    recs = []
    for rep in range(run.reps):
        say(f"throughput {label} rep {rep + 1}/{run.reps} (tables {need / 2**30:.2f} GiB)")
        # Time enough steps to cross several shuffle blocks: a streaming reader converts
        # a block at a time, so a short window would see only cheap slicing.
        steps = max(int(system.get("steps", 50)), -(-int(system.get("timed_rows", 0)) // cfg.data.batch_size))
        try:
            got = measure(cfg, run.out / "runs" / f"throughput-{system['name']}-{label}-r{rep}",
                          warmup_steps=int(system.get("warmup_steps", 5)), steps=steps,
                          profile_steps=int(system.get("profile_steps", 5)))
        except WdlError as e:  # e.g. the placement's own memory check: one line, recorded
            run.skip(f"{system['name']}@{label}", str(e))
            break
        finally:
            gc.collect()  # the previous Trainer's tables go before the next one's are made
        for r in got:
            recs.append({"system": f"{r['variant']}@{label}", "group": r["variant"], "kind": "throughput",
                         "rep": rep, "warmup": False, "axis": system["name"], "table_bytes": need,
                         **fields, **r, "batch_size": cfg.data.batch_size})
    return recs


def axes(system: dict) -> list[tuple[list[str], list[str], dict[str, Any]]]:
    """(label parts, config overrides, record fields) for each point of a throughput system's
    axes: backends x table_rows x batch_sizes x embedding_dims, an axis left out being one point."""
    points = []
    large = system.get("large_columns", LARGE_COLUMNS)
    for backend in system.get("backends", [None]):
        for rows in system.get("table_rows", [None]):
            for bs in system.get("batch_sizes", [None]):
                for dim in system.get("embedding_dims", [None]):
                    over, parts = [], []
                    if backend:
                        over.append(f"model.embedding_backend={backend}")
                        parts.append(str(backend))
                    if rows:
                        over += [f"features.columns.{c}.hash_buckets={int(rows)}" for c in large]
                        parts.append(f"r{int(rows)}")
                    if bs:
                        over.append(f"data.batch_size={int(bs)}")
                    points.append((parts, over, {"table_rows": int(rows) if rows else None, "embedding_dim": dim,
                                                 "batch_size": bs}))
    return points


def estimate_table_bytes(cfg: Config, backend: str) -> int:
    """Bytes the embedding tables and their optimiser state take in one process (as the placement
    check counts them: wdl's fused tables keep a dedupe scratch per row there, TorchRec's do not)."""
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.data.tables import LOCAL_SCRATCH_BYTES, tables

    spec = feature_spec(cfg, open_dataset(cfg.data))
    return sum(t.rows * (t.bytes_per_row + (LOCAL_SCRATCH_BYTES if t.owner == "wdl" else 0))
               for t in tables(cfg, spec, backend))


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


def measure_reader(cfg: Config, *, max_rows: int, workers: int = 0) -> list[dict[str, Any]]:
    """StreamingLoader vs bare pyarrow over the same row groups (up to about max_rows rows);
    with `workers`, the StreamingLoader with that many loader processes too (one epoch, their
    start included, as in training; `first_batch_seconds` says how long the start took)."""
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

    out = [{"variant": "bare_pyarrow", "rows": rows, "rows_per_second": rows / arrow_s, "seconds": arrow_s}]
    for n in [0] + ([workers] if workers else []):
        loader = StreamingLoader(chosen, spec, cfg.data.batch_size, shuffle=True, num_workers=n,
                                 shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed)
        start = time.perf_counter()
        loader_rows, first, first_rows = 0, None, 0
        for b in loader:
            loader_rows += len(b)
            if first is None:
                first, first_rows = time.perf_counter() - start, len(b)
        loader_s = time.perf_counter() - start
        # After the first batch: the rate once the loader processes have started (in one process
        # the first batch carries its whole block's conversion, so the rate after it says nothing).
        steady = (loader_rows - first_rows) / (loader_s - first) if n and loader_s > first else None
        out.append({"variant": f"reader x{n} workers" if n else "reader", "workers": n, "rows": loader_rows,
                    "rows_per_second": loader_rows / loader_s, "seconds": loader_s, "first_batch_seconds": first,
                    "steady_rows_per_second": steady})
    return out
