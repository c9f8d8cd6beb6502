"""The collectives the training code needs beyond DDP's, and DDP's options, in one place."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.train.shm_allreduce import ShmAllReduce, channel_for

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def no_forward_buffer_sync(ddp_class: type = DistributedDataParallel) -> dict[str, bool]:
    """The DDP keyword that stops the buffer broadcast before every forward (with several D
    forwards per backward that in-place broadcast breaks autograd, pytorch#22095; SyncBatchNorm
    keeps running statistics equal anyway): `forward_sync_buffers=False` from torch 2.13,
    which still syncs buffers once at init; `broadcast_buffers=False` before it, which does
    not, harmlessly, since every rank builds its buffers from the same seed. One answer for
    the Ray workers, the benchmarks and the tests."""
    known = inspect.signature(ddp_class.__init__).parameters
    if "forward_sync_buffers" in known:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _shared_memory_channel(tensor: torch.Tensor,
                           group: dist.ProcessGroup | None) -> ShmAllReduce | None:
    """The shared-memory channel that sums `tensor` over `group`, or None: the group's
    backend does (the same answer on every rank of `group`)."""
    channel = channel_for(group) if tensor.device.type == "cpu" else None
    return channel if channel is not None and channel.fits(tensor) else None


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum `tensor` over `group` (default: the world) in place: through shared memory when
    every rank of the group is on this machine (see `shm_allreduce`), else through the
    group's backend."""
    channel = _shared_memory_channel(tensor, group)
    if channel is not None:
        channel.all_reduce(tensor)
    else:
        dist.all_reduce(tensor, group=group)


class GradientAllReduce:
    """The average over the ranks of one model's gradients, done by hand instead of by DDP:
    `__call__` after the model's backward. Gradients are packed into flat buckets of at most
    `bucket_bytes` (by dtype, in reverse parameter order, as DDP does), each all-reduced once
    and copied back. Nothing here syncs the host or depends on Python state, so a CUDA graph
    can record it with the step (NCCL collectives can be captured; DDP's hooks cannot).

    The arithmetic is DDP's: through shared memory (CPU ranks on one machine) the sum then
    the division by the world size, as `shm_allreduce_hook`; otherwise each gradient is first
    scaled by 1/world size and then summed, as DDP's reducer does. A parameter without a
    gradient takes part with zeros (as one DDP marks unused)."""

    def __init__(self, params: Iterable[nn.Parameter], world_size: int,
                 group: dist.ProcessGroup | None = None, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = [param for param in params if param.requires_grad]
        self.world_size, self.group = world_size, group
        self.buckets: list[list[nn.Parameter]] = []
        filled = 0  # bytes in the last bucket
        for param in reversed(self.params):
            size = param.numel() * param.element_size()
            last = self.buckets[-1] if self.buckets else None
            if last is None or last[0].dtype != param.dtype or filled + size > bucket_bytes:
                self.buckets.append([param])
                filled = size
            else:
                last.append(param)
                filled += size

    @torch.no_grad()
    def __call__(self) -> None:
        """Replace every gradient of the model by its average over the ranks."""
        for bucket in self.buckets:
            grads = [param.grad if param.grad is not None else torch.zeros_like(param)
                     for param in bucket]
            flat = torch.cat([grad.reshape(-1) for grad in grads])
            channel = _shared_memory_channel(flat, self.group)
            if channel is not None:
                channel.all_reduce(flat)
                flat.div_(self.world_size)
            else:
                flat.mul_(1.0 / self.world_size)
                dist.all_reduce(flat, group=self.group)
            for param, grad, average in zip(bucket, grads, flat.split(
                    [grad.numel() for grad in grads]), strict=True):
                grad.copy_(average.view_as(grad))
                param.grad = grad


def all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's copy of `tensor` (equal shapes on all ranks), by rank, on the CPU.
    NCCL gathers CUDA tensors, gloo CPU ones; world size 1 needs no process group."""
    if world_size == 1:
        return [tensor.cpu()]
    local = tensor.cuda() if dist.get_backend() == "nccl" else tensor.cpu()
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [t.cpu() for t in gathered]


def all_gather_hex(text: str, world_size: int) -> list[str]:
    """Every rank's fixed-length hex string (ids, digests), gathered as bytes: no pickling."""
    local = torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)
    return [bytes(t.tolist()).hex() for t in all_gather(local, world_size)]
