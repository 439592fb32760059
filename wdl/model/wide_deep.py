"""Wide & Deep (Cheng et al., 2016). Knows nothing of ranks, devices or data files.

    logit = wide(x) + deep(x) + b          p = sigmoid(logit)

wide: a generalised linear model over raw sparse features and hashed crosses, i.e. one
      embedding table of dimension 1 per feature, sum-pooled and summed.
deep: embeddings (sum-pooled for multi-hot) concatenated with dense features, then an MLP
      with ReLU ending in one unit.
Both parts are trained jointly through one loss (never as an ensemble).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from wdl.config import ModelConfig
from wdl.data.batch import Batch
from wdl.model.embeddings import TableSpec, build_embedding_bags


class ByteDropout(nn.Module):
    """Inverted dropout whose keep-mask comes from random bytes.

    torch's CPU dropout draws one Bernoulli sample per element: 3.4 ms for a 1024 x 256
    activation on this 2-core machine, about a third of a MovieLens training step. One random
    byte per element (8 from each 64-bit draw) costs 0.1 ms. p is rounded to a multiple of
    1/256 (0.5 is exact).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 256)  # an element is dropped when its byte < threshold
        self.keep = 1.0 - self.threshold / 256

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = words.view(torch.uint8)[: x.numel()].view(x.shape) >= self.threshold
        return x * keep * (1.0 / self.keep)

    def extra_repr(self) -> str:
        return f"p={self.threshold / 256}"


class WideArch(nn.Module):
    """Sparse linear part.

    forward: Batch -> [B] logits (no bias; WideDeep owns it)
    """

    def __init__(self, features: list[str], num_embeddings: dict[str, int], backend: str,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = build_embedding_bags(
            [TableSpec(f, num_embeddings[f], 1, f"wide_{f}") for f in features], backend, device
        )

    def forward(self, batch: Batch) -> Tensor:
        pooled = self.embeddings(batch)  # feature -> [B, 1]
        return torch.cat(list(pooled.values()), dim=1).sum(dim=1)


class DeepArch(nn.Module):
    """Embeddings + dense features -> MLP(ReLU) -> one unit.

    forward: Batch -> [B] logits
    """

    def __init__(self, embedding_dims: dict[str, int], num_embeddings: dict[str, int], dense_dim: int,
                 hidden: list[int], dropout: float, backend: str, device: torch.device | None = None) -> None:
        super().__init__()
        self.features = list(embedding_dims)
        self.embeddings = (
            build_embedding_bags([TableSpec(f, num_embeddings[f], d, f"deep_{f}") for f, d in embedding_dims.items()], backend, device)
            if embedding_dims else None
        )
        layers: list[nn.Module] = []
        width = sum(embedding_dims.values()) + dense_dim
        for h in hidden:
            layers += [nn.Linear(width, h, device=device), nn.ReLU()]
            if dropout > 0:
                layers.append(ByteDropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1, bias=False, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: Batch) -> Tensor:
        parts = []
        if self.embeddings is not None:
            pooled = self.embeddings(batch)
            parts += [pooled[f] for f in self.features]
        if batch.dense.shape[1]:
            parts.append(batch.dense)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)


class WideDeep(nn.Module):
    """`kind` picks the ablation: wide_deep, wide or deep.

    forward: Batch -> [B] logits
    """

    def __init__(self, cfg: ModelConfig, num_embeddings: dict[str, int], dense_dim: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.wide = (
            WideArch(cfg.wide.features, num_embeddings, cfg.embedding_backend, device)
            if cfg.kind in ("wide_deep", "wide") else None
        )
        self.deep = (
            DeepArch(cfg.deep.embeddings, num_embeddings, dense_dim if cfg.deep.dense else 0, cfg.deep.hidden,
                     cfg.deep.dropout, cfg.embedding_backend, device)
            if cfg.kind in ("wide_deep", "deep") else None
        )
        self.bias = nn.Parameter(torch.zeros(1, device=device))
        self.init_std = cfg.deep.init_std

    def forward(self, batch: Batch) -> Tensor:
        logit = self.bias.expand(len(batch))
        if self.wide is not None:
            logit = logit + self.wide(batch)
        if self.deep is not None:
            logit = logit + self.deep(batch)
        return logit

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser: the GLM part (wide tables and the bias) and the deep part."""
        wide = list(self.wide.parameters()) if self.wide is not None else []
        deep = list(self.deep.parameters()) if self.deep is not None else []
        (wide if self.wide is not None else deep).append(self.bias)
        return {"wide": wide, "deep": deep}

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Deterministic initialisation, independent of backend and construction order.

        Each tensor draws from its own generator seeded by (seed, its backend-neutral name):
        wide tables start at zero (a linear model; FTRL starts there by definition), deep
        tables N(0, init_std) (PyTorch's N(0, 1) overfits badly here), Linear layers
        PyTorch's default U(+-1/sqrt(fan_in)).
        """

        def gen(name: str) -> torch.Generator:
            h = int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")
            return torch.Generator().manual_seed(h & (2**63 - 1))

        def fill(t: Tensor, name: str, kind: str, scale: float) -> None:
            # Drawn on CPU so every device gives the same numbers.
            cpu = torch.empty(t.shape, dtype=t.dtype)
            if kind == "normal":
                cpu.normal_(0.0, scale, generator=gen(name))
            else:
                cpu.uniform_(-scale, scale, generator=gen(name))
            t.copy_(cpu)

        self.bias.zero_()
        if self.wide is not None:
            for w in self.wide.embeddings.weights().values():
                w.zero_()
        if self.deep is not None:
            if self.deep.embeddings is not None:
                for f, w in self.deep.embeddings.weights().items():
                    fill(w, f"deep.embedding.{f}", "normal", self.init_std)
            for i, m in enumerate(self.deep.mlp):
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    fill(m.weight, f"deep.mlp.{i}.weight", "uniform", bound)
                    if m.bias is not None:
                        fill(m.bias, f"deep.mlp.{i}.bias", "uniform", bound)


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
