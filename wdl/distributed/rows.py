"""wdl's own row-wise sharding of fused embedding groups, with plain torch.distributed.

Rank k of W holds the contiguous block of global rows [k*c, (k+1)*c) (c = ceil(rows / W)),
which is DTensor's Shard(0) layout: checkpoints carry the blocks as DTensors, and DCP
reshards them between world sizes. A training step moves only what the batch touches:

    forward   distinct ids -> their owners (all-to-all), owners gather rows -> back (all-to-all)
    step      row gradients -> owners (all-to-all), owners sum duplicates and update those rows

so memory per rank is O(rows / W) and communication O(distinct ids in the batch), with any
row optimiser (FTRL included, which FBGEMM lacks). The split sizes of each all-to-all must be
known on the host, so each look-up costs one small device-to-host copy; TorchRec's sharded
look-ups do the same.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wdl.errors import ConfigError


def block(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The global rows [lo, hi) rank `rank` holds."""
    chunk = math.ceil(num_rows / world_size) if num_rows else 0
    return min(rank * chunk, num_rows), min((rank + 1) * chunk, num_rows)


class ShardedRows(nn.Module):
    """A group's rows split over the ranks of `group` (see module docstring).

    weight: [hi - lo, dim], this rank's block; it takes no gradient.
    """

    def __init__(self, num_rows: int, dim: int, group: dist.ProcessGroup, device: torch.device) -> None:
        super().__init__()
        from torch.distributed.device_mesh import DeviceMesh

        self.num_rows, self.dim, self.group = num_rows, dim, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.chunk = max(1, math.ceil(num_rows / self.world_size))
        self.lo, self.hi = block(num_rows, self.world_size, self.rank)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, dim, device=device), requires_grad=False)
        self.mesh = DeviceMesh.from_group(group, device.type)
        self.register_state_dict_post_hook(_export_weight)
        self.register_load_state_dict_pre_hook(_import_weight)

    @property
    def row_range(self) -> tuple[int, int]:
        return self.lo, self.hi

    def table(self) -> None:
        return None  # rows elsewhere: always go through `pull`

    def pull(self, ids: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Rows of the distinct `ids`, fetched from their owners: (rows [U, dim], inv [N], ctx)."""
        uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)  # sorted: owners are contiguous
        send = torch.bincount(torch.div(uniq, self.chunk, rounding_mode="floor"), minlength=self.world_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_n, recv_n = torch.stack([send, recv]).tolist()  # one device-to-host copy for both
        wanted = uniq.new_empty(sum(recv_n))
        dist.all_to_all_single(wanted, uniq, recv_n, send_n, group=self.group)
        local = wanted - self.lo
        rows = self.weight.new_empty(uniq.numel(), self.dim)
        dist.all_to_all_single(rows, self.weight.index_select(0, local), send_n, recv_n, group=self.group)
        return rows, inv, (local, send_n, recv_n)

    def push(self, ctx: tuple, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Send each pulled row's gradient to its owner; returns (local rows, summed gradients)."""
        local, send_n, recv_n = ctx
        got = grad.new_empty(local.numel(), self.dim)
        dist.all_to_all_single(got, grad.contiguous(), recv_n, send_n, group=self.group)
        rows, inv = torch.unique(local, sorted=True, return_inverse=True)  # a row asked for by several ranks
        return rows, got.new_zeros(rows.numel(), self.dim).index_add_(0, inv, got)

    def export(self, t: Tensor):
        """This rank's block of a tensor shaped like the rows, as a DTensor of the global shape."""
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size([self.num_rows, *t.shape[1:]])
        return DTensor.from_local(t, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())


def _export_weight(module: ShardedRows, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + "weight"] = module.export(state_dict[prefix + "weight"])


def _import_weight(module: ShardedRows, state_dict: dict, prefix: str, *args) -> None:
    from torch.distributed.tensor import DTensor

    w = state_dict.get(prefix + "weight")
    if isinstance(w, DTensor):
        state_dict[prefix + "weight"] = w.to_local()


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on `device` (CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(need: int, detail: str, device: torch.device, world_size: int, sharing: int = 1) -> None:
    """Refuse, before allocating, tables that will not fit (keeping 10% headroom). sharing: the
    ranks that take their part from this same memory (on CPU, every rank on this host)."""
    have = available_bytes(device)
    if need * sharing > 0.9 * have:
        gib = 1 << 30
        here = f", {sharing} of them from this host's memory" if sharing > 1 else ""
        more = "more hosts" if sharing > 1 else "more ranks"
        raise ConfigError(
            f"the embedding tables need {need / gib:.2f} GiB per rank on {device} ({detail}) with {world_size} "
            f"rank(s){here}, but {have / gib:.2f} GiB is available; use {more}, fewer hash_buckets, smaller "
            "dims or a row-wise optimiser (optim.*.name=rowwise_adagrad keeps one float of state per row)"
        )
