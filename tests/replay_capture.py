"""A CPU stand-in for CUDA graph capture with its semantics, for tests.

CUDA graph capture runs the Python of a step once and records its kernels; a replay runs those
kernels again on the same memory, with every argument the Python computed frozen, and nothing
of the capture itself is executed. `ReplayCapture` does the same with ATen ops: under a
TorchDispatchMode (below autograd, so backward ops are seen too) it records every op a step
dispatches with its tensor arguments and outputs, then undoes what the recording run wrote into
tensors that existed before it (and the CPU RNG state), so the capture leaves no trace. A replay
re-runs the recorded ops in order: in-place ops on the same tensors, out-of-place ops copied into
the tensors the capture returned (fixed addresses), view ops skipped (their outputs alias tensors
that replays update). A value read back to the host during capture is an error, as on CUDA.

What it checks that rerunning the Python would not: a step whose Python computes something per
step (a learning rate, a counter, a shape) that a kernel then takes as a constant trains wrongly
when replayed, here as on a GPU.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import wdl

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default}
_WDL = os.path.dirname(wdl.__file__) + os.sep
_OPTIM = os.path.dirname(torch.optim.__file__) + os.sep


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to the host (`.item()`, `int()`,
    `bool()` of a tensor, `nonzero`) whose nearest caller of interest is wdl code, as
    'file:line'. The nearest caller of interest is the innermost frame in wdl or in torch.optim:
    torch's fused CPU optimisers read their step count on the host (on CUDA it stays on the
    device), so a read made inside torch.optim is not wdl's."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            for frame in reversed(traceback.extract_stack()):
                if frame.filename.startswith(_OPTIM):
                    break
                if frame.filename.startswith(_WDL):
                    self.reads.append(f"{frame.filename}:{frame.lineno}")
                    break
        return func(*args, **(kwargs or {}))


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.created: set[int] = set()  # data_ptrs of storages allocated while recording
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise RuntimeError(f"{func} reads a value back to the host during capture")
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                val = args[i] if i < len(args) else kwargs.get(a.name)
                for t in _tensors(val):
                    st = t.untyped_storage()
                    if st.data_ptr() not in self.created and st.data_ptr() not in self.saved:
                        self.saved[st.data_ptr()] = (st, st.clone())
        out = func(*args, **kwargs)
        if not func.is_view:
            self.created.update(t.untyped_storage().data_ptr() for t in _tensors(out))
        self.ops.append((func, args, kwargs, out))
        return out

    def undo(self) -> None:
        for st, backup in self.saved.values():
            st.copy_(backup)

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                if func.is_view:
                    continue
                new = func(*args, **kwargs)
                for old, fresh in zip(_tensors(out), _tensors(new)):
                    if fresh is not old and fresh.data_ptr() != old.data_ptr():
                        old.copy_(fresh)


class ReplayCapture:
    """capture(fn) -> replay, as wdl.train.graphed_step.cuda_capture, on the CPU."""

    def __init__(self) -> None:
        self.recorded_ops = 0

    def __call__(self, fn: Callable[[], None]) -> Callable[[], None]:
        rng = torch.get_rng_state()
        rec = _Recorder()
        with rec:
            fn()
        rec.undo()
        torch.set_rng_state(rng)
        self.recorded_ops = len(rec.ops)
        return rec.replay
