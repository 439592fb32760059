"""Embedding-bag backends: TorchRec's EmbeddingBagCollection or plain nn.EmbeddingBag.

Both map a Batch's sparse features to one sum-pooled vector per feature and expose each
table's weight by feature name, so initialisation (and hence results) are the same for the
same seed whichever backend runs. TorchRec's collection can be built on the `meta` device
and sharded later by `wdl.distributed.sharding` without this module knowing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wdl.data.batch import Batch


@dataclass(frozen=True)
class TableSpec:
    """One embedding table reading one feature; `name` is unique across the model."""

    feature: str
    num_embeddings: int
    dim: int
    name: str


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


class TorchEmbeddingBags(nn.Module):
    """Pure-PyTorch backend: one nn.EmbeddingBag(mode="sum") per feature.

    forward: Batch -> {feature: [B, dim]}
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None) -> None:
        super().__init__()
        self.features = [t.feature for t in tables]
        self.bags = nn.ModuleDict(
            {t.feature: nn.EmbeddingBag(t.num_embeddings, t.dim, mode="sum", device=device) for t in tables}
        )

    def weights(self) -> dict[str, Tensor]:
        return {f: self.bags[f].weight for f in self.features}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = {}
        for f in self.features:
            j = batch.sparse[f]
            out[f] = self.bags[f](j.values, j.offsets())
        return out


class TorchRecEmbeddingBags(nn.Module):
    """TorchRec backend: one EmbeddingBagCollection with a table per feature.

    forward: Batch -> {feature: [B, dim]}
    """

    def __init__(self, tables: list[TableSpec], device: torch.device | None = None) -> None:
        super().__init__()
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        self.features = [t.feature for t in tables]
        self.table_names = [t.name for t in tables]
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    embedding_dim=t.dim,
                    num_embeddings=t.num_embeddings,
                    feature_names=[t.feature],
                    pooling=PoolingType.SUM,
                )
                for t in tables
            ],
            device=device,
        )

    def weights(self) -> dict[str, Tensor]:
        bags = self.ebc.embedding_bags
        return {f: bags[n].weight for f, n in zip(self.features, self.table_names)}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.ebc(batch.kjt(self.features)).to_dict()


def build_embedding_bags(tables: list[TableSpec], backend: str, device: torch.device | None = None) -> nn.Module:
    if resolve_backend(backend) == "torchrec":
        return TorchRecEmbeddingBags(tables, device)
    return TorchEmbeddingBags(tables, device)
