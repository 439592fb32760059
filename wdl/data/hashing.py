"""The one definition of wdl's hashes: numpy and pyarrow only, never torch.

Ids written to disk (Criteo `--hash-buckets`, the synthetic generator's planted values, the
import's random split and samples) and ids computed at training time (`hash_buckets` columns,
crosses) all come from here, so a change shows in the pinned-value test (tests/test_features.py).
Preparation and generation import this in their worker processes: keeping torch out keeps
their start-up cheap.

splitmix64's finaliser: cheap, vectorises in numpy (uint64 wraps), mixes well enough that
`% buckets` is uniform. Stable across processes and versions, unlike Python's hash().
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (other integer types are reinterpreted)."""
    x = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def unit_uniform(x: np.ndarray) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from uint64 keys."""
    return (mix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_ids(values: np.ndarray, buckets: int) -> np.ndarray:
    """int64 ids in [0, buckets) for integer raw values."""
    return (mix64(values.astype(np.int64).view(np.uint64)) % np.uint64(buckets)).astype(np.int64)


def hash_strings(arr: pa.Array, buckets: int) -> np.ndarray:
    """Hash a string column: only the distinct values go through Python (dictionary encoding).
    Nulls hash like the empty string."""
    arr = pc.fill_null(arr, "")
    enc = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) else pc.dictionary_encode(arr)
    uniq = enc.dictionary.to_pylist()
    digests = np.array(
        [int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little") for u in uniq],
        dtype=np.uint64,
    )
    h = digests[enc.indices.to_numpy(zero_copy_only=False)] if len(uniq) else np.zeros(len(arr), np.uint64)
    return (h % np.uint64(buckets)).astype(np.int64)


def cross_salt(name: str) -> int:
    """A cross's salt, from its name: crosses of the same columns under other names differ."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def cross_ids(parts: list[np.ndarray], buckets: int, salt: int) -> np.ndarray:
    """hash(v_1, ..., v_n) % buckets for aligned int64 id arrays (TF crossed_column style)."""
    h = np.full(parts[0].shape, np.uint64(salt))
    for p in parts:
        h = mix64(h ^ mix64(p.astype(np.int64).view(np.uint64)))
    return (h % np.uint64(buckets)).astype(np.int64)
