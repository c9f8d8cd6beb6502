"""The collectives the training code needs beyond DDP's, and DDP's options, in one place."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
