"""The one description of a model's embedding tables: which features `model.kind` reads, and
each table's name, rows, dim and bytes per row (weights + optimiser state).

The model builds its tables from it, placement and `wdl plan` size them with it, checkpoints
check against it and the benchmarks count memory with it. It imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # wdl.config imports the config checks, which read this module
    from wdl.config import Config, ModelConfig, OptimizerConfig
    from wdl.data.features import FeatureSpec

# Optimiser state per row, in floats, for a row of `dim`: what wdl's row rules
# (wdl.train.sparse_optim) and FBGEMM's fused optimisers allocate (a test holds the rules to it).
STATE_FLOATS = {
    "sgd": lambda dim: 0,
    "adagrad": lambda dim: dim,  # the sum of squared gradients
    "rowwise_adagrad": lambda dim: 1,  # one sum per row
    "adam": lambda dim: 2 * dim,  # both moments (the step count is one scalar per table)
    "ftrl": lambda dim: 2 * dim,  # z and n
}
WEIGHT_BYTES = {"fp32": 4, "fp16": 2}
LOCAL_SCRATCH_BYTES = 4  # per row, one process's dedupe scratch (wdl.model.embeddings.LocalRows)


@dataclass(frozen=True)
class Reads:
    """What a model of `kind` reads: the parts it has and the features each part takes."""

    wide: bool
    deep: bool
    wide_features: tuple[str, ...]
    deep_embeddings: dict[str, int]  # feature -> embedding dim
    dense: tuple[str, ...]

    @property
    def sparse(self) -> list[str]:
        """Every sparse feature read, wide ones first, each once."""
        return list(dict.fromkeys([*self.wide_features, *self.deep_embeddings]))


def model_reads(m: ModelConfig) -> Reads:
    wide, deep = m.kind in ("wide_deep", "wide"), m.kind in ("wide_deep", "deep")
    return Reads(wide, deep, tuple(m.wide.features) if wide else (), dict(m.deep.embeddings) if deep else {},
                 tuple(m.deep.dense) if deep else ())


def state_bytes(opt: OptimizerConfig, dim: int) -> int:
    """Bytes of optimiser state for one row of `dim` floats (and its touch count, for a row prior
    outside FTRL: wdl.train.sparse_optim)."""
    return 4 * (STATE_FLOATS[opt.name](dim) + (opt.name != "ftrl" and opt.l2 > 0))


@dataclass(frozen=True)
class Table:
    """One embedding table. owner: "wdl" (a fused group that wdl splits row-wise) or "torchrec"."""

    name: str  # wide_<feature> / deep_<feature>: the model's, TorchRec's and the checkpoint's name
    feature: str
    part: str  # "wide" or "deep": which optimiser trains it (cfg.optim.<part>)
    rows: int
    dim: int
    owner: str
    weight_bytes: int  # per row
    state_bytes: int  # per row

    @property
    def bytes_per_row(self) -> int:
        return self.weight_bytes + self.state_bytes

    @property
    def bytes(self) -> int:
        return self.rows * self.bytes_per_row


def tables(cfg: Config, spec: FeatureSpec | dict[str, int], backend: str, dtype: str = "fp32") -> list[Table]:
    """The model's tables, wide then deep. spec: the feature spec, or rows per feature; backend:
    the resolved embedding backend ("torch" or "torchrec"); dtype: TorchRec tables' weights
    (wdl's fused tables are fp32)."""
    rows = spec if isinstance(spec, dict) else {k: spec.num_embeddings(k) for k in spec.sparse_keys}
    r = model_reads(cfg.model)
    out = [Table(f"wide_{f}", f, "wide", rows[f], 1, "wdl", 4, state_bytes(cfg.optim.wide, 1))
           for f in r.wide_features]
    owner = "torchrec" if backend == "torchrec" else "wdl"
    elt = WEIGHT_BYTES[dtype] if owner == "torchrec" else 4
    return out + [Table(f"deep_{f}", f, "deep", rows[f], d, owner, elt * d, state_bytes(cfg.optim.deep, d))
                  for f, d in r.deep_embeddings.items()]
