"""Checkpoints with torch.distributed.checkpoint (DCP).

Everything stateful is saved by name: the (sharded) model, every optimiser (fused ones
included, with their step counters), the loader's read position, the epoch and step, and
each rank's RNG states. A checkpoint is written to `step-NNNNNNNN.tmp/` and renamed to
`step-NNNNNNNN/` by rank 0 only after every rank has finished, so a crash mid-save leaves
the previous checkpoint as the newest complete one. The commit record (`meta.json`, written
last) lists every file of the checkpoint with its size and CRC-32, so a damaged or missing file
is found before anything loads: `--resume auto` skips such a checkpoint (with a warning) for the
newest good one, an explicit path is refused. Loading reads data only (docs/trust.md): DCP's
pickled `.metadata` goes through an allow-list of torch's metadata classes, non-tensor values
load with `weights_only=True`, and the RNG states are JSON. DCP stores shards with global offsets,
so a checkpoint saved by N processes loads into M: at an epoch boundary exactly; mid-epoch
only with the same N, because the read position is per rank (we refuse otherwise).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import pathlib
import pickle
import random
import shutil
import sys
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint.planner as dcp_planner
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from wdl.distributed.env import barrier
from wdl.errors import CheckpointError, first_line

PREFIX = "step-"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
             and (p / "meta.json").exists() and (p / ".metadata").exists()]
    return sorted(found, key=lambda p: p.name)


def newest_good_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` that passes its checks; damaged ones are
    skipped with a warning on stderr."""
    for path in reversed(complete_checkpoints(folder)):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        print(f"wdl: warning: skipping damaged checkpoint {path}: {damage}", file=sys.stderr, flush=True)
    return None


def find_checkpoint(resume: str, default_folder: Path) -> Path:
    """`auto`: the newest good checkpoint of this run; else a checkpoint folder (which must be
    intact), or a checkpoints folder or a run folder (its newest good checkpoint)."""
    if resume == "auto":
        where = default_folder
    else:
        where = Path(resume)
        if not where.exists():
            raise CheckpointError(f"--resume {resume}: no such folder")
        if (where / "meta.json").exists() or (where / ".metadata").exists():
            damage = checkpoint_damage(where)
            if damage is not None:
                raise CheckpointError(f"checkpoint {where} is damaged ({damage}); resume from an earlier one "
                                      f"(--resume {where.parent} picks the newest good one)")
            return where
        if (where / "checkpoints").is_dir():
            where = where / "checkpoints"
    found = newest_good_checkpoint(where)
    if found is None:
        what = "complete" if not complete_checkpoints(where) else "undamaged"
        raise CheckpointError(f"no {what} checkpoint in {where} (looked for {PREFIX}*/ with meta.json and .metadata)")
    return found


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file listed in its
    commit record is there with the recorded size and CRC-32."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({type(e).__name__})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return "meta.json lists no files (not written by this version of wdl, or damaged)"
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, {want.get('bytes')} were written"
        if _crc32(f) != want.get("crc32"):
            return f"{name} does not match its checksum"
    return None


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _describe(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {p.name: {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in paths}


class Checkpointer:
    """Saves and restores one training run: `save(app_state, progress)` writes the state dicts
    in `app_state` (model, optimisers, ...) with the progress counters; `load` fills the same
    structure in place."""

    def __init__(self, folder: Path, keep: int, rank: int, world_size: int, signature: dict[str, Any],
                 read_order: dict[str, Any] | None = None) -> None:
        self.folder, self.keep, self.rank, self.world_size = folder, keep, rank, world_size
        self.signature = signature  # what must match to load: tables, model shape
        # What fixes the order rows are read in (batch size, seed, ...): a mid-epoch read position
        # means something only when these agree.
        self.read_order = read_order or {}

    def clear_unfinished(self) -> None:
        """Remove saves cut short by a kill or Ctrl-C (never loadable, only clutter). Only for the
        run that owns the folder: a reader (predict, export) would delete a live run's save."""
        if self.rank == 0 and self.folder.is_dir():
            for stale in self.folder.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def set_aside_after(self, step: int) -> list[str]:
        """Move the checkpoints saved after `step` (the steps and `best`) into
        abandoned-after-step-<step>/: a run continued from an older checkpoint takes another
        course, and its `--resume auto`, `keep` and test score must not pick up the old one's.
        Rank 0 only (the folder's owner); returns the names moved."""
        if self.rank != 0 or not self.folder.is_dir():
            return []
        later = [p for p in self.folder.iterdir() if p.is_dir() and (p.name.startswith(PREFIX) or p.name == "best")
                 and (p / "meta.json").exists() and _saved_step(p) > step]
        if later:
            aside = self.folder / f"abandoned-after-step-{step:08d}"
            aside.mkdir(exist_ok=True)
            for p in later:
                shutil.rmtree(aside / p.name, ignore_errors=True)
                p.rename(aside / p.name)
        return sorted(p.name for p in later)

    def save(self, app_state: dict[str, Any], progress: dict[str, int], name: str | None = None) -> Path:
        """Save as step-<step> (the newest `keep` are kept), or as `name` (e.g. best), replacing it.
        A write that fails (disk full, read-only, folder gone) is one CheckpointError saying what
        is still safe; Ctrl-C or SIGTERM inside DCP's write comes out as the KeyboardInterrupt it was."""
        final = self.folder / (name or f"{PREFIX}{progress['step']:08d}")
        tmp = final.with_name(final.name + ".tmp")
        try:
            return self._save(app_state, progress, final, tmp)
        except (OSError, CheckpointException) as e:
            cause = _cause(e)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # never loadable; on a full disk, the space back
            if isinstance(cause, OSError):
                raise CheckpointError(self._failed_line(final, cause)) from None
            raise cause from None

    def _failed_line(self, final: Path, e: OSError) -> str:
        where = f"{e.filename}: " if e.filename else ""
        if not self.folder.is_dir():
            safe = f"{self.folder} is gone, and with it this run's checkpoints"
        elif good := complete_checkpoints(self.folder):
            safe = f"the last checkpoint, {good[-1]}, is untouched (--resume auto continues from it)"
        else:
            safe = "no earlier checkpoint of this run exists"
        return f"cannot write checkpoint {final} ({where}{e.strerror or first_line(e)}); {safe}"

    def _save(self, app_state: dict[str, Any], progress: dict[str, int], final: Path, tmp: Path) -> Path:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()  # not parents=True: a run folder deleted under a live run is not recreated
        barrier()
        dcp.save({**app_state, "progress": _encode(progress)}, checkpoint_id=str(tmp))
        rng = tmp / _rng_file(self.rank)
        rng.write_text(json.dumps(_rng_state()))
        # Each rank checksums what it wrote (DCP names a rank's files __<rank>_*), rank 0 the rest.
        mine = _describe(sorted(tmp.glob(f"__{self.rank}_*")) + [rng])
        files = _gather_dicts(mine, self.world_size)
        if self.rank == 0:
            files |= _describe([p for p in sorted(tmp.iterdir()) if p.name not in files and p.is_file()])
            meta = {**progress, "world_size": self.world_size, "signature": self.signature,
                    "read_order": self.read_order, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            # Replacing (a named checkpoint, or a step saved twice): the old one stays until the new
            # one is in place, so a crash in between leaves one of them under .old.
            old = final.with_name(final.name + ".old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, app_state: dict[str, Any], progress: dict[str, int]) -> dict[str, int]:
        """Fill `app_state` in place from `path`; returns the saved progress."""
        meta = json.loads((path / "meta.json").read_text())
        self._check_compatible(path, meta)
        if (path / f"rng-rank{self.rank:05d}.pt").exists():
            raise CheckpointError(f"{path} holds its random state pickled (rng-rank{self.rank:05d}.pt, an older wdl), "
                                  "which wdl no longer unpickles; it cannot be resumed (wdl predict and wdl export still "
                                  "read its weights)")
        state = {**app_state, "progress": _encode(progress)}
        _dcp_load(path, state)
        rng = path / _rng_file(self.rank)
        if rng.exists() and meta["world_size"] == self.world_size:
            _set_rng_state(rng)
        return dict(zip(PROGRESS_KEYS, state["progress"].tolist()))

    def load_weights(self, path: Path, app_state: dict[str, Any]) -> dict[str, Any]:
        """Fill only `app_state` (e.g. {"model": ...}) from `path`, for using a trained model:
        no progress, RNG or read position. Returns the checkpoint's meta.json."""
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointError(f"checkpoint {path} is damaged ({damage})")
        meta = json.loads((path / "meta.json").read_text())
        self._check_signature(path, meta)
        _dcp_load(path, app_state)
        return meta

    def _check_signature(self, path: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("signature", {})
        for key in sorted(set(saved) | set(self.signature)):
            if saved.get(key) != self.signature.get(key):
                raise CheckpointError(
                    f"{path} comes from an incompatible config: {key} is {saved.get(key)} there, {self.signature.get(key)} now"
                )

    def _check_compatible(self, path: Path, meta: dict[str, Any]) -> None:
        self._check_signature(path, meta)
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


def _dcp_load(path: Path, state: dict[str, Any]) -> None:
    read_metadata(path / ".metadata")  # a foreign pickle is refused here, in one line, before DCP runs
    try:
        dcp.load(state, storage_reader=_MetadataReader(path), planner=_DataOnlyPlanner())
    except (Exception, CheckpointException) as e:  # DCP's errors hold a traceback per rank: keep their first line
        cause = _cause(e)
        if isinstance(cause, (CheckpointError, KeyboardInterrupt)):
            raise cause from None
        raise CheckpointError(f"{path} does not load into this model: {first_line(cause)}") from None


def _cause(e: BaseException) -> BaseException:
    """What went wrong inside DCP: it wraps every rank's exception (Ctrl-C included) in a
    CheckpointException; the first rank's own exception."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _saved_step(path: Path) -> int:
    """A checkpoint's step: from its name (step-N), else its meta.json; one whose meta.json cannot
    be read counts as later than any (it cannot be trusted to be earlier)."""
    if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
        return int(path.name[len(PREFIX):])
    try:
        return int(json.loads((path / "meta.json").read_text()).get("step"))
    except (OSError, ValueError, TypeError, AttributeError):
        return sys.maxsize


# --- reading data only (docs/trust.md) ------------------------------------------------------

def _torch_metadata_classes() -> dict[tuple[str, str], Any]:
    """The dataclasses and enums torch defines for DCP's `.metadata`, and the few torch and
    standard types their fields hold: all an unpickled `.metadata` may name."""
    allowed: dict[tuple[str, str], Any] = {}
    for module in (dcp_metadata, dcp_planner, dcp_filesystem):
        for name, obj in vars(module).items():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                allowed[(module.__name__, name)] = obj
    for obj in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", obj.__name__)] = obj
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> torch.strided etc.
    allowed |= {("torch", name): obj for name, obj in vars(torch).items() if isinstance(obj, (torch.dtype, torch.layout))}
    return allowed


_METADATA_CLASSES = _torch_metadata_classes()


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _METADATA_CLASSES.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's `.metadata` (a pickle torch writes), unpickled through an allow-list: a file naming
    any other class or function (what a crafted pickle runs code with) is refused."""
    try:
        with path.open("rb") as f:
            meta = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path} names {e}, which is not checkpoint metadata: refused (wdl loads only data "
                              "from checkpoints; see docs/trust.md)") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is not readable checkpoint metadata ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(meta, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(meta).__name__}, not checkpoint metadata")
    return meta


class _MetadataReader(FileSystemReader):
    """DCP's file reader with `.metadata` read through the allow-list (tensors it already loads
    with weights_only=True)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        meta = read_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _DataOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, but a non-tensor value (an optimiser's step count, a learning rate) is
    unpickled with weights_only=True: plain data, never an arbitrary object (DCP uses False)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"value {read_item.dest_index.fqn!r} of the checkpoint is not plain data "
                                  f"({first_line(e)}): refused (see docs/trust.md)") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _gather_dicts(mine: dict[str, Any], world_size: int) -> dict[str, Any]:
    if world_size == 1:
        return dict(mine)
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def _rng_state() -> dict[str, Any]:
    """This process's random states as JSON: Python's and NumPy's Mersenne Twister as lists of
    ints, torch's generator states as their bytes in base64."""
    version, words, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(words), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def _set_rng_state(path: Path) -> None:
    try:
        state = json.loads(path.read_text())
        py, npy = state["python"], state["numpy"]
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), tuple(int(w) for w in py["state"]),
                         None if gauss is None else float(gauss)))
        np.random.set_state((str(npy["kind"]), np.array(npy["key"], dtype=np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached_gaussian"])))
        torch.set_rng_state(_bytes_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path} is not a random state wdl wrote ({type(e).__name__}: {first_line(e)})") from None
