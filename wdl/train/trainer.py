"""The Trainer: a table of contents of a training run.

    __init__: run folder -> data -> model -> optimisers -> metrics
    train():  for each epoch: train_epoch -> evaluate -> log
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wdl.config import Config, RunConfig, save_config
from wdl.data.dataset import build_loader, feature_spec, open_dataset
from wdl.distributed.env import DistEnv
from wdl.model.embeddings import resolve_backend
from wdl.model.wide_deep import WideDeep, WideDeepTrain
from wdl.train.evaluate import evaluate
from wdl.train.metrics import MetricsLogger
from wdl.train.optim import Optimizers, build_optimizer


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device

        # 1. Run folder (rank 0 picks it, everyone uses it) and seeds.
        self.run_dir = _make_run_dir(cfg.run, env)
        _seed_everything(cfg.run.seed + env.rank)
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

        # 2. Data: rank 0 prepares a missing data set while the others wait, then everyone reads it.
        if env.is_main:
            manifest = open_dataset(cfg.data)
        _barrier(env)
        if not env.is_main:
            manifest = open_dataset(cfg.data, may_prepare=False)
        self.spec = feature_spec(cfg, manifest)
        loader_args = dict(rank=env.rank, world_size=env.world_size, device=self.device, seed=cfg.run.seed)
        self.train_loader = build_loader(cfg.data, manifest, self.spec, cfg.data.train_split, train=True, **loader_args)
        self.eval_loader = build_loader(cfg.data, manifest, self.spec, cfg.data.eval_split, train=False, **loader_args)

        # 3. Model: built and initialised the same way whatever the backend or world size.
        cfg.model.embedding_backend = resolve_backend(cfg.model.embedding_backend)
        sizes = {k: self.spec.num_embeddings(k) for k in self.spec.sparse_keys}
        model = WideDeep(cfg.model, sizes, self.spec.dense_dim, device=self.device)
        model.init_parameters(cfg.run.seed)
        self.model = WideDeepTrain(model)

        # 4. Optimisers: FTRL (or another) for the wide part, AdaGrad (or another) for the deep part.
        groups = model.param_groups()
        self.optimizer = Optimizers(
            {part: build_optimizer(getattr(cfg.optim, part), params) for part, params in groups.items() if params}
        )

        # 5. Metrics: rank 0 writes metrics.jsonl and the console table.
        self.metrics = MetricsLogger(self.run_dir, env.is_main, cfg.data.eval_split)
        self.epoch, self.step = 0, 0
        self.peak_rss_mb = 0.0

    # ------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.train
        if self.env.is_main:
            n = self.train_loader.num_rows
            print(f"wdl: {self.cfg.model.kind} ({self.cfg.model.embedding_backend} embeddings) on {self.device}, "
                  f"world size {self.env.world_size}; {n} train rows, {self.train_loader.steps_per_epoch} steps/epoch; "
                  f"run folder {self.run_dir}", flush=True)
        while self.epoch < cfg.epochs and not self._out_of_steps():
            train_stats = self.train_epoch()
            eval_stats = self.evaluate()
            self.metrics.log_epoch({"epoch": self.epoch + 1, **train_stats, **eval_stats})
            self.epoch += 1
        return self.metrics.write_summary({"steps": self.step, "world_size": self.env.world_size,
                                           "device": str(self.device), "peak_rss_mb": _peak_rss_mb()})

    def train_epoch(self) -> dict[str, Any]:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        loss_sum = torch.zeros((), device=self.device)  # summed on device: no host sync per step
        rows, steps = 0, 0
        bar = self._progress(self.train_loader.steps_per_epoch - self.train_loader.batches_done)
        start = time.perf_counter()
        for batch in self.train_loader:
            batch = batch.to(self.device, non_blocking=True)
            loss, _ = self.model(batch)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach() * len(batch)
            rows += len(batch)
            steps += 1
            self.step += 1
            if bar is not None:
                bar.update(1)
            if self._out_of_steps():
                break
        _sync(self.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        totals = _all_reduce_sum(torch.stack([loss_sum.float().cpu(), torch.tensor(float(rows))]), self.env)
        global_rows = int(totals[1].item())
        return {
            "train_loss": float(totals[0] / max(global_rows, 1)),
            "train_seconds": seconds,
            "samples_per_second": global_rows / seconds if seconds > 0 else float("nan"),
            "train_rows": global_rows,
            "steps": steps,
        }

    def evaluate(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.eval_loader.set_epoch(0)
        self.eval_loader.load_state_dict({"epoch": 0, "batches_done": 0})
        m = evaluate(self.model.model, self.eval_loader, self.device)
        return {**m, "eval_seconds": time.perf_counter() - start}

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------

    def _out_of_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.step

    def _progress(self, total: int):
        if not (self.env.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"epoch {self.epoch + 1}", unit="step", leave=False, dynamic_ncols=True)


def _make_run_dir(cfg: RunConfig, env: DistEnv) -> Path:
    """out_dir/name, or name-1, name-2, ... so an earlier run's files are never overwritten."""
    path = None
    if env.is_main:
        base = Path(cfg.out_dir) / cfg.name
        path, i = base, 0
        while path.exists() and any(path.iterdir()):
            i += 1
            path = base.with_name(f"{base.name}-{i}")
        path.mkdir(parents=True, exist_ok=True)
    if env.distributed:
        box = [str(path) if path else None]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.distributed:
        return t
    t = t.to(env.device) if env.backend == "nccl" else t
    dist.all_reduce(t)
    return t.cpu()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())
