"""Loaders: Parquet shards -> Batches, streaming or held in memory.

How rows are divided, the same in both modes. The split's rows, in an order fixed by
(seed, epoch), are cut into P = world_size * num_workers contiguous parts whose sizes differ
by at most one row. Every part yields the same number of batches S = ceil(floor(N/P) / B):
S-1 batches of B rows, then one of the rest (1 to B+1 rows). So each row is read exactly
once per epoch, every rank runs the same number of steps (no collective can hang on uneven
shards), and no row is dropped.

Streaming reads whole row groups with pyarrow (only the needed columns), converts a block of
`shuffle_buffer` rows at a time to tensors, and shuffles within the block; the row groups'
order is shuffled per epoch. The read position is (epoch, batches already yielded): resuming
replays the deterministic stream and skips those batches, so nothing repeats or goes missing.
With loader workers, each batch reaches the training process as one shared-memory buffer
(Batch.pack), pinned in one copy when the device is a GPU.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from wdl.data.batch import Batch, FeatureTable, PackedBatch
from wdl.data.features import FeatureSpec
from wdl.errors import DataError, TrainingError, WdlError, first_line


@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int
    rows: int


def list_row_groups(files: list[Path], spec: FeatureSpec) -> list[RowGroup]:
    """Every row group of `files`, reading only Parquet footers; checks each file's schema."""
    units = []
    for path in files:
        pf = _open(path)
        spec.check_schema(pf.schema_arrow, str(path))
        units += [RowGroup(path, i, pf.metadata.row_group(i).num_rows) for i in range(pf.num_row_groups)]
    return units


def read_row_group(u: RowGroup, columns: list[str], open_files: dict[Path, pq.ParquetFile]) -> pa.Table:
    """One row group's `columns`; `open_files` caches the open files so each is opened once."""
    pf = open_files.get(u.path)
    if pf is None:
        pf = open_files[u.path] = _open(u.path)
    try:
        return pf.read_row_group(u.index, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{u.path}: cannot read row group {u.index} ({first_line(e)})") from None


def read_schema(path: Path) -> pa.Schema:
    """A Parquet file's Arrow schema (its footer only), or a DataError naming the file."""
    return _open(path).schema_arrow


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def sample_row_groups(units: list[RowGroup], k: int = 4) -> list[RowGroup]:
    """Up to `k` row groups spread evenly over `units` (first included): what statistics of a
    streamed split are read from."""
    return [units[i] for i in sorted({int(j * len(units) / k) for j in range(k)} & set(range(len(units))))]


def part_sizes(total: int, parts: int, batch_size: int) -> tuple[list[int], int]:
    """Rows per part and the common number of batches per part (see module docstring)."""
    sizes = [(p + 1) * total // parts - p * total // parts for p in range(parts)]
    steps = math.ceil(min(sizes) / batch_size)
    return sizes, steps


def batch_bounds(rows: int, steps: int, batch_size: int) -> list[int]:
    """Cumulative row bounds of a part's batches: S-1 full batches, the last takes the rest."""
    return [min(i * batch_size, rows) for i in range(steps)] + [rows]


def batches_per_part(done: int, parts: int) -> list[int]:
    """How many of a rank's first `done` batches each of its `parts` parts yielded: the
    DataLoader takes batches from its workers round-robin."""
    return [(done - q + parts - 1) // parts if done > q else 0 for q in range(parts)]


def _epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *extra])


class _Position:
    """The part of loader state that checkpoints need: where in which epoch we are."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_done = 0  # batches this rank has yielded in `epoch`

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0


class InMemoryLoader(_Position):
    """A split held as tensors (on the training device when it fits): no file reading per epoch."""

    def __init__(self, table: FeatureTable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.table, self.batch_size, self.rank, self.world_size = table, batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.num_rows = len(table)
        self.sizes, self.steps_per_epoch = part_sizes(self.num_rows, world_size, batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.num_rows} rows cannot be split over {world_size} ranks")

    def fix_shapes(self) -> None:
        """Cut batches of fixed shapes from now on (padded jagged columns: FeatureTable.pad_batches)."""
        self.table.pad_batches(self.batch_size)

    def unknown_counts(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, int]]:
        """Nothing to add: a split held in memory had every id counted when it was loaded."""
        return {}

    def __iter__(self) -> Iterator[Batch]:
        device = self.table.labels.device
        if self.shuffle:
            g = torch.Generator().manual_seed(int(_epoch_rng(self.seed, self.epoch).integers(2**62)))
            host_order = torch.randperm(self.num_rows, generator=g)
        else:
            host_order = torch.arange(self.num_rows)
        order = host_order.to(device)  # the host copy lets a table on a GPU be cut without host syncs
        start = sum(self.sizes[: self.rank])
        bounds = batch_bounds(self.sizes[self.rank], self.steps_per_epoch, self.batch_size)
        while self.batches_done < self.steps_per_epoch:
            i = self.batches_done
            a, b = start + bounds[i], start + bounds[i + 1]
            self.batches_done += 1
            yield self.table.take(order[a:b], host_order[a:b])


class _PartStream:
    """One part's batches for one epoch: read row groups, shuffle within blocks, cut batches.

    A block is `batches_per_block` consecutive batches of the part (the last block the rest),
    cut from the Arrow rows before they are converted: a batch never spans two blocks, so no
    rows are carried over and copied into the next block, and every batch is one gather (or,
    unshuffled, one slice) of its block's tensors.
    """

    def __init__(self, units: list[RowGroup], spec: FeatureSpec, batch_size: int, shuffle_buffer: int,
                 shuffle: bool, seed: int, epoch: int, part: int, parts: int, capacity: list[int] | None = None) -> None:
        self.spec, self.batch_size, self.shuffle, self.capacity = spec, batch_size, shuffle, capacity
        self.seed, self.epoch, self.part = seed, epoch, part
        total = sum(u.rows for u in units)
        sizes, self.steps = part_sizes(total, parts, batch_size)
        order = _epoch_rng(seed, epoch).permutation(len(units)) if shuffle else np.arange(len(units))
        self.units = [units[i] for i in order]
        self.start = sum(sizes[:part])
        self.rows = sizes[part]
        self.bounds = batch_bounds(self.rows, self.steps, batch_size)
        self.batches_per_block = max(1, shuffle_buffer // batch_size)

    def _tables(self) -> Iterator[tuple[pa.Table, RowGroup]]:
        """This part's rows, in the epoch's row-group order, sliced out of whole row groups."""
        lo, hi, pos = self.start, self.start + self.rows, 0
        files: dict[Path, pq.ParquetFile] = {}
        for u in self.units:
            a, b = pos, pos + u.rows
            pos = b
            if b <= lo or a >= hi:
                continue
            t = read_row_group(u, self.spec.columns, files)
            yield t.slice(max(lo - a, 0), min(hi, b) - max(lo, a)), u

    def _blocks(self) -> Iterator[tuple[int, pa.Table, list[RowGroup]]]:
        """(first batch, rows, the row groups they come from) per block, in order."""
        tables = self._tables()
        pending: list[tuple[pa.Table, RowGroup]] = []  # read, not yet handed out
        have = 0
        for first in range(0, self.steps, self.batches_per_block):
            last = min(first + self.batches_per_block, self.steps)
            need = self.bounds[last] - self.bounds[first]
            while have < need:
                t, u = next(tables, (None, None))
                if t is None:
                    raise DataError(f"row-group metadata promised more rows than the files hold (part {self.part})")
                pending.append((t, u))
                have += t.num_rows
            units = list(dict.fromkeys(u for _, u in pending))
            rows = concat_tables([t for t, _ in pending], [u.path for u in units])
            rest = rows.slice(need)
            pending, have = ([(rest, pending[-1][1])] if rest.num_rows else []), rest.num_rows
            yield first, rows.slice(0, need), units

    def batches(self, skip: int = 0) -> Iterator["_Read"]:
        """This part's `steps` batches; the first `skip` are read but not built (resume). Each
        comes with the ids its block's vocabularies could not honour (counted once per block)."""
        for block_no, (first, rows, units) in enumerate(self._blocks()):
            last = min(first + self.batches_per_block, self.steps)
            if last <= skip:
                continue  # read (the stream's position), never converted
            try:
                table = self.spec.encode(rows, str(units[0].path))
            except DataError:
                # A block's row numbers are not a file's: find the bad value again, one whole row
                # group at a time, so that the message names its file, row group and row exactly.
                files: dict[Path, pq.ParquetFile] = {}
                for u in units:
                    self.spec.encode(read_row_group(u, self.spec.columns, files), f"{u.path} (row group {u.index})")
                raise
            unknown = self.spec.take_unknown_counts()  # this block's, handed over with its first batch
            base = self.bounds[first]
            order = None
            if self.shuffle:
                seed = _epoch_rng(self.seed, self.epoch, self.part, block_no).integers(2**62)
                order = torch.randperm(len(table), generator=torch.Generator().manual_seed(int(seed)))
            if self.capacity is not None:  # padded batches are cut by `take`, so in order if not shuffled
                table.pad_batches(self.batch_size, self.capacity)
                order = torch.arange(len(table)) if order is None else order
            for i in range(max(first, skip), last):
                a, b = self.bounds[i] - base, self.bounds[i + 1] - base
                yield _Read(table.slice(a, b) if order is None else table.take(order[a:b]), unknown)
                unknown = {}


def concat_tables(tables: list[pa.Table], paths: list[Path]) -> pa.Table:
    """Tables read from `paths` as one, zero-copy (they become its chunks). Files may differ in
    integer width or nullability (shards written by different tools): such columns are widened."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        files = ", ".join(dict.fromkeys(str(p) for p in paths))
        raise DataError(f"{files}: the files' columns have types that do not combine "
                        f"({first_line(e)})") from None


class StreamingDataset(torch.utils.data.IterableDataset):
    """Streams one rank's parts; with DataLoader workers each worker streams one part."""

    def __init__(self, loader: "StreamingLoader", skip_per_part: list[int], rotate: int) -> None:
        self.loader, self.skip_per_part, self.rotate = loader, skip_per_part, rotate

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        L = self.loader
        # Rotation keeps the batch order identical after a mid-epoch resume: the DataLoader
        # always starts with worker 0, whichever part is due next.
        local = ((0 if info is None else info.id) + self.rotate) % L.num_workers
        part = L.rank * L.num_workers + local
        stream = _PartStream(L.units, L.spec, L.batch_size, L.shuffle_buffer, L.shuffle, L.seed, L.epoch, part, L.parts,
                             L.capacity)
        try:
            for read in stream.batches(self.skip_per_part[local]):
                yield read if info is None else _Read(_Handover(read.batch), read.unknown)
        except WdlError as e:
            # Handed over as an item: raised in a worker, the DataLoader would re-raise it with
            # the worker's whole traceback in the message.
            yield _Failure(e)


class _Handover:
    """A batch leaving a loader worker. Pickled, it becomes a PackedBatch (Batch.pack: one
    shared-memory buffer, not one per tensor); the queue's feeder thread pickles it while the
    worker reads on, so the copy into shared memory overlaps the reading, as torch's own hand-over
    of each tensor does."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __reduce__(self):
        p = self.batch.pack()
        return PackedBatch, (p.buffer, p.layout, p.keys, p.id_keys, p.has_ids)


@dataclass
class _Read:
    """A batch and the unknown-id counts (FeatureSpec.take_unknown_counts) of what was encoded
    for it: the counts ride along with the batches, so a worker's reach the training process
    without an item of their own (that would shift the DataLoader's round-robin order)."""

    batch: Any
    unknown: dict[str, dict[str, int]]

    def pin_memory(self) -> "_Read":  # the DataLoader's pinning thread calls this
        return _Read(self.batch.pin_memory(), self.unknown)


@dataclass
class _Failure:
    error: WdlError


def _one_arrow_thread(_: int) -> None:
    # A worker is one of several readers: like torch (which the DataLoader sets to one thread in
    # each worker), pyarrow decodes in one thread there rather than a pool of one per core.
    pa.set_cpu_count(1)


class StreamingLoader(_Position):
    """Batches of one split for one rank, streamed from Parquet row groups.

    num_workers: DataLoader worker processes for this rank (0 = read in the training process).
    pin_memory: with workers, batches arrive in pinned memory, pinned by the DataLoader's own
        thread while the step runs (for a CUDA device: wdl.data.prefetch then copies them as
        they are).
    """

    def __init__(self, source: list[Path] | list[RowGroup], spec: FeatureSpec, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, shuffle_buffer: int = 65536,
                 seed: int = 0, pin_memory: bool = False, timeout_s: float = 600) -> None:
        super().__init__()
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.num_workers_proc, self.pin_memory, self.timeout_s = num_workers, pin_memory, timeout_s
        self._unknown: dict[str, list[int]] = {}  # unknown-id counts of the batches read in epoch ...
        self._unknown_epoch = -1  # ... this one
        self.capacity: list[int] | None = None  # ids per jagged column group of a padded batch (fix_shapes)
        self.num_workers = max(1, num_workers)  # parts per rank
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        # Whole files, or chosen row groups (e.g. the train rows left after holding some out).
        chosen = bool(source) and isinstance(source[0], RowGroup)
        self.units = list(source) if chosen else list_row_groups(list(source), spec)
        self.parts = world_size * self.num_workers
        if len(self.units) < self.parts:
            raise DataError(
                f"{len(self.units)} row groups cannot feed {world_size} ranks x {self.num_workers} workers; "
                "prepare the data with smaller row groups or use fewer ranks/workers"
            )
        self.num_rows = sum(u.rows for u in self.units)
        _, steps = part_sizes(self.num_rows, self.parts, batch_size)
        if steps == 0:  # row groups can be empty: the check above counts them, not their rows
            raise DataError(f"{self.num_rows} rows cannot be split over {world_size} ranks x {self.num_workers} workers")
        self.steps_per_epoch = steps * self.num_workers

    def fix_shapes(self) -> None:
        """Cut batches of fixed shapes from now on: every full batch's jagged columns are padded
        (FeatureTable.pad_batches) to a capacity set from the row lengths of a sample of row
        groups, the same for every block, worker and epoch. (Batches whose columns all hold one
        id per row have fixed shapes already.)"""
        if set(self.spec.sparse_keys) <= self.spec.single_keys:
            return
        files: dict[Path, pq.ParquetFile] = {}
        sample = [self.spec.encode(read_row_group(u, self.spec.columns, files), f"{u.path} (row group {u.index})")
                  for u in sample_row_groups(self.units)]
        self.spec.take_unknown_counts()  # the sample's: the stream counts these rows when it reads them
        self.capacity = FeatureTable.concat(sample).pad_capacity(self.batch_size)

    def unknown_counts(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, int]]:
        """Per vocabulary column, the `values`, `out_of_vocab` and `missing` ids (as
        FeatureSpec.take_unknown_counts) of every batch this rank has read in the current epoch:
        the check at start reads a sample of row groups only. reduce: e.g. a sum over ranks
        (called on every rank alike: each has every column, in the same order)."""
        names = [n for n, sc in self.spec.sparse.items() if sc.mode != "hash"]
        counts = torch.tensor([self._unknown.get(n, [0, 0, 0]) for n in names], dtype=torch.float64).reshape(-1, 3)
        if reduce is not None:
            counts = reduce(counts)
        return {n: dict(zip(("values", "out_of_vocab", "missing"), map(int, c.tolist()))) for n, c in zip(names, counts)}

    def __iter__(self) -> Iterator[Batch]:
        if self.batches_done == 0 or self._unknown_epoch != self.epoch:
            self._unknown, self._unknown_epoch = {}, self.epoch
        ds = StreamingDataset(self, batches_per_part(self.batches_done, self.num_workers),
                              rotate=self.batches_done % self.num_workers)
        if self.num_workers_proc == 0:
            it = iter(ds)
        else:
            # A generator of its own: a DataLoader draws its workers' seeds from torch's global
            # one otherwise, which dropout uses, so a resumed run's masks would shift by a draw.
            # (The workers use no torch randomness: their order comes from the seeds above.)
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers_proc,
                                                  persistent_workers=False, pin_memory=self.pin_memory,
                                                  worker_init_fn=_one_arrow_thread, timeout=self.timeout_s,
                                                  generator=torch.Generator().manual_seed(self.seed)))
        for n in itertools.count():
            try:
                read = next(it, None)
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                raise self._frozen(it, n) from None
            if read is None:
                return
            if isinstance(read, _Failure):
                raise read.error
            for name, c in read.unknown.items():
                mine = self._unknown.setdefault(name, [0, 0, 0])
                for j, k in enumerate(("values", "out_of_vocab", "missing")):
                    mine[j] += c[k]
            self.batches_done += 1
            batch = read.batch
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch

    def _frozen(self, it: Any, received: int) -> TrainingError:
        """The error for a worker that sent nothing for `timeout_s`: the DataLoader asks its
        workers in turn, so the one it waited for is the next in the round."""
        worker = received % self.num_workers_proc
        procs = getattr(it, "_workers", None) or []  # the DataLoader's processes (not public API)
        pid = f" (pid {procs[worker].pid})" if worker < len(procs) else ""
        return TrainingError(f"data loader worker {worker}{pid} of rank {self.rank} sent no batch for "
                             f"{self.timeout_s:g} s (data.loader_timeout_s): stuck reading its part of the data "
                             "(a hung file system?) or too slow for that limit")
