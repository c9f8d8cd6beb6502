"""One wrapping for every runner: where a rank's models and batches live, which Adam runs,
and who averages the gradients (`pipeline.train.placement`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from pipeline.train import captured, placement

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(("setting", "world_size", "device", "compile_mode", "group", "mode"), [
    ("auto", 1, GPU, "auto", True, "none"),       # one GPU worker: nothing to average
    ("auto", 8, GPU, "auto", True, "bucketed"),   # GPU ranks: capturable in the graph
    ("auto", 8, GPU, "off", True, "ddp"),         # eager anyway: DDP overlaps its backward
    ("auto", 2, CPU, "auto", True, "ddp"),        # CPU ranks are never captured
    ("bucketed", 2, CPU, "auto", True, "bucketed"),
    ("ddp", 1, GPU, "auto", True, "ddp"),         # a benchmark's world of one, as asked
    ("bucketed", 1, CPU, "auto", False, "none"),  # one process, no group: nothing to join
])
def test_who_averages_the_gradients(setting, world_size, device, compile_mode, group, mode):
    choice = placement.choose_gradient_allreduce(
        setting, world_size=world_size, device=device, compile_mode=compile_mode,
        process_group=group)
    assert choice.mode == mode and choice.reason


def test_gradient_allreduce_is_validated_in_one_line():
    with pytest.raises(ValueError, match=r"train\.gradient_allreduce must be one of"):
        placement.choose_gradient_allreduce("nccl", world_size=2, device=CPU,
                                            compile_mode="auto", process_group=True)


def test_gpu_ranks_train_channels_last_with_fused_adam_and_cpu_ranks_as_before():
    assert placement.memory_format(GPU) is torch.channels_last
    assert placement.adam_options(GPU) == {"fused": True}
    assert placement.memory_format(CPU) is torch.contiguous_format
    assert placement.adam_options(CPU) == {}
    batch = placement.place_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), CPU)
    assert batch.is_contiguous()
    conv = placement.place_module(torch.nn.Conv2d(3, 4, 3), CPU)
    assert conv.weight.is_contiguous()


def test_a_resumed_optimizer_keeps_this_runs_implementation():
    """A GPU checkpoint's fused Adam must not turn into fused CPU Adam on a CPU resume."""
    weight = torch.nn.Parameter(torch.ones(3))
    gpu_run = torch.optim.Adam([weight], fused=True)
    weight.grad = torch.ones(3)
    gpu_run.step()
    cpu_run = torch.optim.Adam([weight])
    cpu_run.load_state_dict(gpu_run.state_dict())
    assert cpu_run.param_groups[0]["fused"]  # what load_state_dict alone does
    placement.keep_own_implementation(cpu_run)
    assert cpu_run.param_groups[0]["fused"] is None
    captured.set_capturable([cpu_run], False)
    cpu_run.step()
    assert cpu_run.state[weight]["step"].device.type == "cpu"


def test_no_runner_wraps_models_itself():
    """The Ray worker, the benchmarks and the tests share the loop's wrapping: no hooks class
    defines `wrap_model` (the GPU figures are those of what users run)."""
    for path in sorted([*(REPO_ROOT / "pipeline").rglob("*.py"),
                        *(REPO_ROOT / "benchmarks").glob("*.py"),
                        *(REPO_ROOT / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.name != "wrap_model", f"{Path(path).relative_to(REPO_ROOT)}"
