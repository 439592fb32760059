"""Embedding-bag look-ups whose training step costs O(batch), never O(table).

Two implementations map a Batch's sparse features to one sum-pooled vector per feature:

- `FusedEmbeddingBags` (pure PyTorch): tables of one dimension live in one storage
  (`EmbeddingGroup`), each feature at its own row offset, so a group costs one look-up per
  step whatever its number of features. The storage never receives a gradient: a step reads
  the distinct rows the batch touches into a small "working set" tensor, pools from it, and
  autograd fills the working set's gradient, which is exactly the gradient of those rows
  (summed over their occurrences). The row optimisers (`wdl.train.sparse_optim`) then update
  those rows and nothing else. Where the rows live is the group's `rows` store: all in this
  process (`LocalRows`), or split over ranks by `wdl.distributed` (which swaps the store; the
  model never knows).
- `TorchRecEmbeddingBags`: TorchRec's EmbeddingBagCollection, built on the `meta` device and
  materialised shard by shard by `wdl.distributed.sharding`; FBGEMM updates the touched rows
  in the backward pass.

Initial values come from `wdl.model.init.normal_block`, a function of (seed, table, row,
column), so both give the same numbers for the same seed, however the tables are split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wdl.data.batch import Batch
from wdl.model.init import normal_block


@dataclass(frozen=True)
class TableSpec:
    """One embedding table reading one feature; `name` is unique across the model."""

    feature: str
    num_embeddings: int
    dim: int
    name: str
    init_std: float = 0.0  # N(0, init_std) initial values; 0 starts at zero (the wide part)


def torchrec_available() -> bool:
    # torch.fx warns about is_fx_tracing once per process when torchrec is imported: noise.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        import torchrec  # noqa: F401
    except Exception:  # ImportError, or fbgemm failing to load its kernels
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "torchrec" if torchrec_available() else "torch"
    if backend == "torchrec" and not torchrec_available():
        from wdl.errors import ConfigError

        raise ConfigError("model.embedding_backend=torchrec but torchrec (with fbgemm-gpu) cannot be imported; use 'torch'")
    return backend


# ---------------------------------------------------------------------------------------------
# Where a group's rows live.


def dedupe(ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The distinct values of `ids` [N]: (uniq, inv, src) with uniq[inv] == ids.

    On CPU uniq is compact (torch.unique) and src is None. On CUDA torch.unique would stall
    the host to learn how many there are, so `dedupe_padded` keeps every shape at N.
    """
    if ids.device.type == "cuda" and ids.numel() > 0:
        return dedupe_padded(ids)
    uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
    return uniq, inv, None


def dedupe_padded(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`dedupe` without a host sync: uniq [N] holds the distinct ids ascending, then copies of
    uniq[0]; src [N] maps every slot to itself and each padding slot to slot 0, so a row update
    computed per slot from grad[src] writes identical values wherever a row appears twice."""
    srt, perm = torch.sort(ids)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[1:] = srt[1:] != srt[:-1]
    slot = torch.cumsum(first, 0) - 1  # slot of each sorted id
    inv = torch.empty_like(slot).scatter_(0, perm, slot)
    uniq = srt[:1].expand_as(srt).clone().scatter_(0, slot, srt)  # duplicates write equal values
    pos = torch.arange(ids.numel(), device=ids.device)
    return uniq, inv, torch.where(pos <= slot[-1], pos, 0)


class LocalRows(nn.Module):
    """All rows of a group in this process.

    weight: [num_rows, dim]; it takes no gradient (see module docstring).
    """

    def __init__(self, num_rows: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.weight = nn.Parameter(torch.empty(num_rows, dim, device=device), requires_grad=False)

    @property
    def row_range(self) -> tuple[int, int]:
        """The global rows [lo, hi) held here."""
        return 0, self.num_rows

    def table(self) -> Tensor | None:
        """The whole table, when pooling may read it directly (no look-up through `pull`)."""
        return self.weight

    def pull(self, ids: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Rows of the distinct `ids`: (rows [U, dim], inv [N] into rows, ctx for `push`)."""
        uniq, inv, src = dedupe(ids)
        return self.weight[uniq], inv, (uniq, src)

    def push(self, ctx: tuple, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of pulled rows -> (local row indices, summed gradients) to update here."""
        uniq, src = ctx
        return uniq, grad if src is None else grad[src]

    def export(self, t: Tensor) -> Tensor:
        """How a tensor shaped like the local rows appears in a state dict (whole, here)."""
        return t


class EmbeddingGroup(nn.Module):
    """Tables of one dimension fused into one storage; table k holds rows
    [offset_k, offset_k + rows_k).

    forward: Batch -> [K, B, dim], sum-pooled per (feature, row), features in `keys` order.
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None) -> None:
        super().__init__()
        dims = {t.dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"one group holds tables of one dimension, got {sorted(dims)}")
        self.tables = list(tables)
        self.keys = [t.feature for t in tables]
        self.dim = tables[0].dim
        self.offsets = [0]
        for t in tables:
            self.offsets.append(self.offsets[-1] + t.num_embeddings)
        self.num_rows = self.offsets[-1]
        self.rows: nn.Module = LocalRows(self.num_rows, self.dim, device)
        self._row_base_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._pending: tuple[tuple, Tensor] | None = None

    def forward(self, batch: Batch) -> Tensor:
        b, k = len(batch), len(self.keys)
        cols = [batch.sparse[key] for key in self.keys]
        values = cols[0].values if k == 1 else torch.cat([c.values for c in cols])
        base = self._row_base(b, values.device)  # [K*B] first row of each bag's table
        if all(c.single for c in cols):  # one id per (feature, row): a plain look-up
            ids, offsets = values + base, None
        else:
            lengths = cols[0].lengths if k == 1 else torch.cat([c.lengths for c in cols])
            ids = values + torch.repeat_interleave(base, lengths, output_size=values.numel())
            offsets = torch.cumsum(lengths, 0, dtype=torch.int64) - lengths
        if self.training and torch.is_grad_enabled():
            rows, inv, ctx = self.rows.pull(ids)
            working = rows.detach().requires_grad_()
            self._pending = (ctx, working)
            out = _pool(working, inv, offsets)
        elif (table := self.rows.table()) is not None:
            out = _pool(table, ids, offsets)
        else:
            rows, inv, _ = self.rows.pull(ids)
            out = _pool(rows, inv, offsets)
        return out.view(k, b, self.dim)

    def take_pending(self) -> tuple[tuple, Tensor] | None:
        """(ctx, working set) of the last training forward, once; its .grad is set by backward."""
        pending, self._pending = self._pending, None
        return pending

    def _row_base(self, b: int, device: torch.device) -> Tensor:
        key = (b, device)
        if key not in self._row_base_cache:
            if len(self._row_base_cache) > 8:  # eval's last batch etc.: keep a few sizes only
                self._row_base_cache.clear()
            starts = torch.tensor(self.offsets[:-1], dtype=torch.int64, device=device)
            self._row_base_cache[key] = starts.repeat_interleave(b)
        return self._row_base_cache[key]

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initial values of the rows held here (see wdl.model.init)."""
        lo, hi = self.rows.row_range
        w = self.rows.weight
        for t, start in zip(self.tables, self.offsets):
            a, b = max(lo, start), min(hi, start + t.num_embeddings)
            if a < b:
                normal_block(w[a - lo:b - lo], seed, t.name, t.init_std, row0=a - start, col0=0, dim=t.dim)

    def weights(self) -> dict[str, Tensor]:
        """Each feature's table as a view of the storage (all rows local)."""
        w = self.rows.weight
        return {t.feature: w[a:b] for t, a, b in zip(self.tables, self.offsets, self.offsets[1:])}


def _pool(table: Tensor, idx: Tensor, offsets: Tensor | None) -> Tensor:
    if offsets is None:
        return F.embedding(idx, table)
    return F.embedding_bag(idx, table, offsets, mode="sum")


class FusedEmbeddingBags(nn.Module):
    """Pure-PyTorch backend: one EmbeddingGroup per embedding dimension.

    forward: Batch -> {feature: [B, dim]}
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None) -> None:
        super().__init__()
        self.features = [t.feature for t in tables]
        by_dim: dict[int, list[TableSpec]] = {}
        for t in tables:
            by_dim.setdefault(t.dim, []).append(t)
        self.groups = nn.ModuleList([EmbeddingGroup(ts, device) for ts in by_dim.values()])

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g in self.groups:
            out.update(zip(g.keys, g(batch).unbind(0)))
        return out

    def reset_parameters(self, seed: int) -> None:
        for g in self.groups:
            g.reset_parameters(seed)

    def weights(self) -> dict[str, Tensor]:
        return {f: w for g in self.groups for f, w in g.weights().items()}


class TorchRecEmbeddingBags(nn.Module):
    """TorchRec backend: one EmbeddingBagCollection with a table per feature.

    forward: Batch -> {feature: [B, dim]}
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None) -> None:
        super().__init__()
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.tables = list(tables)
        self.features = [t.feature for t in tables]
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_embeddings,
                                   feature_names=[t.feature], pooling=PoolingType.SUM)
                for t in tables
            ],
            device=device,
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.ebc(batch.kjt(self.features)).to_dict()

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Unsharded tables only; sharded ones are initialised shard by shard by the sharding module."""
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        if not isinstance(self.ebc, EmbeddingBagCollection) or self.ebc.device.type == "meta":
            return
        for t, w in zip(self.tables, self.weights().values()):
            normal_block(w, seed, t.name, t.init_std, row0=0, col0=0, dim=t.dim)

    def weights(self) -> dict[str, Tensor]:
        bags = self.ebc.embedding_bags
        return {t.feature: bags[t.name].weight for t in self.tables}


def build_embedding_bags(tables: list[TableSpec], backend: str, device: torch.device | None = None) -> nn.Module:
    if resolve_backend(backend) == "torchrec":
        return TorchRecEmbeddingBags(tables, device)
    return FusedEmbeddingBags(tables, device)
