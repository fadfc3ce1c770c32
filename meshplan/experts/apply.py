"""Apply a validated EP plan, then shard the experts with FSDP2 over the ranks that hold the same experts.

Order inside a strategy (the fsdp2 strategy calls these): tensor parallel -> :func:`apply_expert_parallel`
-> activation checkpointing -> :func:`shard_experts` (before the blocks, so each experts module is its own FSDP
unit on the expert data-parallel mesh and the block's unit skips its parameters) -> the blocks and the root.

Gradient scale: every rank's loss is a mean over its own tokens, and FSDP averages the dense gradients over the
dense data-parallel ranks. An expert's gradient already sums the contributions of every rank of its EP group
(the backward all-to-all brings them), so FSDP's reduction over the expert data-parallel ranks must divide by
the dense data-parallel size, not by its own size (:meth:`FSDPModule.set_gradient_divide_factor`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..core.expert_mesh import ExpertMeshes
from ..tensor_parallel.plan import ResolvedPlan
from .expert_parallel import ExpertParallel


def apply_expert_parallel(model: nn.Module, plan: ResolvedPlan, meshes: ExpertMeshes) -> list[nn.Module]:
    """Apply each EP style to the modules its key matched (in plan order); returns the experts modules."""
    from torch.distributed.tensor.parallel import parallelize_module  # loaded on use: keeps start-up light

    experts: list[nn.Module] = []
    for key, style in plan.styles.items():
        for fqn in plan.matches.get(key, ()):
            if isinstance(style, ExpertParallel) and meshes.token_mesh is not None:
                style = copy.copy(style)
                style.token_mesh = meshes.token_mesh
            module = model.get_submodule(fqn)
            parallelize_module(module, meshes.ep, style)
            if isinstance(style, ExpertParallel):
                experts.append(module)
    return experts


def shard_experts(experts: list[nn.Module], meshes: ExpertMeshes, gradient_divide_factor: int,
                  **fully_shard_kwargs: Any) -> None:
    """``fully_shard`` each experts module over the expert data-parallel mesh (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard  # loaded on use: keeps start-up light

    mesh = meshes.data_parallel.mesh
    for module in experts:
        fully_shard(module, mesh=mesh, **fully_shard_kwargs)
        module.set_gradient_divide_factor(float(gradient_divide_factor))
        if mesh.device_type == "cpu" and meshes.data_parallel.shard_size > 1:
            # gloo has no PREMUL_SUM: sum, then divide. (Not with one shard: torch 2.13 then divides the local
            # copy by the factor and, forced to sum, divides the result again.)
            module.set_force_sum_reduction_for_comms(True)
