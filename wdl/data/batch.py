"""The Batch: the contract between data and model.

A Batch holds whole-batch tensors only (no per-row Python objects) so moving it to a device
is a handful of copies. Sparse features are jagged: per key, a flat `values` tensor and a
per-row `lengths` tensor, exactly TorchRec's KeyedJaggedTensor layout split by key. Keeping
them split by key lets the pure-PyTorch embedding backend look up each table without a
host sync; the TorchRec backend joins them into a KeyedJaggedTensor with one `cat`.

A FeatureTable is N rows in the same columnar form (what FeatureSpec.encode makes of a row
group, or a whole split held in memory); loaders cut Batches from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Jagged:
    """One sparse feature for B rows: ids `values` [sum(lengths)] int64, `lengths` [B] int32.

    single: every row holds exactly one id (lengths are all 1), which look-ups can use to skip
    the offsets; set by the data's FeatureSpec, which knows it without reading the lengths.
    padded: `lengths` has B + 1 entries and `values` a fixed size (the loader's capacity): the
    extra last "row" holds the padding, ids that repeat an id of the batch's rows, and belongs
    to no row of the batch. Every batch then has the same shapes, whatever its number of ids,
    which a step replayed as a CUDA graph needs (wdl.train.graphed_step).
    """

    values: Tensor
    lengths: Tensor
    single: bool = False
    padded: bool = False

    def offsets(self) -> Tensor:
        """[B] int64 start of each row's ids, as nn.EmbeddingBag wants them."""
        csum = torch.cumsum(self.lengths, 0, dtype=torch.int64)
        return csum - self.lengths.to(torch.int64)


@dataclass
class Batch:
    """B rows of training data.

    dense:  [B, D] float32, already normalised (D may be 0)
    sparse: feature name -> Jagged ids (every key the model reads, crosses included)
    labels: [B] float32 in {0, 1}
    ids:    optional [B, S] int64, the ids of the keys `id_keys` with one id per row: column j
            is `sparse[id_keys[j]].values` (a view), so the batch moves as one matrix, not S columns
    """

    dense: Tensor
    sparse: dict[str, Jagged]
    labels: Tensor
    ids: Tensor | None = None
    id_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def map(self, fn) -> "Batch":
        """The batch with `fn` applied to each of its tensors once: what several keys share (a
        lengths tensor, the columns of `ids`) is shared in the result too, so moving a batch
        with S single-id keys to a device is a few copies, not 2S."""
        done: dict[int, Tensor] = {}

        def once(t: Tensor) -> Tensor:
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        ids = None if self.ids is None else once(self.ids)
        cols = {} if ids is None else dict(zip(self.id_keys, ids.unbind(1)))
        sparse = {k: Jagged(cols[k] if k in cols else once(v.values), once(v.lengths), v.single, v.padded)
                  for k, v in self.sparse.items()}
        return Batch(once(self.dense), sparse, once(self.labels), ids, self.id_keys)

    def tensors(self) -> list[Tensor]:
        """Every tensor of the batch once, in a fixed order: dense, labels, ids, then by key its
        values (unless a column of ids) and lengths (unless listed already)."""
        out = [self.dense, self.labels] + ([] if self.ids is None else [self.ids])
        seen = {id(t) for t in out}
        in_ids = set(self.id_keys)
        for k, v in self.sparse.items():
            for t in (v.lengths,) if k in in_ids else (v.values, v.lengths):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def pack(self) -> "PackedBatch":
        """The batch copied into one byte buffer in shared memory, for a loader worker to hand
        to the training process: one shared-memory segment and one file descriptor to send
        instead of one per tensor (about a millisecond each, which at batch 4096 cost more than
        reading the rows). Allocated as torch's default_collate does in a worker (`_new_shared`):
        written once, not copied again when sent."""
        tensors = self.tensors()
        index = {id(t): i for i, t in enumerate(tensors)}
        layout, total = [], 0
        for t in tensors:
            total = -(-total // 64) * 64  # aligned, so each view can take its dtype
            layout.append((total, t.dtype, tuple(t.shape)))
            total += t.numel() * t.element_size()
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
        packed = PackedBatch(buffer, layout, [(k, index.get(id(v.values)), index[id(v.lengths)], v.single, v.padded)
                                              for k, v in self.sparse.items()], self.id_keys, self.ids is not None)
        for t, view in zip(tensors, packed.views()):
            view.copy_(t)
        return packed

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self.map(Tensor.pin_memory)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for t in self.tensors():
            t.record_stream(stream)

    @property
    def kjts(self) -> "KJTs":
        """`batch.kjts[keys]` is `batch.kjt(list(keys))` for a tuple of keys: reached by attribute and
        item, which TorchRec's train pipeline can follow when it traces a model to find how a sharded
        table's input comes from the batch."""
        return KJTs(self)

    def kjt(self, keys: list[str]):
        """The features `keys` as a TorchRec KeyedJaggedTensor (imports torchrec lazily)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        cols = [self.sparse[k] for k in keys]
        if any(c.padded for c in cols):
            raise ValueError("padded batches (for CUDA-graph steps) are for wdl's own embedding tables, not TorchRec's")
        return KeyedJaggedTensor(
            keys=list(keys),
            values=torch.cat([c.values for c in cols]),
            lengths=torch.cat([c.lengths for c in cols]),
            stride=len(self),
            length_per_key=[c.values.numel() for c in cols],  # known here: no device sync to count ids
        )


class KJTs:
    """Batch.kjts: a batch's features as KeyedJaggedTensors, by tuple of keys."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __getitem__(self, keys: tuple[str, ...]):
        return self.batch.kjt(list(keys))


@dataclass
class PackedBatch:
    """A Batch in one byte buffer (Batch.pack): `layout` holds each tensor of Batch.tensors() as
    (byte offset, dtype, shape); `keys` each key's (name, index of its values, None for a column
    of the ids matrix; index of its lengths; single; padded)."""

    buffer: Tensor
    layout: list[tuple[int, torch.dtype, tuple[int, ...]]]
    keys: list[tuple[str, int | None, int, bool, bool]]
    id_keys: tuple[str, ...]
    has_ids: bool

    def views(self) -> list[Tensor]:
        out = []
        for offset, dtype, shape in self.layout:
            n = math.prod(shape) * dtype.itemsize
            out.append(self.buffer[offset:offset + n].view(dtype).view(shape))
        return out

    def pin_memory(self) -> "PackedBatch":
        """Pinned in one copy (the DataLoader's pinning thread calls this)."""
        return dataclasses.replace(self, buffer=self.buffer.pin_memory())

    def unpack(self) -> Batch:
        """The batch, its tensors views of the buffer (no copy)."""
        ts = self.views()
        ids = ts[2] if self.has_ids else None
        cols = {} if ids is None else dict(zip(self.id_keys, ids.unbind(1)))
        sparse = {k: Jagged(cols[k] if v is None else ts[v], ts[n], single, padded)
                  for k, v, n, single, padded in self.keys}
        return Batch(ts[0], sparse, ts[1], ids, self.id_keys)


def take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """`t.index_select(0, idx)`. On the CPU through numpy's take, which cuts the row gathers
    of batch-making 1.3-3.7x faster than index_select with one thread (a loader worker's)."""
    if t.device.type != "cpu":
        return t.index_select(0, idx)
    return torch.from_numpy(np.take(t.numpy(), idx.numpy(), axis=0))


def jagged_positions(lengths: Tensor, offsets: Tensor, idx: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """Where rows `idx` of a jagged column keep their ids, vectorised (no per-row Python).

    lengths [N] int32 and offsets [N] int64 (start of each row's ids, precomputed once per
    table): returns (positions into the column's values, the selected rows' lengths). Columns
    sharing their lengths (a multi-hot column and its crosses) share the positions too.
    total: the number of ids in those rows, when known on the host (on CUDA, finding it
    otherwise stalls the host until the device catches up).
    """
    out_lengths = take_rows(lengths, idx)
    starts = take_rows(offsets, idx)
    lens64 = out_lengths.to(torch.int64)
    out_starts = torch.cumsum(lens64, 0) - lens64
    # position j of output row r reads values[starts[r] + j]
    shift = torch.repeat_interleave(starts - out_starts, lens64, output_size=total)
    return torch.arange(shift.numel(), device=shift.device) + shift, out_lengths


class FeatureTable:
    """N rows as columnar tensors; a Batch is cut from it by `take`/`slice`.

    dense [N, D] float32 and labels [N] float32. The ids of every key with exactly one id per
    row sit in one matrix `ids` [N, S] (column j holds single_keys[j]), so cutting a batch of
    rows is one gather of adjacent ids, not one per key. Keys with several ids per row are
    Jagged columns (`multi`); keys that share their lengths (a multi-hot column and its
    crosses) share one lengths tensor, so their row positions are computed once per batch.
    `sparse` shows every key as a Jagged column (single keys as column views of `ids`).
    """

    def __init__(self, dense: Tensor, labels: Tensor, ids: Tensor, single_keys: tuple[str, ...],
                 multi: dict[str, Jagged], order: tuple[str, ...], host_lengths: list[Tensor] | None = None) -> None:
        self.dense, self.labels, self.ids, self.multi = dense, labels, ids, multi
        self.single_keys, self.order = single_keys, order
        self._host_lengths = host_lengths  # per group, on CPU, for a table held on a GPU
        self._capacity: list[int] | None = None  # per group: ids a cut batch is padded to (pad_batches)
        self._pad_rows = 0  # ... when it has this many rows
        self._col = {k: j for j, k in enumerate(single_keys)}
        # Multi-valued keys grouped by their (shared) lengths tensor, with its row offsets.
        self._groups: list[tuple[Tensor, Tensor, list[str]]] = []
        for k, jag in multi.items():
            for lengths, _, keys in self._groups:
                if lengths is jag.lengths:
                    keys.append(k)
                    break
            else:
                self._groups.append((jag.lengths, jag.offsets(), [k]))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sparse(self) -> dict[str, Jagged]:
        ones = torch.ones(len(self), dtype=torch.int32, device=self.ids.device)  # shared by every single key
        cols = self.ids.unbind(1)  # every column's view in one call: a third of the time of indexing each
        return {k: self.multi[k] if k in self.multi else Jagged(cols[self._col[k]], ones, single=True)
                for k in self.order}

    def _with(self, dense: Tensor, labels: Tensor, ids: Tensor, multi: dict[str, Jagged],
              host_lengths: list[Tensor] | None = None) -> "FeatureTable":
        return FeatureTable(dense, labels, ids, self.single_keys, multi, self.order, host_lengths)

    def pad_batches(self, batch_size: int, capacity: list[int] | None = None) -> None:
        """From now on, pad the jagged columns of every batch of `batch_size` rows that `take`
        cuts to a fixed number of ids per column group (see Jagged.padded), so such batches all
        have the same shapes. capacity: the ids per column group (default: this table's
        `pad_capacity`); a rarer, fuller batch is cut unpadded, as is a batch of another size and
        one with no ids at all in a group (the padding repeats an id the batch touches: any other
        would make lazy Adam and weight decay update a row no row of the batch holds)."""
        self._capacity = list(capacity) if capacity is not None else self.pad_capacity(batch_size)
        self._pad_rows = batch_size

    def pad_capacity(self, batch_size: int, sigmas: float = 6.0) -> list[int]:
        """Per column group, the ids `batch_size` of these rows can hold, capped at their mean
        plus `sigmas` standard deviations (a sum of `batch_size` row lengths), a multiple of 8."""
        out = []
        for g, (lengths, _, _) in enumerate(self._groups):
            host = (self._host_lengths[g] if self._host_lengths is not None else lengths.cpu()).to(torch.float64)
            bound = batch_size * float(host.mean()) + sigmas * batch_size ** 0.5 * float(host.std(correction=0))
            cap = min(batch_size * int(host.max()), int(bound) + 1)
            out.append(max(-(-cap // 8) * 8, 8))  # a multiple of 8, for aligned gathers
        return out

    def take_table(self, idx: Tensor, host_idx: Tensor | None = None) -> "FeatureTable":
        """Rows `idx` (a 1-d int64 tensor on the table's device): one gather per tensor.
        host_idx: the same rows on the CPU, so a table on a GPU needs no host sync."""
        multi = {}
        for g, (lengths, offsets, keys) in enumerate(self._groups):
            total = None
            if self._host_lengths is not None and host_idx is not None:
                total = int(self._host_lengths[g].index_select(0, host_idx).sum())
            pos, out_lengths = jagged_positions(lengths, offsets, idx, total)
            padded = False
            if self._capacity is not None and idx.numel() == self._pad_rows and 0 < pos.numel() <= self._capacity[g]:
                # The padding repeats the batch's first id (a row the batch touches anyway) in an
                # extra last "row": sizes fixed, the same rows touched, nothing pooled into a row.
                pad = self._capacity[g] - pos.numel()
                pos = torch.cat([pos, pos[:1].expand(pad)])
                out_lengths = torch.cat([out_lengths, out_lengths.new_full((1,), pad)])  # no host->device copy
                padded = True
            multi.update({k: Jagged(take_rows(self.multi[k].values, pos), out_lengths, padded=padded)
                          for k in keys})
        return self._with(take_rows(self.dense, idx), take_rows(self.labels, idx), take_rows(self.ids, idx), multi)

    def slice_table(self, start: int, stop: int) -> "FeatureTable":
        """Rows [start, stop) as views: no gather (an unshuffled stream)."""
        multi = {}
        for lengths, offsets, keys in self._groups:
            total = self.multi[keys[0]].values.numel()
            lo = int(offsets[start]) if start < len(offsets) else total
            hi = int(offsets[stop]) if stop < len(offsets) else total
            sub = lengths[start:stop]  # one view for the group, so that its keys still share it
            multi.update({k: Jagged(self.multi[k].values[lo:hi], sub) for k in keys})
        return self._with(self.dense[start:stop], self.labels[start:stop], self.ids[start:stop], multi)

    def take(self, idx: Tensor, host_idx: Tensor | None = None) -> Batch:
        return self.take_table(idx, host_idx).as_batch()

    def slice(self, start: int, stop: int) -> Batch:
        return self.slice_table(start, stop).as_batch()

    def as_batch(self) -> Batch:
        ids = self.ids if self.single_keys else None
        return Batch(self.dense, self.sparse, self.labels, ids, self.single_keys)

    def to(self, device: torch.device) -> "FeatureTable":
        moved: dict[int, Tensor] = {}  # shared lengths stay shared

        def mv(t: Tensor) -> Tensor:
            if id(t) not in moved:  # (setdefault would copy a shared tensor again, then drop the copy)
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        multi = {k: Jagged(mv(j.values), mv(j.lengths)) for k, j in self.multi.items()}
        host_lengths = [lengths.cpu() for lengths, _, _ in self._groups] if device.type == "cuda" else None
        return self._with(self.dense.to(device), self.labels.to(device), self.ids.to(device), multi, host_lengths)

    @staticmethod
    def concat(tables: list["FeatureTable"]) -> "FeatureTable":
        first = tables[0]
        multi = {}
        for _, _, keys in first._groups:
            lengths = torch.cat([t.multi[keys[0]].lengths for t in tables])
            multi.update({k: Jagged(torch.cat([t.multi[k].values for t in tables]), lengths) for k in keys})
        return first._with(torch.cat([t.dense for t in tables]), torch.cat([t.labels for t in tables]),
                           torch.cat([t.ids for t in tables]), multi)
