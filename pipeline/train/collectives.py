"""The collectives the training code needs beyond DDP's, in one place."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
