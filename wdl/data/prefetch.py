"""Batches onto the training device one step ahead of the step that uses them.

On CUDA, the next batch is pinned and copied on a side stream while the current one trains,
so the copy overlaps compute and the step never waits on pageable host memory; the training
stream waits for the copy (an event, not a host sync) and `record_stream` keeps the caching
allocator from reusing the batch's memory while the step still reads it. Batches already on
the device (a split held in GPU memory) pass straight through. Elsewhere this is `.to(device)`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from wdl.data.batch import Batch


def to_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    stream = torch.cuda.Stream(device)
    it = iter(batches)

    def start_copy() -> Batch | None:
        batch = next(it, None)
        if batch is None or batch.labels.device == device:
            return batch
        with torch.cuda.stream(stream):
            return batch.pin_memory().to(device, non_blocking=True)

    ahead = start_copy()
    while ahead is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        batch = ahead
        batch.record_stream(current)
        ahead = start_copy()
        yield batch
