"""Deterministic initial values that any shard can compute on its own.

Embedding tables may be far larger than one host and are only ever materialised shard by
shard (TorchRec's sharded tables, or wdl's row-sharded ones). So an element's initial value
is a pure function of (seed, table name, row, column): a counter-based generator (the
splitmix64 finaliser over the element's global index, then Box-Muller), computed in torch
on whatever block of rows and columns a rank holds. Any sharding, world size or backend
gives every element the same value, and no rank ever needs the whole table.

Dense layers are small: each draws from its own torch.Generator seeded by (seed, name).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); multiplication wraps.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_CHUNK = 1 << 20  # elements generated at a time: bounds the float64 scratch memory


def name_key(seed: int, name: str) -> int:
    """A 63-bit key for (seed, name), stable across processes and versions."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")
    return h & (2**63 - 1)


def generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(name_key(seed, name))


def _lsr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: Tensor) -> Tensor:
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def _unit(h: Tensor) -> Tensor:
    """Uniform in (0, 1] from the top 53 bits."""
    return (_lsr(h, 11) + 1).to(torch.float64) * (1.0 / (1 << 53))


@torch.no_grad()
def normal_block(out: Tensor, seed: int, name: str, std: float, row0: int, col0: int, dim: int) -> Tensor:
    """Fill `out` [rows, cols] with N(0, std) values of table `name` (width `dim`) at global
    rows [row0, row0 + rows) and columns [col0, col0 + cols); std 0 gives zeros."""
    if out.numel() == 0:
        return out
    if std == 0.0:
        return out.zero_()
    rows, cols = out.shape
    key = name_key(seed, name)
    step = max(1, _CHUNK // max(cols, 1))
    col_idx = torch.arange(col0, col0 + cols, dtype=torch.int64, device=out.device)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        row_idx = torch.arange(row0 + r, row0 + r + n, dtype=torch.int64, device=out.device)
        idx = row_idx.unsqueeze(1) * dim + col_idx  # global element index
        h1 = _mix(idx ^ key)
        h2 = _mix(h1)
        z = torch.sqrt(-2.0 * torch.log(_unit(h1))) * torch.cos((2.0 * math.pi) * _unit(h2))
        out[r:r + n].copy_(z * std)
    return out
