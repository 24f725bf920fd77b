"""Many processes under torchrun: joining the process group, sharding work, gathering results.

Everything here is PyTorch's distributed engine (torchrun's rendezvous, gloo on CPUs, NCCL on
GPUs, its collectives); this module only names the few patterns itmatch uses. Run alone (no
WORLD_SIZE in the environment), every function is the identity: one process of rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from itmatch.device import default_device


@dataclass
class Process:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_process_group() -> Process:
    """Joins torchrun's process group (gloo on CPUs, NCCL on GPUs) when started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = default_device()  # cuda:LOCAL_RANK under torchrun on GPUs
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Process(rank(), world_size(), device)


def leave_process_group() -> None:
    """Waits for every process, then leaves the group (a process exiting while another still
    talks to it can abort the other)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shard(count: int) -> slice:
    """This process's contiguous share of `count` items (shares differ by at most one)."""
    share, extra = divmod(count, world_size())
    start = rank() * share + min(rank(), extra)
    return slice(start, start + share + (rank() < extra))


@torch.no_grad()
def gather_shards(part: Tensor, dim: int = 0) -> Tensor:
    """Every process's `part` concatenated along `dim` in rank order (parts may differ in size
    along `dim` only); no gradient."""
    if world_size() == 1:
        return part
    part = part.movedim(dim, 0).contiguous()
    sizes = _all_sizes(part.shape[0], part.device)
    padded = pad_axis(part, 0, max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:size] for p, size in zip(parts, sizes, strict=True)]).movedim(0, dim)


def gather_with_grad(part: Tensor) -> Tensor:
    """Every process's `part` (all of the same shape) concatenated along the first axis, with the
    gradient of the whole flowing back to this process's part: its backward sums the gradients
    that every process computes for this part (a reduce-scatter, or all-to-all where the backend
    has none), as open_clip gathers features."""
    if world_size() == 1:
        return part
    return torch.cat(all_gather_with_grad(part.contiguous()))


def max_over_processes(value: int, device: torch.device) -> int:
    """The largest `value` of all processes."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, dist.ReduceOp.MAX)
    return int(tensor.item())


def _all_sizes(size: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([size], device=device))
    return [int(s.item()) for s in sizes]


def pad_axis(value: Tensor, axis: int, length: int) -> Tensor:
    """`value` padded with zeros (False) along `axis` to `length`."""
    spec = [0, 0] * (value.dim() - axis - 1) + [0, length - value.shape[axis]]
    return F.pad(value, spec)

