"""Checkpoints with torch.distributed.checkpoint (DCP).

Everything stateful is saved by name: the (sharded) model, every optimiser (fused ones
included, with their step counters), the loader's read position, the epoch and step, and
each rank's RNG states. A checkpoint is written to `step-NNNNNNNN.tmp/` and renamed to
`step-NNNNNNNN/` by rank 0 only after every rank has finished, so a crash mid-save leaves
the previous checkpoint as the newest complete one. DCP stores shards with global offsets,
so a checkpoint saved by N processes loads into M: at an epoch boundary exactly; mid-epoch
only with the same N, because the read position is per rank (we refuse otherwise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from wdl.distributed.env import barrier
from wdl.errors import CheckpointError

PREFIX = "step-"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
             and (p / "meta.json").exists() and (p / ".metadata").exists()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(resume: str, default_folder: Path) -> Path:
    """`auto`: the newest complete checkpoint of this run; else a checkpoint folder, a
    checkpoints folder or a run folder."""
    if resume == "auto":
        where = default_folder
    else:
        where = Path(resume)
        if not where.exists():
            raise CheckpointError(f"--resume {resume}: no such folder")
        if (where / "meta.json").exists() and (where / ".metadata").exists():
            return where
        if (where / "checkpoints").is_dir():
            where = where / "checkpoints"
    found = complete_checkpoints(where)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {where} (looked for {PREFIX}*/ with meta.json and .metadata)")
    return found[-1]


class Checkpointer:
    """Saves and restores one training run.

    model_state / optim_state: callables returning the state dicts to save (and to load into);
    load_into: callable taking (model_sd, optim_sd) after DCP filled them in place.
    """

    def __init__(self, folder: Path, keep: int, rank: int, world_size: int, signature: dict[str, Any],
                 read_order: dict[str, Any] | None = None) -> None:
        self.folder, self.keep, self.rank, self.world_size = folder, keep, rank, world_size
        self.signature = signature  # what must match to load: tables, model shape
        # What fixes the order rows are read in (batch size, seed, ...): a mid-epoch read position
        # means something only when these agree.
        self.read_order = read_order or {}

    def save(self, app_state: dict[str, Any], progress: dict[str, int]) -> Path:
        final = self.folder / f"{PREFIX}{progress['step']:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save({**app_state, "progress": _encode(progress)}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            meta = {**progress, "world_size": self.world_size, "signature": self.signature, "read_order": self.read_order}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # same step saved twice (epoch end after a step save): replace
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, app_state: dict[str, Any], progress: dict[str, int]) -> dict[str, int]:
        """Fill `app_state` in place from `path`; returns the saved progress."""
        meta = json.loads((path / "meta.json").read_text())
        self._check_compatible(path, meta)
        state = {**app_state, "progress": _encode(progress)}
        dcp.load(state, checkpoint_id=str(path))
        rng = path / f"rng-rank{self.rank:05d}.pt"
        if rng.exists() and meta["world_size"] == self.world_size:
            _set_rng_state(torch.load(rng, weights_only=False))
        return dict(zip(PROGRESS_KEYS, state["progress"].tolist()))

    def _check_compatible(self, path: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("signature", {})
        for key in sorted(set(saved) | set(self.signature)):
            if saved.get(key) != self.signature.get(key):
                raise CheckpointError(
                    f"{path} comes from an incompatible config: {key} is {saved.get(key)} there, {self.signature.get(key)} now"
                )
        mid_epoch = meta.get("batches_done", 0) != 0
        saved_order = meta.get("read_order", {})
        for key in sorted(set(saved_order) | set(self.read_order)):
            if mid_epoch and saved_order.get(key) != self.read_order.get(key):
                raise CheckpointError(
                    f"{path} was saved mid-epoch with {key}={saved_order.get(key)}, and {key}={self.read_order.get(key)} now "
                    f"would repeat or skip rows of that epoch; resume with {key}={saved_order.get(key)} (epoch-end "
                    "checkpoints load with any value)"
                )
        if meta["world_size"] != self.world_size and mid_epoch:
            raise CheckpointError(
                f"{path} was saved mid-epoch by {meta['world_size']} processes; the read position is per rank, so it "
                f"resumes only with {meta['world_size']} processes (epoch-end checkpoints load with any number)"
            )


PROGRESS_KEYS = ("epoch", "step", "batches_done")


def _encode(progress: dict[str, int]) -> torch.Tensor:
    # A tensor, not a dict of ints: DCP handles tensors identically on every rank count.
    return torch.tensor([int(progress[k]) for k in PROGRESS_KEYS], dtype=torch.int64)


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
