"""The Batch: the contract between data and model.

A Batch holds whole-batch tensors only (no per-row Python objects) so moving it to a device
is a handful of copies. Sparse features are jagged: per key, a flat `values` tensor and a
per-row `lengths` tensor, exactly TorchRec's KeyedJaggedTensor layout split by key. Keeping
them split by key lets the pure-PyTorch embedding backend look up each table without a
host sync; the TorchRec backend joins them into a KeyedJaggedTensor with one `cat`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Jagged:
    """One sparse feature for B rows: ids `values` [sum(lengths)] int64, `lengths` [B] int32.

    single: every row holds exactly one id (lengths are all 1), which look-ups can use to skip
    the offsets; set by the data's FeatureSpec, which knows it without reading the lengths.
    """

    values: Tensor
    lengths: Tensor
    single: bool = False

    def offsets(self) -> Tensor:
        """[B] int64 start of each row's ids, as nn.EmbeddingBag wants them."""
        csum = torch.cumsum(self.lengths, 0, dtype=torch.int64)
        return csum - self.lengths.to(torch.int64)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Jagged":
        return Jagged(self.values.to(device, non_blocking=non_blocking),
                      self.lengths.to(device, non_blocking=non_blocking), self.single)

    def pin_memory(self) -> "Jagged":
        return Jagged(self.values.pin_memory(), self.lengths.pin_memory(), self.single)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.values.record_stream(stream)
        self.lengths.record_stream(stream)


@dataclass
class Batch:
    """B rows of training data.

    dense:  [B, D] float32, already normalised (D may be 0)
    sparse: feature name -> Jagged ids (every key the model reads, crosses included)
    labels: [B] float32 in {0, 1}
    """

    dense: Tensor
    sparse: dict[str, Jagged]
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse={k: v.to(device, non_blocking) for k, v in self.sparse.items()},
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), {k: v.pin_memory() for k, v in self.sparse.items()}, self.labels.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.dense.record_stream(stream)
        self.labels.record_stream(stream)
        for v in self.sparse.values():
            v.record_stream(stream)

    def kjt(self, keys: list[str]):
        """The features `keys` as a TorchRec KeyedJaggedTensor (imports torchrec lazily)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        cols = [self.sparse[k] for k in keys]
        return KeyedJaggedTensor(
            keys=list(keys),
            values=torch.cat([c.values for c in cols]),
            lengths=torch.cat([c.lengths for c in cols]),
            stride=len(self),
            length_per_key=[c.values.numel() for c in cols],  # known here: no device sync to count ids
        )


def jagged_positions(lengths: Tensor, offsets: Tensor, idx: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Where rows `idx` of a jagged column keep their ids, vectorised (no per-row Python).

    lengths [N] int32 and offsets [N] int64 (start of each row's ids, precomputed once per
    table): returns (positions into the column's values, the selected rows' lengths). Columns
    sharing their lengths (a multi-hot column and its crosses) share the positions too.
    total: the number of ids in those rows, when known on the host (on CUDA, finding it
    otherwise stalls the host until the device catches up).
    """
    out_lengths = lengths.index_select(0, idx)
    starts = offsets.index_select(0, idx)
    lens64 = out_lengths.to(torch.int64)
    out_starts = torch.cumsum(lens64, 0) - lens64
    # position j of output row r reads values[starts[r] + j]
    shift = torch.repeat_interleave(starts - out_starts, lens64, output_size=total)
    return torch.arange(shift.numel(), device=shift.device) + shift, out_lengths
