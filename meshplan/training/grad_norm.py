"""The global norm of a parallelized model's gradients, and clipping by it, on any mix of meshes.

A model parallelized by meshplan holds gradients on several meshes at once: dense and TP parameters on
``(dp_shard, tp)``, EP experts on ``(expert_dp_shard, ep, tp)``, HSDP on ``(dp_replicate, dp_shard, ...)``, plain
tensors that DDP or TP replicate. ``torch.nn.utils.clip_grad_norm_`` stacks per-parameter norms and fails on more
than one mesh. Here each gradient contributes ``sum |g_local|^p`` of its local tensor, weighted by
``1 / (copies of it in the group)``: the sizes of the mesh dims it is ``Replicate`` on (a replicated router, a
KV-replicated projection, an HSDP replica: counted once, never once per rank) times the copies of its mesh in the
group (a plain tensor is one copy per rank). Summing the weighted contributions of every rank with **one**
all-reduce then counts each element of the global gradient exactly once (``max`` for the inf norm, where copies do
not matter). Partial gradients are reduced first.

The group is the default process group. A pipeline-parallel model (``PipelineModel``) holds each stage's parameters
on the ranks of one pipeline coordinate only, so its copies are counted over ``world / pp`` ranks: the same single
all-reduce then also sums the pipeline stages.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import NonFiniteGradNormError, UnsupportedConfigurationError

Parameters = nn.Module | torch.Tensor | Iterable[torch.Tensor]


def _gradients(parameters: Parameters) -> list[torch.Tensor]:
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _norm_order(norm_type: float | int | str) -> float:
    """``norm_type`` as a float; the same error on every rank for an order that cannot be summed across ranks."""
    try:
        order = float(norm_type)
    except (TypeError, ValueError):
        order = math.nan
    if not (order == math.inf or 0 < order < math.inf):
        raise UnsupportedConfigurationError(
            f"norm_type must be a positive number or inf, got {norm_type!r}.")
    return order


def _local_and_weight(grad: torch.Tensor, group_size: int) -> tuple[torch.Tensor, tuple, float]:
    """This rank's local gradient, its grouping key (mesh and placements) and the weight ``1 / copies`` that makes
    the sum over the group count every element once."""
    from torch.distributed.tensor import DTensor, Replicate  # DTensor is heavy: imported on use

    if not isinstance(grad, DTensor):
        return grad, (None, grad.device, grad.dtype), 1.0 / group_size
    placements = grad.placements
    if any(p.is_partial() for p in placements):  # pending sums: reduce them before taking a norm
        grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in placements])
        placements = grad.placements
    mesh = grad.device_mesh
    replicas = math.prod(mesh.size(d) for d, p in enumerate(placements) if p.is_replicate())
    copies_of_mesh = group_size // mesh.size()
    local = grad.to_local()
    return local, (mesh, placements, local.device, local.dtype), 1.0 / (replicas * copies_of_mesh)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device the all-reduce runs on, the same on every rank (a rank may hold no gradient at all)."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ranks_per_stage(parameters: Parameters) -> int:
    """The ranks that hold copies of one parameter's shards: the whole world, or for a ``PipelineModel`` the ranks
    of one pipeline stage (``world / pp``: the other pipeline ranks hold other parameters)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    pp_mesh = getattr(parameters, "pp_mesh", None) if isinstance(parameters, nn.Module) else None
    return dist.get_world_size() // (pp_mesh.size() if pp_mesh is not None else 1)


def _total_norm(grads: list[torch.Tensor], order: float, group_size: int) -> torch.Tensor:
    """The norm of order ``order`` over every element of the global gradients (one all-reduce), in float64;
    ``group_size``: the ranks over which a parameter's copies are counted (see :func:`_ranks_per_stage`)."""
    distributed = dist.is_available() and dist.is_initialized()
    groups: dict[tuple, tuple[list[torch.Tensor], float]] = {}  # (mesh, placements, ...) -> (locals, weight)
    for grad in grads:
        local, key, weight = _local_and_weight(grad, group_size)
        if local.numel():  # an empty shard (uneven FSDP2 split) adds nothing, and has no inf norm
            groups.setdefault(key, ([], weight))[0].append(local)
    device = _collective_device(None) if distributed else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for tensors, weight in groups.values():
        norms = torch.stack(torch._foreach_norm(tensors, order)).to(device, torch.float64)
        total = torch.maximum(total, norms.max()) if order == math.inf else total + norms.pow(order).sum() * weight
    if distributed:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if order == math.inf else dist.ReduceOp.SUM)
    return total if order == math.inf else total.pow(1.0 / order)


def grad_norm(parameters: Parameters, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of a parallelized model (or of an iterable of parameters), the same on every rank
    and equal to the norm of the one-process model's gradients; read-only (for logging). A collective: every rank
    calls it.

    Args:
        parameters: the model (a ``PipelineModel``: all stages' gradients), or its parameters (those without a
            gradient are skipped; pass a pipeline as the module, not as ``pipe.parameters()``).
        norm_type: the order of the norm: a positive number or ``inf``.

    Returns:
        A scalar tensor in the gradients' dtype (float32 when there are none).
    """
    order = _norm_order(norm_type)
    grads = _gradients(parameters)
    dtype = grads[0].dtype if grads else torch.float32
    return _total_norm(grads, order, _ranks_per_stage(parameters)).to(dtype)


def clip_grad_norm_(
    parameters: Parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Scale the gradients of a parallelized model in place so that their global norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does for one process, on any mix of meshes (TP, EP experts, CP, HSDP, DDP,
    replicated parameters). A collective: every rank calls it.

    Args:
        parameters: the model, or its parameters.
        max_norm: the largest norm allowed.
        norm_type: the order of the norm: a positive number or ``inf``.
        error_if_nonfinite: raise when the total norm is ``nan`` or ``inf`` (on every rank; the gradients are left
            as they are) instead of scaling by it.
        foreach: ``False`` scales one gradient at a time; otherwise torch's fused ``_foreach_mul_``.

    Returns:
        The total norm before clipping (see :func:`grad_norm`).

    Raises:
        NonFiniteGradNormError: ``error_if_nonfinite`` and the norm is not finite.
        UnsupportedConfigurationError: ``norm_type`` is not a positive number or ``inf``.
    """
    total = grad_norm(parameters, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise NonFiniteGradNormError(
            f"The total norm of order {float(norm_type)} of the gradients is non-finite ({float(total)}), so it "
            "cannot be clipped. Pass error_if_nonfinite=False to scale the gradients by it anyway.")
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for grad in _gradients(parameters):
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        by_device[(local.device, local.dtype)].append(local)
    for (device, dtype), tensors in by_device.items():
        scale = coefficient.to(device, dtype)
        if foreach is False:
            for tensor in tensors:
                tensor.mul_(scale)
        else:
            torch._foreach_mul_(tensors, scale)
    return total
