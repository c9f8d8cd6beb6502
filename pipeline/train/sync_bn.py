"""Synchronized batch norm for every device.

`torch.nn.SyncBatchNorm` refuses CPU tensors, so on CPU (gloo) the product uses
`CpuSyncBatchNorm`: forward all-reduces per-channel sum, sum of squares and count, backward
all-reduces per-channel sum(dy) and sum(dy * x_hat) (as torch's SyncBatchNorm does on CUDA),
so that outputs, gradients and running statistics are those of plain BatchNorm on the global
batch. Both run on BatchNorm's fused CPU kernels: a graph of autograd-aware all-reduces
(torch.distributed.nn.functional) and elementwise ops gives the same numbers 4-5x slower.
`convert_sync_batchnorm` picks the right module for a device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.train.collectives import all_reduce


def _is_synchronized(process_group: dist.ProcessGroup | None) -> bool:
    """True when a process group of more than one rank is there to synchronise with."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


@torch.no_grad()
def _global_batch_stats(
    x: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance (float64) of the batch of every rank, and its size.

    One all-reduce of per-channel sum, sum of squares and count. Each rank first takes its own
    mean and variance with BatchNorm's (Welford) kernel and forms the sums in float64:
    E[x²] - E[x]² from float32 sums, even float32 squares, loses digits when |mean| >> std.
    """
    count_local = x.numel() // x.size(1)
    if count_local > 0:
        mean_local, var_local = torch.batch_norm_update_stats(x, None, None, 0.0)
    else:  # an empty share of the batch adds nothing
        mean_local = var_local = x.new_zeros(x.size(1))
    mean_local, var_local = mean_local.double(), var_local.double()
    totals = torch.cat(
        [
            mean_local * count_local,
            (var_local + mean_local * mean_local) * count_local,
            mean_local.new_full((1,), count_local),
        ]
    )
    all_reduce(totals, group)
    channels = x.size(1)
    count = round(totals[2 * channels].item())
    if count <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got {count}")
    mean = totals[:channels] / count
    var = (totals[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
    return mean, var, count


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalise with given global statistics; the backward adds the terms that flow through
    those statistics, with one all-reduce of per-channel sum(dy) and sum(dy * x_hat).

    Same formulas as torch.nn.SyncBatchNorm's CUDA function, on BatchNorm's fused CPU kernels.
    Parameter gradients stay local: DDP sums them across ranks, as for every other parameter.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, count, group):
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        # Eval-mode BatchNorm with the global statistics: (x - mean) / sqrt(var + eps) * w + b.
        return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, var = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        scale = torch.ones_like(mean) if weight is None else weight
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        # Eval-mode backward, reductions only: sum(dy * x_hat) and sum(dy) on this rank's batch.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, scale, mean, var, None, None, False, ctx.eps, [False, True, True]
        )
        grad_input = None
        if needs_input:
            totals = torch.cat([sum_dy, sum_dy_xhat])
            all_reduce(totals, ctx.group)
            mean_dy, mean_dy_xhat = (totals / ctx.count).chunk(2)
            w_invstd = scale * torch.rsqrt(var + ctx.eps)
            # dx = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)): the terms in x as
            # one fused BatchNorm pass (x_hat * k + c), then dy * w * invstd added in place.
            grad_input = torch.native_batch_norm(
                x, -w_invstd * mean_dy_xhat, -w_invstd * mean_dy, mean, var, False, 0.0, ctx.eps
            )[0]
            shape = [1, -1] + [1] * (x.dim() - 2)
            grad_input.addcmul_(grad_out, w_invstd.view(shape))
        grad_weight = sum_dy_xhat if weight is not None and needs_weight else None
        grad_bias = sum_dy if needs_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch of every rank together.

    Same parameters, buffers and state_dict keys as BatchNorm1d/2d/3d. In eval mode, or
    without a process group of more than one rank, it is plain BatchNorm. Statistics are
    accumulated in float64 (cheap: a few numbers per channel) and the normalisation runs in
    float32 (float64 for float64 input), also under bf16 autocast; the output has the input's
    dtype, like BatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        # What `revert_sync_batchnorm` turns it back into.
        self.plain_class: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or not self.track_running_stats
        if not (uses_batch_stats and _is_synchronized(self.process_group)):
            return super().forward(input)
        self._check_input_dim(input)
        with torch.autocast(device_type=input.device.type, enabled=False):
            return self._synchronized_forward(input)

    def _synchronized_forward(self, input: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.to(compute_dtype)
        group = self.process_group or dist.group.WORLD
        mean, var, count = _global_batch_stats(x, group)
        self._update_running_stats(mean, var, count)
        out = _SyncBatchNormFunction.apply(
            x,
            None if self.weight is None else self.weight.to(compute_dtype),
            None if self.bias is None else self.bias.to(compute_dtype),
            mean.to(compute_dtype),
            var.to(compute_dtype),
            self.eps,
            count,
            group,
        )
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Exactly BatchNorm's update: momentum (or the cumulative average when momentum is
        None) towards the batch mean and the UNBIASED batch variance."""
        if not (self.training and self.track_running_stats):
            return
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        # momentum None: BatchNorm's cumulative moving average.
        factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        unbiased_var = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(
            unbiased_var.to(self.running_var.dtype), alpha=factor
        )


def _twice_differentiable_forward(norm: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """Training-mode `norm` (statistics of every rank's batch, when it synchronises) that
    autograd can differentiate twice, running statistics untouched."""
    if not (isinstance(norm, CpuSyncBatchNorm | nn.SyncBatchNorm)
            and _is_synchronized(norm.process_group)):
        return nn.functional.batch_norm(input, None, None, norm.weight, norm.bias, training=True,
                                        eps=norm.eps)
    # Autograd-aware all-reduces and elementwise ops: slower than the fused function, which
    # is differentiable once only. Sums in float64 (E[x^2] - E[x]^2 loses digits otherwise).
    x = input.double()
    dims = [0, *range(2, x.dim())]
    group = norm.process_group or dist.group.WORLD
    count = x.new_full((1,), x.numel() // x.size(1))
    dist.all_reduce(count, group=group)
    totals = dist_nn.all_reduce(torch.cat([x.sum(dims), x.square().sum(dims)]), group=group)
    mean, mean_square = (totals / count).chunk(2)
    shape = [1, -1] + [1] * (x.dim() - 2)
    x_hat = (x - mean.view(shape)) * torch.rsqrt((mean_square - mean * mean).clamp_min(0.0)
                                                 .add(norm.eps).view(shape))
    if norm.weight is not None:
        x_hat = x_hat * norm.weight.view(shape) + norm.bias.view(shape)
    return x_hat.to(input.dtype)


@contextlib.contextmanager
def differentiable_twice(model: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm of `model` normalises as in training (with the global batch's
    statistics when it synchronises) in a way autograd can differentiate twice, and leaves its
    running statistics alone: what a gradient penalty needs (the fused backward of
    `CpuSyncBatchNorm` and of torch's SyncBatchNorm is differentiable once)."""
    norms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    for norm in norms:  # an instance attribute shadows the class's forward
        norm.forward = functools.partial(_twice_differentiable_forward, norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def _replace_batchnorms(
    module: nn.Module, make: Callable[[_BatchNorm], _BatchNorm | None]
) -> nn.Module:
    """Rebuild `module` with every batch norm `bn` replaced by `make(bn)` (None: keep it),
    sharing its parameters and buffers, as torch's convert_sync_batchnorm does."""
    if isinstance(module, _BatchNorm):
        replacement = make(module)
        if replacement is not None:
            if module.affine:
                with torch.no_grad():
                    replacement.weight = module.weight
                    replacement.bias = module.bias
            replacement.running_mean = module.running_mean
            replacement.running_var = module.running_var
            replacement.num_batches_tracked = module.num_batches_tracked
            replacement.train(module.training)
            return replacement
        return module
    for name, child in module.named_children():
        new_child = _replace_batchnorms(child, make)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _cpu_sync_from(bn: _BatchNorm, process_group: dist.ProcessGroup | None) -> _BatchNorm | None:
    if isinstance(bn, CpuSyncBatchNorm | nn.SyncBatchNorm):
        return None
    sync = CpuSyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group
    )
    sync.plain_class = type(bn)
    return sync


def convert_sync_batchnorm(
    model: nn.Module, device: torch.device, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Make every batch norm of `model` use the statistics of the global batch.

    CUDA: torch.nn.SyncBatchNorm (fused kernels). CPU: `CpuSyncBatchNorm`. Parameters and
    buffers are shared with the old layers and the state_dict keys do not change, so the
    weights load into the plain model. Convert before wrapping in DDP / prepare_model.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _replace_batchnorms(model, lambda bn: _cpu_sync_from(bn, process_group))


def _plain_from(bn: _BatchNorm) -> _BatchNorm | None:
    if not isinstance(bn, CpuSyncBatchNorm | nn.SyncBatchNorm):
        return None
    # torch's SyncBatchNorm does not remember its origin; every model here uses BatchNorm2d.
    plain_class = getattr(bn, "plain_class", nn.BatchNorm2d)
    return plain_class(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Undo `convert_sync_batchnorm`: plain batch norms sharing the same parameters and
    buffers (same state_dict), so saved or exported models need no process group."""
    return _replace_batchnorms(model, _plain_from)
