"""Data-parallel helpers over ``torch.distributed`` (what ``torchrun`` sets up).

A ``World`` says which process this is: ``rank`` of ``size`` processes, and
``local_rank`` on its node. Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment,
or ``WORLD_SIZE=1``) it is ``SINGLE`` and every helper here is a no-op, so the same code
runs on one device without a process group.

Training is exactly data-parallel: every rank draws the *global* batch (indices,
timesteps, noise) from the same seeded generator and keeps its ``shard`` of it, so N
ranks with per-rank batch B/N follow the same trajectory as one process with batch B
(up to floating-point summation order). Sampling splits the work by batches: batch i
has its own seed (``derive_seed``), so the samples do not depend on the number of ranks.
"""

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddpm.errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` (``n`` divisible by ``size``)."""
        if n % self.size:
            raise InputError(f"global batch size {n} is not divisible by the {self.size} processes")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


SINGLE = World()


def world_from_env() -> World:
    """The world ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK (``SINGLE`` without it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise InputError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers: {e}") from None
    return World(rank, size, local) if size > 1 else SINGLE


@contextmanager
def process_group(device: torch.device):
    """Join the process group described by the environment (nccl on CUDA, gloo on CPU);
    yields ``(world, device)`` with the device narrowed to this rank's GPU, and leaves the
    group on exit."""
    world = world_from_env()
    if not world.is_distributed:
        yield world, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=world.rank, world_size=world.size,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """``model`` inside DistributedDataParallel when there are several ranks, else ``model``."""
    if not world.is_distributed:
        return model
    device = next(model.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Average ``tensor`` over the ranks, in place."""
    if world.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world.size
    return tensor


def any_(flag: bool, world: World, device) -> bool:
    """Whether ``flag`` holds on any rank (a collective: every rank calls it, and gets the same answer)."""
    if not world.is_distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj, world: World):
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not world.is_distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (``None`` elsewhere)."""
    if not world.is_distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a run seeded with ``seed`` (independent streams)."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
