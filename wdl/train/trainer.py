"""The Trainer: a table of contents of a training run.

    __init__: run folder -> data -> model -> optimisers -> metrics -> checkpoints (resume)
    train():  for each epoch: train_epoch (steps; step records, evaluations, checkpoints on their
              step cadences) -> the epoch's record (and what is due at its last step)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wdl.checkpoint import Checkpointer
from wdl.config import Config, save_config
from wdl.data.dataset import build_loaders, check_unknown, feature_spec, open_dataset, read_order, warn_single_class
from wdl.data.prefetch import to_device
from wdl.distributed.env import DistEnv, all_gather_cat, all_reduce_sum, barrier
from wdl.distributed.threads import IntraOpThreads
from wdl.ingest.prepare import open_or_prepare
from wdl.model.embeddings import resolve_backend
from wdl.train.evaluate import evaluate
from wdl.train.graphed_step import GraphedStep
from wdl.train.metrics import MetricsLogger, TrainSums, finite_json
from wdl.train.build import build_model, check_run, deep_fused_optimizer, model_signature
from wdl.train.divergence import Divergence
from wdl.train.warm_start import warm_start
from wdl.train.optim import build_optimizers
from wdl.train.pipeline import SparseDistSteps, wants_pipeline
from wdl.train import run_log
from wdl.train.run_folder import open_run_folder
from wdl.train.schedule import LrSchedule
from wdl.train.selection import Selection


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.threads = IntraOpThreads.start(cfg.train.threads, cfg.data, env)  # printed by rank 0
        self.device = env.device
        self.backend = resolve_backend(cfg.model.embedding_backend)
        check_run(cfg, env, self.backend)  # what the config asks of the device and packages, before any data
        fused = deep_fused_optimizer(cfg, env, self.backend)
        self.pipelined = wants_pipeline(cfg.train, cfg.model, self.backend, self.device, env.world_size)
        self.kill_at = int(os.environ.get("WDL_TEST_KILL_AT_STEP") or 0)  # fault injection for tests: _maybe_kill

        # 1. Run folder (rank 0 picks and locks it, everyone uses it) and the checkpoint to resume
        #    from. A start that fails before training removes a folder it created.
        self.folder, self.run_dir, resume_from, restart = open_run_folder(cfg, env)
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
        # Every checkpoint holds a selection state (the same keys whatever the config); it selects
        # only with a validation split.
        self.selection, self.selecting = Selection(cfg.train.early_stopping), loaders.valid is not None
        # A loss far above always predicting the train split's label rate has diverged.
        self.divergence = Divergence(cfg.train.divergence_ratio, manifest.split(cfg.data.train_split).positive_rate)
        if env.is_main:
            warn_single_class(manifest, [s for s in (cfg.data.train_split, cfg.data.valid_split, cfg.data.eval_split) if s])

        # 3. Model: knows nothing of distribution. Its tables are only described (meta device):
        #    placement allocates and initialises each rank's rows, so none exists whole anywhere.
        # 4. Placement (TorchRec shards + DDP for the dense layers, or wdl's row-split tables +
        #    DDP) and optimisers: FTRL for the wide part, AdaGrad (or another) for the deep part,
        #    sparse row updates for every table. See distributed/sharding.py and train/optim.py.
        model, model_cfg, self.placed = build_model(cfg, self.spec, env, self.backend, fused)
        self.model = self.placed.model  # what a step calls (maybe wrapped)
        self.wide_deep = model  # the model itself, unwrapped (its parameter objects are the live ones)
        self.optimizer = build_optimizers(model, cfg.optim, self.placed.fused_optimizer, capturable=cfg.train.cuda_graph,
                                          steps_per_pass=self.train_loader.steps_per_epoch)
        # The whole step as one CUDA graph (train.cuda_graph), on batches of fixed shapes.
        self.graphed = GraphedStep(self._step, self.optimizer.rates) if cfg.train.cuda_graph else None
        if self.graphed is not None:
            self.train_loader.fix_shapes()
        if cfg.train.compile != "none":
            self.optimizer.compile()
            if model.deep is not None:
                model.deep.compile_head(mode=cfg.train.compile)
        # TorchRec's train pipeline: the next batch's input distribution overlaps this step (train.pipeline).
        self.pipeline = SparseDistSteps(self.model, self.optimizer, self.device) if self.pipelined else None
        self.schedule = LrSchedule(cfg.optim.schedule)  # warm-up, decay on a validation plateau
        # Seed the global RNGs (dropout) only now: building and sharding the model draw from them,
        # so seeding here gives the same masks for every backend and world size.
        _seed_everything(cfg.run.seed + env.rank)

        # 5. Metrics (rank 0) and checkpoints; resume if asked.
        self.metrics = MetricsLogger(self.run_dir, env.is_main, self.eval_name, tensorboard=cfg.train.tensorboard)
        if restart:  # an earlier attempt logged records but died before its first checkpoint
            self.metrics.load_existing(step=0, epochs=0)
        self.epoch, self.step, self.batches_done = 0, 0, 0  # batches_done: trained in the current epoch
        self.sums = TrainSums(self.device, env.is_main)  # the loss over the epoch, log and eval intervals
        self.evaluated_at = self.saved_at = -1  # the steps of the latest evaluation and checkpoint
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        if self.folder is not None:
            self.folder.check_writable(ckpt_dir, "checkpoint.dir")
        self.checkpointer = Checkpointer(ckpt_dir, cfg.checkpoint.keep, env.rank, env.world_size,
                                         signature=model_signature(model_cfg, self.spec),
                                         read_order=read_order(cfg, manifest))
        self.checkpointer.clear_unfinished()  # this run holds the folder's lock
        if resume_from is not None:
            self._resume(resume_from)
        elif cfg.train.init_from:  # warm start: another run's model, tables grown to this data set
            warm_start(cfg, self.spec, manifest, self.checkpointer.signature, self._states(), self.backend, env.is_main)
        if env.is_main:  # after the resume: a refused one leaves the run's plan.txt as it was
            (self.run_dir / "plan.txt").write_text(self.placed.plan + "\n")
            print(f"wdl: sharding plan in {self.run_dir / 'plan.txt'}", flush=True)

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
        if cfg.eval_before_training and self.step == 0:  # progressive validation: the incoming model on these rows
            self.metrics.log({"kind": "eval", "step": 0, "epoch": 0, "eval_split": self.cfg.data.train_split,
                              "before_training": True, **self.evaluate(self.train_loader, cfg.eval_max_rows)})
        while self.epoch < cfg.epochs and not self._out_of_steps() and not self._stop_early():
            stats = self.train_epoch()
            complete = self.batches_done >= self.train_loader.steps_per_epoch
            if complete:
                self.epoch, self.batches_done = self.epoch + 1, 0
            self.end_epoch(stats, complete)
        test = self.score_final()
        return self.metrics.write_summary({"steps": self.step, "world_size": self.env.world_size,
                                           "device": str(self.device), "peak_rss_mb": _peak_rss_mb(),
                                           "unknown_ids": self.unknown},
                                          selection=self.selection if self.selecting else None, test=test,
                                          test_split=self.cfg.data.eval_split)

    def end_epoch(self, stats: dict[str, Any], complete: bool) -> None:
        """The epoch's record, after what is due at its last step (a step record, an evaluation).
        With evaluations at epoch ends (train.eval_every_steps=0) the record holds its evaluation.
        A run stopped mid-epoch is scored where it stands unless it just was: an `interim`
        evaluation, never selected and dropped on resume (an uncut run has none there)."""
        epoch = self.epoch if complete else self.epoch + 1
        if complete and self.cfg.train.log_every_steps and self.step % self.cfg.train.log_every_steps:
            self._log_steps(None)  # the epoch's last, shorter log interval: every step is in a record
        self.divergence.check_loss(stats["train_loss"], f"epoch {epoch} (steps {self.step - stats['steps'] + 1}-{self.step})")
        at_epochs = self.cfg.train.eval_every_steps == 0
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, **stats, "eval_split": self.eval_name}
        if complete:
            self._on_cadence(None, epoch_scores=record if at_epochs else None)
        elif self.evaluated_at != self.step:
            scores = self._evaluate(interim=True)
            if at_epochs:
                record |= scores
            else:
                self.metrics.log({"kind": "eval", "step": self.step, "epoch": epoch, "eval_split": self.eval_name,
                                  **scores, "interim": True})
        rss = all_gather_cat(torch.tensor([_peak_rss_mb()], dtype=torch.float64)).tolist()
        self.metrics.log(record | {"peak_rss_mb": max(rss), "peak_rss_mb_per_rank": rss})
        if self.cfg.checkpoint.at_epoch_end and self.saved_at != self.step:
            self.save_checkpoint()

    def _on_cadence(self, bar: Any, epoch_scores: dict[str, Any] | None = None) -> None:
        """What is due after this step, in this order: a step record, an evaluation (also at the
        last epoch's end; at every epoch end into `epoch_scores` with eval_every_steps=0), a checkpoint
        (an epoch's last step is saved by end_epoch when checkpoint.at_epoch_end)."""
        t, ck = self.cfg.train, self.cfg.checkpoint
        at_end = self.batches_done == 0  # called by end_epoch, the epoch rolled over
        if t.log_every_steps and self.step % t.log_every_steps == 0:
            self._log_steps(bar)
        if epoch_scores is not None:
            epoch_scores |= self._evaluate()
        elif t.eval_every_steps and (self.step % t.eval_every_steps == 0 or (at_end and self.epoch >= t.epochs)):
            self.metrics.log({"kind": "eval", "step": self.step, "epoch": self._epoch_of_step(),
                              "eval_split": self.eval_name, **self._evaluate()})
        if ck.every_steps and self.step % ck.every_steps == 0 and not (at_end and ck.at_epoch_end) \
                and self.saved_at != self.step:
            self.save_checkpoint()

    def score_final(self) -> dict[str, Any] | None:
        """The test split's one score: the selected model's, with a validation split; else none."""
        return self.score_selected() if self.selecting else None

    def score_selected(self) -> dict[str, Any] | None:
        """Score the test split once, with the model of the best validation evaluation."""
        best, sel = self.checkpointer.folder / "best", self.selection
        if sel.best_step is None:
            return None
        saved = json.loads((best / "meta.json").read_text()) if (best / "meta.json").exists() else {}
        if saved.get("step") != sel.best_step or sel.best_step > self.step:
            # e.g. this run continued from a checkpoint older than the best one, and nothing later beat it
            if self.env.is_main:
                where = f"epoch {sel.best_epoch}" if sel.best_at_epoch_end else f"step {sel.best_step}"
                print(f"wdl: warning: {best} does not hold the model of {where} (this run continued from an "
                      f"earlier checkpoint); the {self.cfg.data.eval_split} split is not scored", file=sys.stderr, flush=True)
            return None
        weights = {"model": self.placed.state_module.state_dict()}
        self.checkpointer.load_weights(best, weights)
        self.placed.state_module.load_state_dict(weights["model"])
        return {"epoch": sel.best_epoch, "step": sel.best_step, **self.evaluate(self.test_loader)}

    def close(self) -> None:
        """Give up the run folder (the lock also goes when the process dies)."""
        if self.folder is not None:
            self.folder.release()

    def train_epoch(self) -> dict[str, Any]:
        """Train to the epoch's end, or to a stop (train.max_steps, early stopping); what is due
        at each step but the epoch's last runs here (that one: end_epoch)."""
        self.model.train()
        # The trainer counts the batches it trained (the loader may be read one batch ahead).
        self.train_loader.load_state_dict({"epoch": self.epoch, "batches_done": self.batches_done})
        resumed_at = self.batches_done  # > 0 when resuming mid-epoch
        if resumed_at == 0:
            self.sums.reset("epoch")
            self.sums.epoch_lr_scale = self.schedule.scale(self.step)
        rows, steps, last = 0, 0, self.train_loader.steps_per_epoch
        self.optimizer.scale_lr(self.schedule.scale(self.step))
        bar = self._progress(last - self.batches_done)
        start = time.perf_counter()
        batches = self.pipeline.batches(self.train_loader) if self.pipeline else to_device(self.train_loader, self.device)
        for batch in batches:
            if self.schedule.warming_up(self.step):
                self.optimizer.scale_lr(self.schedule.scale(self.step))
            self.sums.add(self.train_step(batch), len(batch))  # summed on the device: no host sync per step
            self.threads.tick()  # fewer intra-op threads while other processes load our cores
            rows, steps = rows + len(batch), steps + 1
            self.step, self.batches_done = self.step + 1, self.batches_done + 1
            if bar is not None:
                bar.update(1)
            _maybe_kill(self.kill_at, self.step, self.env)
            if self.batches_done < last:
                self._on_cadence(bar)
            if self._out_of_steps() or (self.selecting and self.selection.should_stop()):
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
        (loss, epoch_rows), = self.sums.totals("epoch")
        rows_now = int(all_reduce_sum(torch.tensor([float(rows)], dtype=torch.float64))[0])
        return {
            "train_loss": loss,  # the whole epoch, across a resume
            "train_seconds": seconds,
            "samples_per_second": rows_now / seconds if seconds > 0 else None,
            "train_rows": epoch_rows,
            "steps": steps,
            "resumed_at_batch": resumed_at,
            "intra_op_threads": self.threads.now,  # at the epoch's end (they follow the host's load)
            "lr_scale": self.sums.epoch_lr_scale,  # the schedule's multiplier at the epoch's first step
            **(self.graphed.counters() if self.graphed is not None else {}),  # steps replayed, so far
        }

    def train_step(self, batch: Any) -> torch.Tensor:
        """One optimiser step on `batch`; its mean loss (detached, on the device)."""
        if self.pipeline is not None:
            return self.pipeline.step(batch)
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

    def _log_steps(self, bar: Any) -> None:
        """A step record: the train loss over the log interval, read from the device now."""
        (loss, rows), (_, seen) = self.sums.totals("log", "run")
        seconds = self.sums.seconds("log")
        n, into_epoch = self.cfg.train.log_every_steps, self.batches_done or self.train_loader.steps_per_epoch
        first = max((self.step - 1) // n * n, self.step - into_epoch) + 1  # intervals end at epoch ends too
        self.divergence.check_loss(loss, f"steps {first}-{self.step} (epoch {self._epoch_of_step()})")
        self.metrics.log({"kind": "step", "step": self.step, "epoch": self._epoch_of_step(), "rows_seen": seen,
                          "train_loss": loss, "lr_scale": self.schedule.scale(self.step - 1),
                          "samples_per_second": rows / seconds if seconds > 0 else None}, bar)
        self.sums.reset("log")

    def _evaluate(self, interim: bool = False) -> dict[str, Any]:
        """Score the eval split (train.eval_max_rows of it) with the train loss since the last
        evaluation; unless `interim`, select on it: `best`, the plateau schedule, early stopping."""
        scores = self.evaluate(self.eval_loader, self.cfg.train.eval_max_rows)
        self.evaluated_at = self.step
        if interim:
            return scores
        (loss, _), = self.sums.totals("eval")
        self.divergence.check_chance(scores.get("auc"), loss, self.sums.last_eval_loss, self.eval_name, self.step)
        self.sums.last_eval_loss = loss
        self.sums.reset("eval")
        if self.selecting:
            improved = self.selection.update(self.step, self._epoch_of_step(), scores.get(self.selection.cfg.metric),
                                             at_epoch_end=self.batches_done == 0)
            if improved:
                self.save_checkpoint(name="best")
            if self.schedule.evaluated(improved):
                self.optimizer.scale_lr(self.schedule.scale(self.step))
                if self.env.is_main:
                    print(f"wdl: no better {self.eval_name} {self.selection.cfg.metric} for "
                          f"{self.cfg.optim.schedule.plateau_patience} evaluation(s): learning rates "
                          f"x{self.schedule.decay:g} of the configured ones", flush=True)
        return {**scores, "train_loss_since_last_eval": loss}

    def evaluate(self, loader: Any, max_rows: int = 0) -> dict[str, Any]:
        """Global metrics of `loader`'s split; with `max_rows`, of about that many of its first
        rows (the same number of batches on every rank: sharded look-ups are collective)."""
        start = time.perf_counter()
        if self.pipeline is not None:  # the model's own forward, not the pipeline's
            self.pipeline.pause()
        loader.load_state_dict({"epoch": 0, "batches_done": 0})
        batches = loader if not max_rows else \
            itertools.islice(loader, max(1, math.ceil(max_rows / (loader.batch_size * self.env.world_size))))
        m = evaluate(self.model, batches, self.device, self.cfg.train.ranking_group, self.cfg.train.ranking_k)
        return {**m, "eval_seconds": time.perf_counter() - start}

    def evaluate_only(self) -> dict[str, Any]:
        result = {"epoch": self.epoch, "step": self.step, "world_size": self.env.world_size,
                  **self.evaluate(self.test_loader)}
        if self.env.is_main:
            (self.run_dir / "eval.json").write_text(finite_json(result, indent=2) + "\n")
            auc = f"{result['auc']:.6f}" if math.isfinite(result["auc"]) else "- (one class only)"
            print(f"{self.cfg.data.eval_split} AUC {auc} logloss {result['logloss']:.6f} "
                  f"({result['rows']} rows, model at epoch {self.epoch}, step {self.step})", flush=True)
        return result

    # --- checkpoints ------------------------------------------------------------------------

    def _states(self) -> dict[str, Any]:
        """Every stateful part by name, each with state_dict / load_state_dict: what a checkpoint
        holds beside the progress counters (epoch, step, the loader's position) and the RNGs."""
        return {"model": self.placed.state_module, "optim": self.optimizer, "selection": self.selection,
                "schedule": self.schedule, "train_sums": self.sums}

    def _progress_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "batches_done": self.batches_done}

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Save every state (after checking the epoch's loss so far: a diverged model is never saved)."""
        (loss, _), = self.sums.totals("epoch")
        self.divergence.check_loss(loss, f"epoch {self._epoch_of_step()} up to step {self.step}")
        self.saved_at = self.step if name is None else self.saved_at
        return self.checkpointer.save({k: s.state_dict() for k, s in self._states().items()},
                                      self._progress_state(), name=name)

    def _load(self, path: Path) -> dict[str, int]:
        # DCP fills these tensors in place (split ones as this world size splits them).
        states = self._states()
        app = {k: s.state_dict() for k, s in states.items()}
        progress = self.checkpointer.load(path, app, self._progress_state())
        for k, s in states.items():
            s.load_state_dict(app[k])
        return progress

    def _resume(self, path: Path) -> None:
        progress = self._load(path)
        self.epoch, self.step, self.batches_done = progress["epoch"], progress["step"], progress["batches_done"]
        if self.folder is not None and path.parent.resolve() == self.checkpointer.folder.resolve():  # this run, continued
            moved = self.checkpointer.set_aside_after(self.step)
            if moved and self.env.is_main:
                print(f"wdl: continuing from step {self.step}, before this run's {', '.join(moved)}: those are moved "
                      f"to {self.checkpointer.folder / f'abandoned-after-step-{self.step:08d}'}", flush=True)
        self.metrics.load_existing(step=self.step, epochs=self.epoch)
        if self.env.is_main:
            print(f"wdl: resumed from {path} (epoch {self.epoch + 1}, step {self.step}, "
                  f"{progress['batches_done']} batches into the epoch)", flush=True)

    # ------------------------------------------------------------------------------------------

    def _epoch_of_step(self) -> int:
        """The epoch (1-based) the latest step belongs to (at an epoch end the counter has moved on)."""
        return self.epoch if self.batches_done == 0 else self.epoch + 1

    def _out_of_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.step

    def _stop_early(self) -> bool:
        if not self.selecting or not self.selection.should_stop():
            return False
        if self.env.is_main:
            print(f"wdl: early stop at step {self.step} (epoch {self.selection.last_epoch}): no better {self.eval_name} "
                  f"{self.selection.cfg.metric} for {self.selection.cfg.patience} evaluations", flush=True)
        return True

    def _progress(self, total: int):
        if not (self.env.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        # disable=None: a bar only on a terminal, never a log file full of redrawn bars (as wdl data does)
        return tqdm(total=total, desc=f"epoch {self.epoch + 1}", unit="step", leave=False, dynamic_ncols=True,
                    disable=None)


def _maybe_kill(kill_at: int, step: int, env: DistEnv) -> None:
    """Fault injection for tests (WDL_TEST_KILL_AT_STEP=N in the environment): the last rank
    SIGKILLs itself after step N, once (not again in a torchrun restart)."""
    import signal

    if kill_at and step == kill_at and env.rank == env.world_size - 1 \
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


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
