"""TorchRec's TrainPipelineSparseDist driving the training steps (train.pipeline).

With TorchRec's sharded tables a step starts with the input distribution: the ids of each
table go, all-to-all, to the ranks that hold its rows. TorchRec's pipeline starts that for batch
i+1 (and copies batch i+2 to the device) while batch i runs forward and backward, on CUDA
streams of their own, as TorchRec's examples train. It finds a sharded table's input by tracing
the model with torch.fx, so the model cuts it from the batch by attribute and item only
(`batch.kjts[keys]`, see wdl.model.embeddings).

The step is the same step: its `progress()` calls the optimiser's zero_grad first (TorchRec's
fused optimiser hands FBGEMM its learning rate there), then forward, backward and step, so the
trainer's per-step learning-rate scaling, loss sums, cadences and checkpoints are untouched. The
pipeline reads up to two batches ahead; the trainer counts the batches it trained, never those
read, so checkpoints and resumes keep their exact data position. An evaluation runs the model
itself: `pause()` gives the sharded tables their own forwards back, and the next step puts the
pipeline's back (TorchRec's detach / attach; the batches read ahead are kept).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from wdl.config import ModelConfig, TrainConfig
from wdl.data.batch import Batch
from wdl.data.tables import model_reads
from wdl.errors import ConfigError, TrainingError


def wants_pipeline(cfg: TrainConfig, model: ModelConfig, backend: str, device: torch.device, world_size: int) -> bool:
    """Whether the steps go through TorchRec's pipeline. `auto`: with TorchRec tables on CUDA and
    several processes only: one process has no input distribution to hide, and on CPU nothing
    overlaps (no streams), so there it would only add the read-ahead and the tracing. An
    explicit `sparse_dist` the run cannot honour is refused."""
    if cfg.pipeline == "none":
        return False
    has_tables = bool(model_reads(model).deep_embeddings)
    possible = backend == "torchrec" and has_tables and cfg.compile == "none"
    if cfg.pipeline == "auto":
        return possible and device.type == "cuda" and world_size > 1
    if not possible:
        why = (f"model.embedding_backend={backend}" if backend != "torchrec" else
               "no TorchRec tables (model.deep.embeddings is empty or model.kind=wide)" if not has_tables else
               f"train.compile={cfg.compile} (a compiled head is not traced)")
        raise ConfigError(f"train.pipeline=sparse_dist feeds TorchRec's sharded tables: it needs "
                          f"model.embedding_backend=torchrec with deep embeddings and train.compile=none; this run has {why}")
    return True


class SparseDistSteps:
    """The steps of an epoch through TrainPipelineSparseDist(model, optimizer, device).

    for batch in steps.batches(loader): loss = steps.step(batch)
    `batches` yields the batch the next `step` trains (already on the device); `step` trains it
    and returns its mean loss (a detached 0-d tensor on the device).
    """

    def __init__(self, model: nn.Module, optimizer: Any, device: torch.device) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
        from torchrec.streamable import Pipelineable

        Pipelineable.register(Batch)  # it has to() and record_stream(); TorchRec checks the type
        self.device = device
        self.pipe = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
        self._source: Iterator[Batch] | None = None
        self._paused = False
        self._checked = False

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        # Nothing read ahead survives an earlier epoch that stopped early (max_steps, early stop).
        self.pipe.reset()
        if self._paused:  # with no batch in flight, attach() lets the next fill trace the model again
            self.pipe.attach()
            self._paused = False
        self._source = self._host(loader)
        self.pipe.fill_pipeline(self._source)
        self._check_pipelined()
        while self.pipe.batches:
            yield self.pipe.batches[0]

    def step(self, batch: Batch) -> torch.Tensor:
        assert self.pipe.batches and self.pipe.batches[0] is batch, "step() trains the batch batches() yielded last"
        self._paused = False  # progress() attaches the model again after a pause
        loss, _, _ = self.pipe.progress(self._source)
        return loss

    def pause(self) -> None:
        """The model's own forwards back (an evaluation runs it directly); the next step resumes."""
        if not self._paused:
            self.pipe.detach()
            self._paused = True

    def _host(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """The loader's batches, pinned when they go to a GPU: the pipeline copies them without
        blocking on its own stream, which only overlaps from page-locked memory."""
        pin = self.device.type == "cuda"
        for batch in loader:
            yield batch.pin_memory() if pin and batch.labels.device.type == "cpu" else batch

    def _check_pipelined(self) -> None:
        """TorchRec leaves a table whose input it cannot trace to the batch unpipelined, with a
        log line only: a run asked to pipeline stops instead."""
        if self._checked or not self.pipe.batches:
            return
        self._checked = True
        if not self.pipe._pipelined_modules:  # noqa: SLF001 (TorchRec exposes no accessor)
            raise TrainingError("train.pipeline=sparse_dist: TorchRec's pipeline found no sharded table whose input "
                                "its tracer could follow from the batch; set train.pipeline=none")
