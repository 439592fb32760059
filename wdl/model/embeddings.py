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
    pooling: str = "sum"  # a row's ids pooled by sum or mean (ModelConfig.pooling)


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


def dedupe(ids: Tensor, slots: Tensor, compact: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The distinct values of `ids` [N] in O(N), without sorting: (uniq, inv, src), uniq[inv] == ids.

    slots: int32 scratch with one entry per table row; each distinct id's entry receives the
    position of one of its occurrences (any one: the winner), whose rank among the winners is
    its index in uniq. Entries are only read where this call wrote them, so the scratch never
    needs clearing.

    compact: uniq has exactly the U distinct ids and src is None. Otherwise (on CUDA, where
    learning U would stall the host) every shape stays N: uniq's slots past U repeat ids[0],
    and src [N] maps each slot to itself and each padding slot to ids[0]'s slot, so a row
    update computed per slot from grad[src] writes identical values wherever a row appears twice.
    """
    n = ids.numel()
    if n == 0:
        return ids, ids, None if compact else ids
    pos = torch.arange(n, dtype=torch.int32, device=ids.device)
    slots.index_put_((ids,), pos)
    win = slots.index_select(0, ids)
    rank = torch.cumsum(win == pos, 0) - 1
    inv = rank.index_select(0, win)
    if compact:
        return ids.new_empty(int(rank[-1]) + 1).index_put_((inv,), ids), inv, None
    uniq = ids[:1].expand(n).clone().index_put_((inv,), ids)  # duplicates write equal values
    return uniq, inv, torch.where(pos <= rank[-1], pos, inv[:1].to(torch.int32)).to(torch.int64)


class LocalRows(nn.Module):
    """All rows of a group in this process.

    weight: [num_rows, dim]; it takes no gradient (see module docstring).
    """

    def __init__(self, num_rows: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.weight = nn.Parameter(torch.empty(num_rows, dim, device=device), requires_grad=False)
        self._slots: Tensor | None = None  # dedupe's scratch: 4 bytes per row, made at the first step
        self.static_shapes: bool | None = None  # dedupe without host syncs; None: on CUDA only

    @property
    def row_range(self) -> tuple[int, int]:
        """The global rows [lo, hi) held here."""
        return 0, self.num_rows

    def table(self) -> Tensor | None:
        """The whole table, when pooling may read it directly (no look-up through `pull`)."""
        return self.weight

    def pull(self, ids: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Rows of the distinct `ids`: (rows [U, dim], inv [N] into rows, ctx for `push`)."""
        if self._slots is None or self._slots.device != ids.device:
            # zeros, not empty: pages touched now, not one page fault at a time during training
            self._slots = torch.zeros(self.num_rows, dtype=torch.int32, device=ids.device)
        static = self.static_shapes if self.static_shapes is not None else ids.device.type == "cuda"
        uniq, inv, src = dedupe(ids, self._slots, compact=not static)
        return self.weight.index_select(0, uniq), inv, (uniq, src)

    def push(self, ctx: tuple, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of pulled rows -> (local row indices, summed gradients) to update here."""
        uniq, src = ctx
        return uniq, grad if src is None else grad.index_select(0, src)

    def export(self, t: Tensor) -> Tensor:
        """How a tensor shaped like the local rows appears in a state dict (whole, here)."""
        return t


class EmbeddingGroup(nn.Module):
    """Tables of one dimension fused into one storage; table k holds rows
    [offset_k, offset_k + rows_k).

    bias: one more row (the last, starting at 0) that every batch row reads: a linear model's
    bias as a feature that is always on, trained by the group's row optimiser like any other.

    forward: Batch -> [K, B, dim], sum-pooled per (feature, row) (mean-pooled for a table whose
    spec says so), features in `keys` order; with sum_features, [B, dim] summed over the features
    (and the bias row).
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None, bias: bool = False) -> None:
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
        self.bias_row = self.offsets[-1] if bias else None
        self.num_rows = self.offsets[-1] + int(bias)
        self.rows: nn.Module = LocalRows(self.num_rows, self.dim, device)
        self._bag_cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
        self._trained_sizes: set[tuple[int, torch.device]] = set()
        self._bias_ids: Tensor | None = None
        self._no_ids: Tensor | None = None  # [0]: the empty padding bag of an unpadded feature
        self._pending: tuple[tuple, Tensor] | None = None
        self.mean_pooled = [t.pooling == "mean" for t in tables]

    def forward(self, batch: Batch, sum_features: bool = False) -> Tensor:
        b, k = len(batch), len(self.keys)
        cols = [batch.sparse[key] for key in self.keys]
        # A padded batch (Jagged.padded) pools each feature into one more bag, the padding's, dropped below.
        padded = any(c.padded for c in cols)
        bags = b + 1 if padded else b  # per feature
        values = cols[0].values if k == 1 else torch.cat([c.values for c in cols])
        # per bag: its table's first row, its batch row, itself, whether its feature is mean-pooled
        base, bag_row, bag_id, mean_bags = self._bag_tables(bags, values.device)
        scale = None  # per id: 1 / its bag's length for mean-pooled features
        if all(c.single for c in cols):  # one id per (feature, row): bag i is id i (its mean is itself)
            ids = values + base
            target = bag_row if sum_features else None
        else:
            lengths = cols[0].lengths if k == 1 else torch.cat(self._lengths(cols, padded))
            n = values.numel()
            ids = values + torch.repeat_interleave(base, lengths, output_size=n)
            target = torch.repeat_interleave(bag_row if sum_features else bag_id, lengths, output_size=n)
            if mean_bags is not None:
                per_bag = torch.where(mean_bags, 1.0 / lengths.clamp(min=1), 1.0)
                scale = torch.repeat_interleave(per_bag, lengths, output_size=n).unsqueeze(1)
        if self.bias_row is not None:
            if not sum_features:
                raise ValueError("a group with a bias row pools with sum_features=True")
            ids = torch.cat([ids, self._bias_id(values.device)])
        if self.training and torch.is_grad_enabled():
            rows, idx, ctx = self.rows.pull(ids)
            table = rows.detach().requires_grad_()
            self._pending = (ctx, table)
        elif (table := self.rows.table()) is not None:
            idx = ids
        else:
            table, idx, _ = self.rows.pull(ids)
        bias = None
        if self.bias_row is not None:
            idx, bias = idx[:-1], table.index_select(0, idx[-1:])
        # Gather, then sum into bags: index_select and index_add are O(N) both ways, where
        # embedding_bag's backward sorts (5x slower on CPU).
        out = table.index_select(0, idx)
        if scale is not None:
            out = out * scale
        if target is not None:
            out = out.new_zeros(bags if sum_features else k * bags, self.dim).index_add(0, target, out)
        if not sum_features:
            out = out.view(k, bags, self.dim)
            return out[:, :b] if padded else out
        if padded:
            out = out[:b]
        return out if bias is None else out + bias

    def _lengths(self, cols: list, padded: bool) -> list[Tensor]:
        """Each feature's lengths; in a padded batch, an empty padding bag after an unpadded
        feature's rows, so that every feature has b + 1 bags (concatenated in one `cat`)."""
        if not padded:
            return [c.lengths for c in cols]
        device = cols[0].lengths.device
        if self._no_ids is None or self._no_ids.device != device:
            self._no_ids = torch.zeros(1, dtype=cols[0].lengths.dtype, device=device)
        out = []
        for c in cols:
            out += [c.lengths] if c.padded else [c.lengths, self._no_ids]
        return out

    def _bias_id(self, device: torch.device) -> Tensor:
        if self._bias_ids is None or self._bias_ids.device != device:
            self._bias_ids = torch.tensor([self.bias_row], dtype=torch.int64, device=device)
        return self._bias_ids

    def take_pending(self) -> tuple[tuple, Tensor] | None:
        """(ctx, working set) of the last training forward, once; its .grad is set by backward."""
        pending, self._pending = self._pending, None
        return pending

    def _bag_tables(self, b: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per bag (feature-major, K*B of them): its table's first row, its batch row, its index, and
        whether its feature is mean-pooled (None when none is)."""
        key = (b, device)
        if self.training:
            self._trained_sizes.add(key)
        if key not in self._bag_cache:
            if len(self._bag_cache) > 8:  # eval's last batches etc.: keep a few sizes only, but never
                # a training step's, which a step captured as a CUDA graph reads without a reference
                self._bag_cache = {k: v for k, v in self._bag_cache.items() if k in self._trained_sizes}
            k = len(self.keys)
            starts = torch.tensor(self.offsets[:-1], dtype=torch.int64, device=device)
            mean = (torch.tensor(self.mean_pooled, device=device).repeat_interleave(b)
                    if any(self.mean_pooled) else None)
            self._bag_cache[key] = (starts.repeat_interleave(b), torch.arange(b, device=device).repeat(k),
                                    torch.arange(k * b, device=device), mean)
        return self._bag_cache[key]

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initial values of the rows held here (see wdl.model.init)."""
        lo, hi = self.rows.row_range
        w = self.rows.weight
        for t, start in zip(self.tables, self.offsets):
            a, b = max(lo, start), min(hi, start + t.num_embeddings)
            if a < b:
                normal_block(w[a - lo:b - lo], seed, t.name, t.init_std, row0=a - start, col0=0, dim=t.dim)
        if self.bias_row is not None and lo <= self.bias_row < hi:
            w[self.bias_row - lo].zero_()

    def weights(self) -> dict[str, Tensor]:
        """Each feature's table as a view of the storage (all rows local)."""
        w = self.rows.weight
        return {t.feature: w[a:b] for t, a, b in zip(self.tables, self.offsets, self.offsets[1:])}


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
        self.keys = tuple(self.features)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_embeddings,
                                   feature_names=[t.feature],
                                   pooling=PoolingType.MEAN if t.pooling == "mean" else PoolingType.SUM)
                for t in tables
            ],
            device=device,
        )

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        # By attribute and item, not a call: TorchRec's train pipeline traces this to cut the next
        # batch's input for the sharded tables ahead of its forward (it follows getattr/getitem only).
        return self.ebc(batch.kjts[self.keys]).to_dict()

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
