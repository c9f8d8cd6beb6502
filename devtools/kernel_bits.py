"""Which float kernels this machine runs: a hash of one forward and backward pass of the
domain classifier (fixed weights, fixed input), beside the instruction set torch dispatches to.

Same code and data give bit-identical models on one machine; on a CPU with another
instruction set (AVX2 vs AVX-512) torch and oneDNN pick other kernels, and the bits differ.
Run it on two machines (or with `ONEDNN_MAX_CPU_ISA=...` / `ATEN_CPU_CAPABILITY=...` set)
to see whether they would train the same bits:

    python -m devtools.kernel_bits
"""

from __future__ import annotations

import hashlib
import os

import torch

from pipeline.models.classifier import ClassifierSpec, DomainClassifier

SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:12]


def kernel_bits() -> dict[str, str]:
    """The dispatch level, the settings that cap it, and the hashes of the logits and of the
    input's gradient of a seeded classifier (channels-last, as the stage trains it)."""
    torch.manual_seed(0)
    model = DomainClassifier(ClassifierSpec(32, 1, 10)).to(memory_format=torch.channels_last)
    images = torch.rand(64, 1, 32, 32).mul(2).sub(1).to(memory_format=torch.channels_last)
    images.requires_grad_()
    logits = model.logits(images)
    logits.sum().backward()
    assert images.grad is not None
    settings = {name: os.environ.get(name, "") for name in SETTINGS}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **settings,
            "logits": _digest(logits), "input_grad": _digest(images.grad)}


if __name__ == "__main__":
    print(" ".join(f"{key}={value or '-'}" for key, value in kernel_bits().items()))
