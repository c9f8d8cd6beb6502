"""All-reduce through shared memory, for CPU ranks that share one machine.

Why: SyncBatchNorm makes ~20 tiny all-reduces per DCGAN step, each a rendezvous of all ranks.
Over gloo's TCP loopback one costs ~950 us on the 2-core VM this project is built on (a
blocked thread wakes through the kernel and, in a VM, a halted vCPU), 5.5 us through shared
memory with a spin wait (`python -m benchmarks.cpu_split`, BENCHMARKS.md "CPU pace"). The
step's compute is unchanged; the waiting disappears.

How: each rank owns one slot per parity in a shared segment. Collective number `seq` uses
parity `seq % 2`: a rank writes its tensor into its slot, then `seq` into its flag, spins until
every flag holds `seq`, and sums the slots in rank order, so every rank computes the same
bits. A slot of parity p is written again only at `seq + 2`, after every rank has published
`seq + 1`, i.e. after all of them finished reading `seq`. Stores become visible in program
order on x86-64 (total store order), so this runs there only; elsewhere, and for ranks on
different machines, callers get gloo (`ShmAllReduce.create` returns None).
"""

from __future__ import annotations

import _posixshmem
import hashlib
import os
import platform
import secrets
import socket
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist

SLOT_VALUES = 1 << 16  # float64 values per slot (512 KiB): SyncBN needs 2C+1 <= 2,049;
# gradient buckets go through a slot at a time
SPINS_BEFORE_YIELD = 2000  # then yield the core on every check (more ranks than cores)
TIMEOUT_S = 1800.0  # as gloo's default: a rank that never arrives is an error, not a hang
_NAME_BYTES = 16


class ShmAllReduce:
    """Sum-all-reduce of small float tensors among the ranks of one machine (summed in
    float64, in rank order: for two float32 ranks that is exactly float32 addition)."""

    def __init__(self, segment: shared_memory.SharedMemory, rank: int, world_size: int) -> None:
        self.segment, self.rank, self.world_size = segment, rank, world_size
        values = 2 * world_size * SLOT_VALUES
        self.slots = np.ndarray((2, world_size, SLOT_VALUES), np.float64, segment.buf)
        self.flags = np.ndarray((2, world_size), np.int64, segment.buf, offset=values * 8)
        self.seq = 0

    @staticmethod
    def segment_bytes(world_size: int) -> int:
        return 2 * world_size * (SLOT_VALUES * 8 + 8)

    @classmethod
    def create(cls, group: dist.ProcessGroup | None = None) -> ShmAllReduce | None:
        """A channel for every rank of `group`, or None where it cannot serve (not x86-64,
        ranks on several machines). Collective: every rank of the group must call it."""
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        same_machine = _all_equal(_host_digest(), group)
        if platform.machine() not in ("x86_64", "AMD64") or not same_machine:
            return None
        name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
        if rank == 0:
            name = torch.frombuffer(bytearray(secrets.token_bytes(_NAME_BYTES // 2).hex(),
                                              "ascii"), dtype=torch.uint8).clone()
        dist.broadcast(name, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        segment_name = "dcgan_" + bytes(name.tolist()).decode("ascii")
        if rank == 0:
            segment = shared_memory.SharedMemory(segment_name, create=True,
                                                 size=cls.segment_bytes(world_size))
            _untrack(segment)
            np.ndarray((2, world_size), np.int64, segment.buf,
                       offset=2 * world_size * SLOT_VALUES * 8).fill(-1)
        dist.barrier(group=group)
        if rank != 0:
            segment = _attach(segment_name)
        # Same host name but another /dev/shm (containers): then every rank uses gloo.
        attached = torch.tensor([segment is not None], dtype=torch.int32)
        dist.all_reduce(attached, op=dist.ReduceOp.MIN, group=group)
        if rank == 0:
            _posixshmem.shm_unlink(segment._name)  # the name goes; the mappings stay
        if not attached.item():
            return None
        return cls(segment, rank, world_size)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` goes through this channel (the same answer on every rank)."""
        return tensor.dtype in (torch.float32, torch.float64) and tensor.device.type == "cpu"

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (larger ones a slot-sized chunk at a time)."""
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), SLOT_VALUES):
            chunk = flat[start : start + SLOT_VALUES]
            chunk.copy_(self._reduced(chunk))  # (back to float32 where it was)
        if flat.data_ptr() != tensor.data_ptr():  # reshape copied a non-contiguous tensor
            tensor.copy_(flat.view_as(tensor))

    def _reduced(self, chunk: torch.Tensor) -> torch.Tensor:
        seq, parity = self.seq, self.seq & 1
        self.seq += 1
        count = chunk.numel()
        self.slots[parity, self.rank, :count] = chunk.numpy()
        self.flags[parity, self.rank] = seq
        self._wait(parity, seq)
        return torch.from_numpy(self.slots[parity, :, :count].sum(axis=0))

    def _wait(self, parity: int, seq: int) -> None:
        flags = self.flags[parity]
        spins = 0
        deadline = None
        while not (flags == seq).all():
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                os.sched_yield()
                deadline = deadline or time.monotonic() + TIMEOUT_S
                if spins % 4096 == 0 and time.monotonic() > deadline:
                    raise RuntimeError(f"all-reduce {seq}: a rank did not arrive within "
                                       f"{TIMEOUT_S:.0f} s")


# The channel of each process group (None: use the backend), made on first use: a collective
# call that every rank reaches at the same point. The group is kept with it, so that a later
# group never inherits its id.
_CHANNELS: dict[int, tuple[dist.ProcessGroup, ShmAllReduce | None]] = {}
_ENABLED = True


def use_shared_memory(enabled: bool) -> None:
    """Let co-located CPU ranks all-reduce through shared memory (the default), or not."""
    global _ENABLED
    _ENABLED = enabled


def channel_for(group: dist.ProcessGroup | None = None) -> ShmAllReduce | None:
    """The shared-memory channel of `group` (default: the world), or None (use gloo)."""
    if not _ENABLED:
        return None
    group = group or dist.group.WORLD
    known = _CHANNELS.get(id(group))
    if known is None or known[0] is not group:
        known = _CHANNELS[id(group)] = (group, ShmAllReduce.create(group))
    return known[1]


def register_ddp_hook(model: torch.nn.Module) -> bool:
    """Average a CPU DDP model's gradients through shared memory when its ranks share this
    machine; returns whether it did (else DDP keeps its gloo all-reduce)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    channel = channel_for(model.process_group)
    if channel is None or model.device_type != "cpu":
        return False
    model.register_comm_hook(channel, shm_allreduce_hook)
    return True


# No annotations: DDP checks them against the classes, and this module's are strings.
def shm_allreduce_hook(channel, bucket):
    """A DDP communication hook: the bucket's gradients averaged through `channel`
    (a ShmAllReduce); returns a completed future of the averaged bucket."""
    gradients = bucket.buffer()
    channel.all_reduce(gradients)
    gradients.div_(channel.world_size)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(gradients)
    return done


def _attach(name: str) -> shared_memory.SharedMemory | None:
    try:
        segment = shared_memory.SharedMemory(name)
    except FileNotFoundError:
        return None
    _untrack(segment)
    return segment


def _untrack(segment: shared_memory.SharedMemory) -> None:
    # Python 3.11 registers every created or attached segment with the resource tracker
    # (one tracker for the processes spawned from one parent), which would unlink it at exit
    # and complain about the rest; rank 0 unlinks the name itself once every rank attached.
    resource_tracker.unregister(segment._name, "shared_memory")


def _host_digest() -> torch.Tensor:
    digest = hashlib.sha256(f"{socket.gethostname()}/{os.uname().release}".encode()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()


def _all_equal(local: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(other, local) for other in gathered)
