"""The numbers a parity check compares: relative errors, and full (gathered) plain tensors of a parallelized
model under its wrapper-free parameter names; :func:`perturb` so that no gradient hides behind a symmetric value."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..core.naming import unwrapped_name
from ..state.packing import unpack_full_state_dict

__all__ = ["clean_name", "full", "full_grads", "full_params", "perturb", "relative_error"]


# --- numbers -------------------------------------------------------------------------------------------
def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64 (0 for empty tensors)."""
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor, 1e-30)
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()) / scale if diff.numel() else 0.0


# --- full tensors of a parallelized model -----------------------------------------------------------
def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain, detached copy of ``tensor``; a DTensor is gathered (``full_tensor()``, collective)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


clean_name = unwrapped_name


def _gathered(model: nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    unpacked = unpack_full_state_dict(model, {name: full(tensor) for name, tensor in named})
    return {clean_name(name): tensor for name, tensor in unpacked.items()}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors gathered, packed parameters in their original order),
    keyed by its wrapper-free name."""
    return _gathered(model, model.named_parameters())


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient that exists, gathered and keyed like :func:`full_params`."""
    return _gathered(model, ((n, p.grad) for n, p in model.named_parameters() if p.grad is not None))


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add ``scale`` x N(0, 1) noise (from ``seed``) to every float parameter, so norm weights are not all
    ones and routers not all zeros (a wrong gradient cannot hide behind a symmetric value)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model
