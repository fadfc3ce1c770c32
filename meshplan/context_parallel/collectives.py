"""Autograd-aware all-gather along a sequence dim: the backward reduce-scatters (sums) the gradients.

Used for keys and values: every CP rank's queries attend to the whole sequence, so the gradient of a local
key shard is the sum, over the ranks, of the gradients their queries send to it. Plain collectives of
``torch.distributed`` (``all_gather_single`` / ``reduce_scatter_single``, named ``*_into_tensor`` /
``*_tensor`` before torch 2.13): they run on gloo (CPU) and NCCL alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather(out, tensor.contiguous(), group=group)
        # [world * n, ...] in rank order -> concatenated along ``dim``
        return out.unflatten(0, (world, tensor.shape[0])).movedim(0, dim).flatten(dim, dim + 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        world = dist.get_world_size(ctx.group)
        dim = ctx.dim
        chunks = grad.unflatten(dim, (world, grad.shape[dim] // world)).movedim(dim, 0).contiguous()
        out = grad.new_empty(chunks.shape[1:])
        _reduce_scatter(out, chunks.flatten(0, 1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None


def all_gather_sequence(tensor: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order; gradients are summed back."""
    if dim < 0:
        dim += tensor.ndim
    return _GatherAlongDim.apply(tensor, dim, group)


def all_gather_key_value(
    key: torch.Tensor, value: torch.Tensor, dim: int, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather keys and values along ``dim`` in one collective when their shapes agree (two otherwise)."""
    if key.shape == value.shape and key.dtype == value.dtype:
        both = all_gather_sequence(torch.stack((key, value)), dim + 1 if dim >= 0 else dim, group)
        return both[0], both[1]
    return all_gather_sequence(key, dim, group), all_gather_sequence(value, dim, group)
