"""Reductions across the TP mesh that autograd sees: sums in forward or in backward only."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate


def all_reduce_backward(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity in forward; in backward the gradient is summed across ``mesh``.

    For a replicated tensor consumed by rank-local computation (each rank's gradient is a partial sum).
    Expressed with DTensor: a ``Replicate`` view whose local gradient is declared ``Partial``.
    """
    replicated = DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)
    return replicated.to_local(grad_placements=[Partial()])


def all_reduce_forward(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum of ``tensor`` over ``mesh`` in forward; in backward each rank gets the (replicated) gradient as is."""
    partial = DTensor.from_local(tensor, mesh, [Partial()], run_check=False)
    return partial.redistribute(placements=[Replicate()]).to_local()


def replicated_local_input(value: Any, mesh: DeviceMesh) -> Any:
    """A floating tensor argument (plain, or a DTensor made replicated) as a local tensor whose gradient is summed
    over ``mesh`` in backward; anything else as it is."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if isinstance(value, DTensor):
        value = value.redistribute(placements=[Replicate()]).to_local()
    return all_reduce_backward(value, mesh)
