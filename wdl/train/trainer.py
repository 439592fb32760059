"""The Trainer: a table of contents of a training run.

    __init__: run folder -> data -> model -> optimisers -> metrics
    train():  for each epoch: train_epoch -> evaluate -> log
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wdl.checkpoint import Checkpointer
from wdl.config import Config, save_config
from wdl.data.dataset import build_loaders, check_unknown, feature_spec, open_dataset
from wdl.data.prefetch import to_device
from wdl.distributed.env import DistEnv, all_gather_cat, all_reduce_sum, barrier
from wdl.distributed.sharding import check_placement
from wdl.errors import ConfigError, TrainingError, WdlError
from wdl.ingest.prepare import open_or_prepare
from wdl.model.embeddings import resolve_backend
from wdl.train.evaluate import evaluate
from wdl.train.graphed_step import GraphedStep
from wdl.train.metrics import MetricsLogger
from wdl.train.build import build_model, deep_fused_optimizer, model_signature
from wdl.train.optim import build_optimizers
from wdl.train import run_log
from wdl.train.run_folder import RunFolder
from wdl.train.schedule import LrSchedule
from wdl.train.selection import Selection


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.backend = resolve_backend(cfg.model.embedding_backend)
        deep_tables = [f"deep_{f}" for f in cfg.model.deep.embeddings] if self.backend == "torchrec" else []
        check_placement(cfg.distributed, deep_tables, env)  # fail before any data is touched
        fused = deep_fused_optimizer(cfg, env, self.backend)
        if cfg.train.cuda_graph and (self.device.type != "cuda" or self.backend != "torch" or env.world_size > 1):
            raise ConfigError(f"train.cuda_graph=true needs one process on a CUDA device with model.embedding_backend="
                              f"torch; this run has {env.world_size} process(es) on {self.device}, {self.backend} tables")
        if cfg.train.compile != "none" and self.device.type == "cpu" and cpu_compiler() is None:
            raise ConfigError(f"train.compile={cfg.train.compile} on a CPU needs a C++ compiler (g++, c++ or "
                              "clang++ on PATH, or $CXX); install one or set train.compile=none")

        # 1. Run folder (rank 0 picks and locks it, everyone uses it) and the checkpoint to resume
        #    from. A start that fails before training removes a folder it created.
        self.folder, self.run_dir, resume_from, restart = _open_run_folder(cfg, env)
        run_log.attach(self.run_dir / ("run.log" if env.is_main else f"run-rank{env.rank}.log"))
        try:
            self._build(resume_from, restart, fused)
        except BaseException:
            if self.folder is not None:
                self.folder.discard_if_unused()
            raise

    def _build(self, resume_from: Path | None, restart: bool, fused: Any) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:  # a resumed run keeps its first config.yaml and adds config-2.yaml, ...
            target, i = self.run_dir / "config.yaml", 1
            while target.exists():
                i += 1
                target = self.run_dir / f"config-{i}.yaml"
            save_config(cfg, target)

        # 2. Data: rank 0 prepares a missing data set while the others wait, then everyone reads it.
        if env.is_main:
            manifest = open_or_prepare(cfg.data)
        barrier()
        if not env.is_main:
            manifest = open_dataset(cfg.data)
        self.spec = feature_spec(cfg, manifest)
        loaders = build_loaders(cfg.data, manifest, self.spec, rank=env.rank, world_size=env.world_size,
                                device=self.device, seed=cfg.run.seed)
        self.train_loader, self.test_loader = loaders.train, loaders.test
        self.unknown = loaders.unknown
        line = check_unknown(loaders.unknown, cfg.data.max_unknown_fraction)
        if line and env.is_main:
            print(f"wdl: {line}", flush=True)
        # Each epoch is scored on the validation split when there is one (it picks the epoch, and
        # the test split is scored once at the end); else on the test split.
        self.eval_loader = loaders.valid or loaders.test
        self.eval_name = ("valid" if loaders.valid is not None else cfg.data.eval_split)
        self.selection = Selection(cfg.train.early_stopping) if loaders.valid is not None else None
        if env.is_main:
            _warn_single_class(manifest, [s for s in (cfg.data.train_split, cfg.data.valid_split, cfg.data.eval_split) if s])

        # 3. Model: knows nothing of distribution. Its tables are only described (meta device):
        #    placement allocates and initialises each rank's rows, so none exists whole anywhere.
        # 4. Placement (TorchRec shards + DDP for the dense layers, or wdl's row-split tables +
        #    DDP) and optimisers: FTRL for the wide part, AdaGrad (or another) for the deep part,
        #    sparse row updates for every table. See distributed/sharding.py and train/optim.py.
        model, model_cfg, self.placed = build_model(cfg, self.spec, env, self.backend, fused)
        self.model = self.placed.model  # what a step calls (maybe wrapped)
        self.wide_deep = model  # the model itself, unwrapped (its parameter objects are the live ones)
        self.optimizer = build_optimizers(model, cfg.optim, self.placed.fused_optimizer, capturable=cfg.train.cuda_graph)
        # The whole step as one CUDA graph (train.cuda_graph), on batches of fixed shapes.
        self.graphed = GraphedStep(self._step, self.optimizer.rates) if cfg.train.cuda_graph else None
        if self.graphed is not None:
            self.train_loader.fix_shapes()
        if cfg.train.compile != "none":
            self.optimizer.compile()
            if model.deep is not None:
                model.deep.compile_head(mode=cfg.train.compile)
        self.schedule = LrSchedule(cfg.optim.schedule)  # warm-up, decay on a validation plateau
        # Seed the global RNGs (dropout) only now: building and sharding the model draw from them,
        # so seeding here gives the same masks for every backend and world size.
        _seed_everything(cfg.run.seed + env.rank)
        if env.is_main:
            (self.run_dir / "plan.txt").write_text(self.placed.plan + "\n")
            print(f"wdl: sharding plan in {self.run_dir / 'plan.txt'}", flush=True)

        # 5. Metrics (rank 0) and checkpoints; resume if asked.
        self.metrics = MetricsLogger(self.run_dir, env.is_main, self.eval_name)
        if restart:  # an earlier attempt logged epochs but died before its first checkpoint
            self.metrics.load_existing(keep_epochs=0)
        self.epoch, self.step, self.batches_done = 0, 0, 0  # batches_done: trained in the current epoch
        # The current epoch's summed loss (on the device) and rows, so far: a resumed epoch reports all of it.
        self.epoch_loss, self.epoch_rows = torch.zeros((), dtype=torch.float64, device=self.device), 0
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        if self.folder is not None:
            self.folder.check_writable(ckpt_dir, "checkpoint.dir")
        self.checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep, env.rank, env.world_size,
                                         signature=model_signature(model_cfg, self.spec),
                                         read_order=_read_order(cfg, manifest))
        self.checkpointer.clear_unfinished()  # this run holds the folder's lock
        if resume_from is not None:
            self._resume(resume_from)

    # ------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.train
        if cfg.eval_only:
            return self.evaluate_only()
        if self.env.is_main:
            n = self.train_loader.num_rows
            print(f"wdl: {self.cfg.model.kind} ({self.backend} embeddings) on {self.device}, "
                  f"world size {self.env.world_size}; {n} train rows, {self.train_loader.steps_per_epoch} steps/epoch; "
                  f"run folder {self.run_dir}", flush=True)
        while self.epoch < cfg.epochs and not self._out_of_steps() and not self._stop_early():
            train_stats = self.train_epoch()
            if not math.isfinite(train_stats["train_loss"]):  # the same all-reduced value on every rank
                raise TrainingError(
                    f"training diverged: the train loss of epoch {self.epoch + 1} (steps {self.step - train_stats['steps'] + 1}"
                    f"-{self.step}) is {train_stats['train_loss']}; lower optim.wide.lr / optim.deep.lr "
                    "(nothing saved since the loss stopped being finite)")
            eval_stats = self.evaluate(self.eval_loader)
            rss = all_gather_cat(torch.tensor([_peak_rss_mb()], dtype=torch.float64)).tolist()
            record = {"epoch": self.epoch + 1, **train_stats, "eval_split": self.eval_name, **eval_stats,
                      "peak_rss_mb": max(rss), "peak_rss_mb_per_rank": rss}
            self.metrics.log_epoch(record)
            complete = self.batches_done >= self.train_loader.steps_per_epoch
            if complete:
                self.epoch, self.batches_done = self.epoch + 1, 0
            # Only whole epochs are selected from (as a resume rebuilds the selection): a model
            # cut mid-epoch by train.max_steps is never `best`.
            if self.selection is not None and complete:
                improved = self.selection.update(record["epoch"], record[self.selection.cfg.metric])
                if improved:
                    self.save_checkpoint(name="best")
                if self.schedule.epoch_end(improved) and self.env.is_main:
                    print(f"wdl: no better {self.eval_name} {self.selection.cfg.metric} for "
                          f"{self.cfg.optim.schedule.plateau_patience} epoch(s): learning rates x{self.schedule.decay:g} "
                          "of the configured ones", flush=True)
            if self.cfg.checkpoint.at_epoch_end:
                self.save_checkpoint()
        test = self.score_selected() if self.selection is not None else None
        return self.metrics.write_summary({"steps": self.step, "world_size": self.env.world_size,
                                           "device": str(self.device), "peak_rss_mb": _peak_rss_mb(),
                                           "unknown_ids": self.unknown},
                                          selection=self.selection, test=test, test_split=self.cfg.data.eval_split)

    def score_selected(self) -> dict[str, Any] | None:
        """Score the test split once, with the model of the best validation epoch."""
        best = self.checkpointer.folder / "best"
        if self.selection.best_epoch is None:
            return None
        saved = json.loads((best / "meta.json").read_text()) if (best / "meta.json").exists() else {}
        if (saved.get("epoch"), saved.get("batches_done")) != (self.selection.best_epoch, 0) or saved.get("step", 0) > self.step:
            # e.g. this run continued from a checkpoint older than the best one, and no later epoch beat it
            if self.env.is_main:
                print(f"wdl: warning: {best} does not hold the model of epoch {self.selection.best_epoch} (this run "
                      f"continued from an earlier checkpoint); the {self.cfg.data.eval_split} split is not scored",
                      file=sys.stderr, flush=True)
            return None
        self._load(best)
        return {"epoch": self.selection.best_epoch, **self.evaluate(self.test_loader)}

    def close(self) -> None:
        """Give up the run folder (the lock also goes when the process dies)."""
        if self.folder is not None:
            self.folder.release()

    def train_epoch(self) -> dict[str, Any]:
        self.model.train()
        # The trainer counts the batches it trained (the loader may be read one batch ahead).
        self.train_loader.load_state_dict({"epoch": self.epoch, "batches_done": self.batches_done})
        if self.batches_done == 0:
            self.epoch_loss.zero_()
            self.epoch_rows = 0
        resumed_at = self.batches_done  # > 0 when resuming mid-epoch
        rows, steps = 0, 0
        self.optimizer.scale_lr(self.schedule.scale(self.step))
        lr_scale = self.schedule.scale(self.step - resumed_at)  # the epoch's first step's, across a resume
        bar = self._progress(self.train_loader.steps_per_epoch - self.batches_done)
        start = time.perf_counter()
        for batch in to_device(self.train_loader, self.device):
            if self.schedule.warming_up(self.step):
                self.optimizer.scale_lr(self.schedule.scale(self.step))
            loss = self.train_step(batch)
            self.epoch_loss += loss * len(batch)  # summed on the device: no host sync per step
            self.epoch_rows += len(batch)
            rows += len(batch)
            steps += 1
            self.step += 1
            self.batches_done += 1
            if bar is not None:
                bar.update(1)
            _maybe_kill(self.cfg.train.kill_at_step, self.step, self.env)
            every = self.cfg.checkpoint.every_steps
            # An epoch's last step is saved at the epoch's end (checkpoint.at_epoch_end), after its evaluation.
            if every and self.step % every == 0 and (self.batches_done < self.train_loader.steps_per_epoch
                                                     or not self.cfg.checkpoint.at_epoch_end):
                self._check_finite()
                self.save_checkpoint()
            if self._out_of_steps():
                break
        _sync(self.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        # A streamed split's ids were checked on a sample at start; every one read is checked now.
        check_unknown({f"{self.cfg.data.train_split} (epoch {self.epoch + 1})": self.train_loader.unknown_counts(
            all_reduce_sum)}, self.cfg.data.max_unknown_fraction)
        if self.graphed is not None and (line := self.graphed.shortfall()) and self.env.is_main:
            print(f"wdl: warning: {line}", file=sys.stderr, flush=True)
        totals = all_reduce_sum(torch.cat([self._epoch_sums(), torch.tensor([float(rows)], dtype=torch.float64)]))
        epoch_rows, rows_now = int(totals[1].item()), int(totals[2].item())
        return {
            "train_loss": float(totals[0] / max(epoch_rows, 1)),  # the whole epoch, across a resume
            "train_seconds": seconds,
            "samples_per_second": rows_now / seconds if seconds > 0 else float("nan"),
            "train_rows": epoch_rows,
            "steps": steps,
            "resumed_at_batch": resumed_at,
            "lr_scale": lr_scale,  # the schedule's multiplier at the epoch's start
            **(self.graphed.counters() if self.graphed is not None else {}),  # steps replayed, so far
        }

    def train_step(self, batch: Any) -> torch.Tensor:
        """One optimiser step on `batch`; its mean loss (detached, on the device)."""
        return self._step(batch) if self.graphed is None else self.graphed(batch)

    def _step(self, batch: Any) -> torch.Tensor:
        """The step itself (what a CUDA graph captures).

        zero_grad comes first: TorchRec's fused optimiser hands its learning rate to FBGEMM
        there, and FBGEMM's CPU kernels read it in the forward pass."""
        self.optimizer.zero_grad()
        loss, _ = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def evaluate(self, loader: Any) -> dict[str, Any]:
        start = time.perf_counter()
        loader.load_state_dict({"epoch": 0, "batches_done": 0})
        m = evaluate(self.model, loader, self.device, self.cfg.train.ranking_group, self.cfg.train.ranking_k)
        return {**m, "eval_seconds": time.perf_counter() - start}

    def evaluate_only(self) -> dict[str, Any]:
        result = {"epoch": self.epoch, "step": self.step, "world_size": self.env.world_size,
                  **self.evaluate(self.test_loader)}
        if self.env.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{self.cfg.data.eval_split} AUC {result['auc']:.6f} logloss {result['logloss']:.6f} "
                  f"({result['rows']} rows, model at epoch {self.epoch}, step {self.step})", flush=True)
        return result

    # --- checkpoints ------------------------------------------------------------------------

    def _progress_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "batches_done": self.batches_done}

    def _app_state(self, epoch_sums: torch.Tensor) -> dict[str, Any]:
        return {"model": self.placed.state_module.state_dict(), "optim": self.optimizer.state_dict(),
                "epoch_sums": epoch_sums}

    def save_checkpoint(self, name: str | None = None) -> Path:
        # The epoch's loss and rows so far, summed over ranks (saved once, restored on rank 0).
        return self.checkpointer.save(self._app_state(all_reduce_sum(self._epoch_sums())),
                                      self._progress_state(), name=name)

    def _epoch_sums(self) -> torch.Tensor:
        """[loss summed over rows, rows] of the current epoch on this rank, float64 on the CPU."""
        return torch.stack([self.epoch_loss.cpu(), torch.tensor(float(self.epoch_rows), dtype=torch.float64)])

    def _load(self, path: Path) -> tuple[dict[str, int], dict[str, Any]]:
        # DCP fills these tensors in place (split ones as this world size splits them).
        app = self._app_state(torch.zeros(2, dtype=torch.float64))
        progress = self.checkpointer.load(path, app, self._progress_state())
        self.placed.state_module.load_state_dict(app["model"])
        self.optimizer.load_state_dict(app["optim"])
        return progress, app

    def _resume(self, path: Path) -> None:
        progress, app = self._load(path)
        if self.env.is_main and progress["batches_done"] > 0:
            self.epoch_loss.fill_(app["epoch_sums"][0])
            self.epoch_rows = int(app["epoch_sums"][1])
        self.epoch, self.step, self.batches_done = progress["epoch"], progress["step"], progress["batches_done"]
        if self.folder is not None and path.parent.resolve() == self.checkpointer.folder.resolve():  # this run, continued
            moved = self.checkpointer.set_aside_after(self.step)
            if moved and self.env.is_main:
                print(f"wdl: continuing from step {self.step}, before this run's {', '.join(moved)}: those are moved "
                      f"to {self.checkpointer.folder / f'abandoned-after-step-{self.step:08d}'}", flush=True)
        self.metrics.load_existing(keep_epochs=self.epoch)
        if self.selection is not None:
            self.schedule.replay(self.selection.replay(self.metrics.records))
        if self.env.is_main:
            print(f"wdl: resumed from {path} (epoch {self.epoch + 1}, step {self.step}, "
                  f"{progress['batches_done']} batches into the epoch)", flush=True)

    # ------------------------------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Refuse to save a model whose epoch loss so far is not finite (one host read per save)."""
        if not math.isfinite(float(all_reduce_sum(self._epoch_sums())[0])):
            raise TrainingError(f"training diverged: the train loss of epoch {self.epoch + 1} up to step {self.step} is not "
                                "finite; lower optim.wide.lr / optim.deep.lr (nothing saved since the loss stopped being finite)")

    def _out_of_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.step

    def _stop_early(self) -> bool:
        if self.selection is None or not self.selection.should_stop():
            return False
        if self.env.is_main:
            print(f"wdl: early stop after epoch {self.selection.last_epoch}: no better {self.eval_name} "
                  f"{self.selection.cfg.metric} for {self.selection.cfg.patience} epochs", flush=True)
        return True

    def _progress(self, total: int):
        if not (self.env.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        # disable=None: a bar only on a terminal, never a log file full of redrawn bars (as wdl data does)
        return tqdm(total=total, desc=f"epoch {self.epoch + 1}", unit="step", leave=False, dynamic_ncols=True,
                    disable=None)


def _open_run_folder(cfg: Config, env: DistEnv) -> tuple[RunFolder | None, Path, Path | None, bool]:
    """Rank 0 opens (and locks) the run folder; every rank learns where it is and what to resume."""
    folder, box = None, [None, None, False, None]
    if env.is_main:
        try:
            folder = RunFolder.open(cfg)
            box = [str(folder.path), str(folder.resume_from) if folder.resume_from else None, folder.restart, None]
        except WdlError as e:
            box = [None, None, False, e]
    if env.distributed:
        dist.broadcast_object_list(box, src=0)
    if box[3] is not None:
        raise box[3]
    return folder, Path(box[0]), Path(box[1]) if box[1] else None, box[2]


def _warn_single_class(manifest: Any, splits: list[str]) -> None:
    for split in dict.fromkeys(splits):
        rate = manifest.split(split).positive_rate
        if rate in (0.0, 1.0):
            print(f"wdl: warning: every label of the {split!r} split is {int(rate)}, so its AUC is undefined "
                  f"(shown as '-'); logloss is still computed", file=sys.stderr, flush=True)


def _read_order(cfg: Config, manifest: Any) -> dict[str, Any]:
    """The settings that fix which rows each step reads within an epoch (see data/parquet.py),
    and the data set itself (its manifest names every shard and its row count)."""
    d = cfg.data
    identity = manifest.identity
    order = {"data.batch_size": d.batch_size, "data.in_memory": d.in_memory, "run.seed": cfg.run.seed,
             "data.valid_split": d.valid_split, "data.valid_fraction": d.valid_fraction,  # what train holds
             "data set (manifest hash)": identity}
    if not d.in_memory:
        order |= {"data.num_workers": d.num_workers, "data.shuffle_buffer": d.shuffle_buffer}
    return order


def _maybe_kill(kill_at_step: int, step: int, env: DistEnv) -> None:
    """Fault injection for tests: the last rank SIGKILLs itself once, on the first attempt."""
    import os
    import signal

    if kill_at_step and step == kill_at_step and env.rank == env.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile would build CPU kernels with, if there is one."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
