"""Process environment: rank, world size, device and backend.

Under torchrun (WORLD_SIZE set) the process group is initialised; without it this is the
single-process debug mode, the same code path with world size 1.
"""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wdl.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # gloo or nccl; a 1-rank group in the single-process mode
    local_world_size: int = 1  # ranks on this host (they share its cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"run.device={spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"run.device={spec!r}: wdl trains on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={spec} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_spec: str = "auto", timeout_s: int = 1800) -> DistEnv:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # under torchrun
            dist.init_process_group(backend=backend, store=_attempt_store(), timeout=timedelta(seconds=timeout_s),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                    device_id=device if device.type == "cuda" else None)
        else:
            # The single-process debug mode runs the same code (TorchRec's sharding included)
            # on a 1-rank group; an in-process store needs no port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend,
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _attempt_store() -> dist.Store:
    """torchrun's store, under a prefix unique to this restart attempt.

    Measured here (torch 2.13, gloo): after torchrun restarts a group whose first attempt
    had created extra process groups (TorchRec and DCP do), the new attempt's gloo
    connectFullMesh reads a dead peer's address and fails ("Connection refused"). Keys
    scoped by TORCHELASTIC_RESTART_COUNT make every attempt rendezvous afresh.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"wdl/attempt_{attempt}", store)


def _alone() -> bool:
    """No other rank to talk to: no process group, or a group of one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def barrier() -> None:
    """A barrier across ranks; nothing to wait for with one process."""
    if not _alone():
        dist.barrier()


def comm_device() -> torch.device:
    """Where tensors must live for the current process group's collectives (NCCL: the GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor of any length from every rank, concatenated in rank order (on the CPU)."""
    if _alone():
        return t
    device = comm_device()
    t = t.to(device)
    n = torch.tensor([t.numel()], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=t.dtype, device=device)  # all_gather needs equal lengths
    padded[: t.numel()] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over ranks (on the CPU); `t` itself with one rank."""
    if _alone():
        return t
    t = t.to(comm_device())
    dist.all_reduce(t)
    return t.cpu()


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
