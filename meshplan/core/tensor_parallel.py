"""Apply a validated plan with torch DTensor tensor parallelism."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from .plan import ResolvedPlan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: ResolvedPlan) -> nn.Module:
    """Apply each style to the modules its key matched, in plan order (matching is not redone)."""
    for key, style in plan.styles.items():
        for fqn in plan.matches.get(key, ()):
            parallelize_module(model.get_submodule(fqn), tp_mesh, style)
    return model
