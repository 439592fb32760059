"""A whole training step (forward, backward, every optimiser update) replayed as one CUDA graph.

At small batches a GPU step is bound by the host: a few hundred small kernels, each launched
from Python, take longer to launch than to run. Captured once and replayed, the same kernels
cost one launch. What capture needs, and where wdl provides it:

- the same shapes every step: the row optimisers' static-shape path (wdl.model.embeddings.dedupe
  on CUDA) and batches padded to a fixed number of ids (FeatureTable.pad_batches; the loaders'
  fix_shapes);
- no host syncs in the step (none in wdl's step on CUDA; the loss stays on the device);
- fixed input addresses: each batch is copied into the captured batch's tensors;
- fixed learning rates: they are constants in the graph, so a step at other rates (a warm-up, a
  plateau decay) runs eagerly until `warmup` steps in a row agree on them, then is captured again.

A batch whose shapes differ from the captured one (an epoch's last, smaller batch; a batch with
more ids than the padding holds) is stepped eagerly; the graph is kept. Counters say how many
steps were replayed and how many ran eagerly. A step that cannot be captured (an operation
capture forbids) is said once on stderr with CUDA's reason, recorded in the counters, and the
run goes on eagerly: nothing runs during a capture, so no update is lost or done twice.

The step must be a function of the batch and of tensors that keep their storage (parameters,
optimiser state, scratch buffers): PyTorch's whole-network capture
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture), with wdl's sparse
row optimisers inside the graph.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor

from wdl.data.batch import Batch
from wdl.errors import first_line

Capture = Callable[[Callable[[], None]], Callable[[], None]]


def cuda_capture(fn: Callable[[], None]) -> Callable[[], None]:
    """Record `fn`'s kernels as a CUDA graph (without running them); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # as PyTorch's whole-network example does (backward and optimiser inside)
        fn()
    return graph.replay


def _signature(batch: Batch) -> tuple:
    return (tuple((tuple(t.shape), t.dtype) for t in batch.tensors()),
            tuple((k, j.single, j.padded) for k, j in batch.sparse.items()))


class GraphedStep:
    """`step(batch) -> loss` (a 0-d tensor on the device), replayed as a CUDA graph where it can be.

    rates: the learning rates now in force (captured as constants). capture: how a step is
    recorded (cuda_capture; tests pass their own). warmup: eager steps with one signature and
    one set of rates before they are captured (lazy state, such as optimiser moments, is made
    in these, outside the graph).
    """

    def __init__(self, step: Callable[[Batch], Tensor], rates: Callable[[], tuple], *, warmup: int = 3,
                 capture: Capture = cuda_capture) -> None:
        self.step, self.rates, self.warmup, self.capture = step, rates, max(warmup, 1), capture
        self.replays = self.eager_steps = self.captures = 0
        self._key: Any = None  # what the graph was captured for: (batch signature, rates)
        self._replay: Callable[[], None] | None = None
        self._static: list[Tensor] = []
        self._loss: Tensor | None = None
        self._candidate: Any = None  # a signature seen in the last eager steps, and how often in a row
        self._seen = 0
        self._side: Any = None  # the side stream of eager steps on CUDA
        self.failure: str | None = None  # why capture failed (the run then stays eager)
        self._reported = (0, 0)  # (replays, eager steps) at the last shortfall()

    def __call__(self, batch: Batch) -> Tensor:
        key = (_signature(batch), self.rates())
        if key == self._key:
            torch._foreach_copy_(self._static, batch.tensors())
            self._replay()
            self.replays += 1
            return self._loss.clone()
        self._seen = self._seen + 1 if key == self._candidate else 1
        self._candidate = key
        if self._seen <= self.warmup or self.failure is not None:
            self.eager_steps += 1
            return self._eager(batch)
        return self._capture(batch, key)

    def _eager(self, batch: Batch) -> Tensor:
        if not batch.labels.is_cuda:
            return self.step(batch)
        # Steps before a capture run on a side stream, as whole-network capture asks.
        if self._side is None:
            self._side = torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            loss = self.step(batch)
        torch.cuda.current_stream().wait_stream(self._side)
        return loss

    def _capture(self, batch: Batch, key: Any) -> Tensor:
        self._replay, self._key = None, None  # drop the old graph (and its memory pool) first
        static = batch.map(Tensor.clone)
        self._static = static.tensors()
        self._loss = torch.zeros((), device=batch.labels.device)
        loss = self._loss

        def recorded() -> None:
            loss.copy_(self.step(static))

        try:
            self._replay = self.capture(recorded)
        except RuntimeError as e:  # nothing ran: step this batch eagerly, and every later one
            self.failure = first_line(e)
            self._static, self._loss = [], None
            print(f"wdl: warning: the training step could not be captured as a CUDA graph ({self.failure}); "
                  "training goes on without train.cuda_graph", file=sys.stderr, flush=True)
            self.eager_steps += 1
            return self._eager(batch)
        self._key, self._candidate, self._seen = key, None, 0
        self.captures += 1
        self._replay()  # capture records the step; replaying it trains on this batch
        self.replays += 1
        return loss.clone()

    def shortfall(self) -> str | None:
        """A line when most steps since the last call ran eagerly (batches of varying shapes, or
        rates changing every step), else None."""
        replays, eager = self.replays - self._reported[0], self.eager_steps - self._reported[1]
        self._reported = (self.replays, self.eager_steps)
        if self.failure is not None or eager <= replays:
            return None
        return (f"train.cuda_graph: {eager} of {eager + replays} steps ran without the graph (batches of varying "
                "shapes, e.g. multi-valued columns often fuller than their padding; or learning rates changing every step)")

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"graph_replays": self.replays, "eager_steps": self.eager_steps,
                               "graph_captures": self.captures}
        return out if self.failure is None else {**out, "graph_failure": self.failure}
