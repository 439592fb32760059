"""Wide & Deep (Cheng et al., 2016). Knows nothing of ranks, devices or data files.

    logit = wide(x) + deep(x) + b          p = sigmoid(logit)

wide: a generalised linear model over raw sparse features and hashed crosses, i.e. one
      embedding table of dimension 1 per feature, sum-pooled and summed.
deep: embeddings (sum-pooled for multi-hot) concatenated with dense features, then an MLP
      with ReLU ending in one unit; optionally with explicit pairwise interactions of the
      embeddings (dot products into the MLP, or their sum onto the logit; wdl.model.interactions).
Both parts are trained jointly through one loss (never as an ensemble).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wdl.config import DeepConfig, ModelConfig
from wdl.data.batch import Batch
from wdl.data.tables import model_reads
from wdl.model.embeddings import EmbeddingGroup, FusedEmbeddingBags, TableSpec, TorchRecEmbeddingBags, build_embedding_bags
from wdl.model.init import generator
from wdl.model.interactions import PairwiseInteraction


class ByteDropout(nn.Module):
    """Inverted dropout whose keep-mask comes from random bytes.

    torch's CPU dropout draws one Bernoulli sample per element (4.4 ms for a 1024 x 256
    activation with 2 intra-op threads, a third of a MovieLens training step). One random byte per
    element (8 from each 64-bit draw) is far cheaper, and the mask is built with arithmetic
    only: comparisons that produce bool tensors, and bool-float products, are not vectorised
    on CPU and cost 5-10x more. An element is kept when its byte >= t, i.e. when
    clamp(byte - (t - 1), 0, 1) is 1. p is rounded to a multiple of 1/256 (0.5 is exact).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 256)  # an element is dropped when its byte < threshold
        self.keep = 1.0 - self.threshold / 256

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if torch.compiler.is_compiling():  # the compiler fuses its own dropout (random_ would break the graph)
            return nn.functional.dropout(x, self.threshold / 256)
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bytes_ = words.view(torch.uint8)[: x.numel()].view(x.shape).to(x.dtype)
        mask = bytes_.sub_(self.threshold - 1).clamp_(0.0, 1.0).mul_(1.0 / self.keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.threshold / 256}"


class WideArch(nn.Module):
    """Sparse linear part: every wide feature (columns and crosses) in one dimension-1
    EmbeddingGroup, so the whole part is one gather-and-sum. The model's bias is the group's
    bias row (a feature that is always on), trained with the wide tables by their optimiser.

    forward: Batch -> [B] logits
    """

    def __init__(self, features: list[str], num_embeddings: dict[str, int], device: torch.device | None = None,
                 pooling: dict[str, str] | None = None) -> None:
        super().__init__()
        pooling = pooling or {}
        self.embeddings = EmbeddingGroup([TableSpec(f, num_embeddings[f], 1, f"wide_{f}", pooling=pooling.get(f, "sum"))
                                          for f in features], device, bias=True)

    def forward(self, batch: Batch) -> Tensor:
        return self.embeddings(batch, sum_features=True).view(-1)  # [B, 1] -> [B]


class DeepArch(nn.Module):
    """Embeddings + dense features -> MLP(ReLU) -> one unit, with optional explicit interactions.

    The pooled embeddings E [B, sum(dims)] (dropped out with `embedding_dropout` in training)
    feed the MLP with the dense features; `interaction` (see wdl.model.interactions) adds
    dot: the P pairwise dot products of E's vectors to the MLP input ([B, sum(dims) + dense + P]);
    fm: the sum of those dot products to the output. With `precision: bf16` the MLP runs under
    bf16 autocast (fp32 weights; the embeddings, interactions and logit stay fp32).

    forward: Batch -> [B] logits
    """

    def __init__(self, cfg: DeepConfig, num_embeddings: dict[str, int], dense_dim: int, backend: str,
                 device: torch.device | None = None, table_device: torch.device | None = None,
                 pooling: dict[str, str] | None = None) -> None:
        super().__init__()
        embedding_dims = cfg.embeddings
        self.features = list(embedding_dims)
        pooling = pooling or {}
        tables = [TableSpec(f, num_embeddings[f], d, f"deep_{f}", cfg.init_std, pooling.get(f, "sum"))
                  for f, d in embedding_dims.items()]
        self.embeddings = build_embedding_bags(tables, backend, table_device) if tables else None
        self.embedding_dropout = ByteDropout(cfg.embedding_dropout) if cfg.embedding_dropout > 0 else None
        self.interaction = (
            PairwiseInteraction(embedding_dims, [tuple(p) for p in cfg.interaction_pairs] or None, cfg.interaction)
            if cfg.interaction != "none" else None
        )
        layers: list[nn.Module] = []
        width = sum(embedding_dims.values()) + dense_dim + (self.interaction.num_outputs if self.interaction else 0)
        for h in cfg.hidden:
            layers += [nn.Linear(width, h, device=device), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(ByteDropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, 1, bias=False, device=device))
        self.mlp = nn.Sequential(*layers)
        self.bf16 = cfg.precision == "bf16"
        self.dense_dim = dense_dim  # a Python int: the forward stays traceable by torch.fx (TorchRec's pipeline)
        self._compiled_head = None

    def compile_head(self, **options) -> None:
        """Train through `torch.compile(self.head)`: the dense computation after the look-ups
        (interactions, dropout, MLP) fused into few kernels. The look-ups stay eager: their
        shapes depend on the batch's ids. Evaluation keeps the eager head (no recompilation for
        eval batches and eval mode)."""
        self._compiled_head = torch.compile(self.head, **options)

    def forward(self, batch: Batch) -> Tensor:
        vectors = []
        if self.embeddings is not None:
            pooled = self.embeddings(batch)
            vectors = [pooled[f] for f in self.features]
        head = self._compiled_head if self._compiled_head is not None and self.training else self.head
        return head(vectors, batch.dense)

    def head(self, vectors: list[Tensor], dense: Tensor) -> Tensor:
        """Pooled embeddings (one [B, dim] per feature, in `features` order) and dense features
        [B, D] -> [B] logits."""
        parts, pairwise = [], None
        if vectors:
            if self.embedding_dropout is None and self.interaction is None:
                parts += vectors  # concatenated once, below, with the dense features
            else:
                emb = torch.cat(vectors, dim=1)  # [B, sum(dims)]
                if self.embedding_dropout is not None:
                    emb = self.embedding_dropout(emb)
                parts.append(emb)
                if self.interaction is not None:
                    pairwise = self.interaction(emb)
        if self.dense_dim:
            parts.append(dense)
        if pairwise is not None and self.interaction.kind == "dot":
            parts.append(pairwise)
        x = torch.cat(parts, dim=1)
        if self.bf16:  # the MLP's matmuls in bf16, its weights fp32 masters; the logit back in fp32
            # No cast cache: each weight is cast once per forward anyway, and a cached cast must
            # not outlive a CUDA graph capture (train.cuda_graph; PyTorch's notes on graphs + AMP).
            with torch.autocast(_device_type(x), dtype=torch.bfloat16, cache_enabled=False):
                out = self.mlp(x).squeeze(1).float()
        else:
            out = self.mlp(x).squeeze(1)
        # fm goes to the logit, not through the MLP: a user x item dot product on the logit is
        # matrix factorisation exactly, the shape an MLP learns poorly (module docstring of
        # wdl.model.interactions); the MLP still models what is not a dot product.
        return out + pairwise if pairwise is not None and self.interaction.kind == "fm" else out


@dataclass
class Part:
    """What one optimiser trains: dense parameters and wdl's fused embedding groups. (TorchRec's
    tables are not listed: FBGEMM updates them in the backward pass.)"""

    dense: list[nn.Parameter] = field(default_factory=list)
    tables: list[EmbeddingGroup] = field(default_factory=list)


class WideDeep(nn.Module):
    """`kind` picks the ablation: wide_deep, wide or deep.

    With table_device="meta" the embedding tables are only described, not allocated: the
    sharding module materialises each rank's rows (TorchRec's or wdl's) and `init_parameters`
    fills whatever is local. Dense layers live on `device` (they are small).

    forward: Batch -> [B] logits
    """

    def __init__(self, cfg: ModelConfig, num_embeddings: dict[str, int], dense_dim: int,
                 device: torch.device | None = None, table_device: torch.device | None = None) -> None:
        super().__init__()
        self.kind = cfg.kind
        reads = model_reads(cfg)
        table_device = table_device if table_device is not None else device
        self.wide = WideArch(list(reads.wide_features), num_embeddings, table_device, cfg.pooling) if reads.wide else None
        self.deep = (
            DeepArch(cfg.deep, num_embeddings, dense_dim if reads.dense else 0, cfg.embedding_backend, device,
                     table_device, cfg.pooling)
            if reads.deep else None
        )
        # The bias: the wide part's bias row when there is one, else a parameter of its own.
        self.bias = nn.Parameter(torch.zeros(1, device=device)) if self.wide is None else None

    def forward(self, batch: Batch) -> Tensor:
        if self.wide is None:
            return self.bias + self.deep(batch)
        logit = self.wide(batch)
        if self.deep is not None:
            logit = logit + self.deep(batch)
        return logit

    def parts(self) -> dict[str, Part]:
        """The one wide/deep split: the GLM (wide tables and their bias row) and the deep part."""
        wide, deep = Part(), Part()
        if self.wide is not None:
            wide.tables.append(self.wide.embeddings)
        if self.deep is not None:
            deep.dense += list(self.deep.mlp.parameters())
            if isinstance(self.deep.embeddings, FusedEmbeddingBags):
                deep.tables += list(self.deep.embeddings.groups)
        if self.bias is not None:
            deep.dense.append(self.bias)
        return {"wide": wide, "deep": deep}

    def fused_groups(self) -> list[EmbeddingGroup]:
        return [g for p in self.parts().values() for g in p.tables]

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Deterministic initialisation, independent of backend, sharding and construction order.

        Wide tables start at zero (a linear model; FTRL starts there by definition), deep
        tables N(0, init_std) (PyTorch's N(0, 1) overfits badly here), Linear layers PyTorch's
        default U(+-1/sqrt(fan_in)), each tensor from its own generator (wdl.model.init).
        Only the embedding rows held by this process are written: TorchRec's sharded tables
        are filled shard by shard by the sharding module with the same function.
        """
        if self.bias is not None:
            self.bias.zero_()
        for g in self.fused_groups():
            g.reset_parameters(seed)
        if self.deep is None:
            return
        if isinstance(self.deep.embeddings, TorchRecEmbeddingBags):
            self.deep.embeddings.reset_parameters(seed)
        for i, m in enumerate(self.deep.mlp):
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                _uniform(m.weight, seed, f"deep.mlp.{i}.weight", bound)
                if m.bias is not None:
                    _uniform(m.bias, seed, f"deep.mlp.{i}.bias", bound)

    def table_specs(self) -> list[TableSpec]:
        """Every embedding table of the model, wide and deep."""
        specs = list(self.wide.embeddings.tables) if self.wide is not None else []
        if self.deep is not None and self.deep.embeddings is not None:
            emb = self.deep.embeddings
            specs += emb.tables if isinstance(emb, TorchRecEmbeddingBags) else [t for g in emb.groups for t in g.tables]
        return specs


def _device_type(x: Tensor) -> str:
    """x's device type; any for a torch.fx Proxy: TorchRec's train pipeline traces the model only to
    find its tables' inputs in the batch, and never runs the traced graph."""
    return "cpu" if isinstance(x, torch.fx.Proxy) else x.device.type


def _uniform(t: Tensor, seed: int, name: str, bound: float) -> None:
    # Drawn on CPU so every device gives the same numbers.
    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=generator(seed, name)))


class WideDeepTrain(nn.Module):
    """Owns the loss, as TorchRec's DLRMTrain does.

    forward: Batch -> (loss, (loss.detach(), logits.detach(), labels))
    """

    def __init__(self, model: WideDeep) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        logits = self.model(batch)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
