"""Our prepared split and features -> one .npz + meta.json that every peer script reads.

Everything the peers see comes out of our FeatureSpec: the same rows of the same split, the
same vocabulary ids, the same hashed crosses, the same normalised dense column. Multi-valued
keys (genres, crosses with genres) are padded to their longest row with ids shifted by one so
that 0 means padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wdl.config import Config
from wdl.data.dataset import feature_spec, load_table
from wdl.ingest.prepare import open_or_prepare


def export(cfg: Config, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    manifest = open_or_prepare(cfg.data)
    spec = feature_spec(cfg, manifest)
    arrays: dict[str, np.ndarray] = {}
    keys: dict[str, dict] = {}
    for split in (cfg.data.train_split, cfg.data.eval_split):
        table = load_table([f.path for f in manifest.split(split).files], spec)
        arrays[f"{split}/label"] = table.labels.numpy().astype(np.float32)
        arrays[f"{split}/dense"] = table.dense.numpy().astype(np.float32)
        for key, jag in table.sparse.items():
            values, lengths = jag.values.numpy(), jag.lengths.numpy()
            multi = bool((lengths != 1).any()) or keys.get(key, {}).get("multi", False)
            if multi:
                width = max(int(lengths.max()), 1)
                padded = np.zeros((len(lengths), width), dtype=np.int64)
                rows = np.repeat(np.arange(len(lengths)), lengths)
                cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                padded[rows, cols] = values + 1
                arrays[f"{split}/{key}"] = padded
            else:
                arrays[f"{split}/{key}"] = values.astype(np.int64)
            keys[key] = {"multi": multi, "num_embeddings": spec.num_embeddings(key) + (1 if multi else 0)}
    # A key multi-valued in one split only: pad the other split's column too.
    for key, k in keys.items():
        for split in (cfg.data.train_split, cfg.data.eval_split):
            a = arrays[f"{split}/{key}"]
            if k["multi"] and a.ndim == 1:
                arrays[f"{split}/{key}"] = (a + 1)[:, None]
    m = cfg.model
    meta = {
        "train": cfg.data.train_split, "eval": cfg.data.eval_split,
        "keys": keys,
        "wide": list(m.wide.features),
        "deep_embeddings": dict(m.deep.embeddings),
        "dense": [d.name for d in spec.dense],
        "hidden": list(m.deep.hidden), "dropout": m.deep.dropout, "init_std": m.deep.init_std,
        "batch_size": cfg.data.batch_size, "eval_batch_size": cfg.data.eval_batch_size,
        "lr": cfg.optim.deep.lr, "optimizer": cfg.optim.deep.name, "seed": cfg.run.seed,
        "rows": {s: int(len(arrays[f"{s}/label"])) for s in (cfg.data.train_split, cfg.data.eval_split)},
    }
    np.savez(out / "features.npz", **arrays)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out
