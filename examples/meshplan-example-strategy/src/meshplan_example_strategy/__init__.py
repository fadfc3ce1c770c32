"""A minimal meshplan strategy plugin: ``tp_only`` applies the tensor-parallel plan and nothing else.

meshplan has already resolved, normalized and validated the plan when ``parallelize`` is called: the
strategy only applies it. Data-parallel wrapping is left to the caller (inference, or your own DP).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

import meshplan


@dataclass
class TPOnlyOptions(meshplan.StrategyOptions):
    """Options of ``tp_only``, on top of ``tp_mesh_name``, ``sequence_parallel`` and ``strict``.

    Attributes:
        require_tp: refuse a mesh without a tensor-parallel dim larger than 1 (the strategy would do nothing).
    """

    require_tp: bool = True


class TensorParallelOnly(meshplan.Strategy):
    """Apply the TP plan on the ``tp`` mesh dim; no data-parallel wrapping."""

    name = "tp_only"
    aliases = ("tensor-parallel-only",)
    description = "tensor-parallel plan only, no data-parallel wrapping (inference, or your own DP)"
    options_class = TPOnlyOptions

    def validate(self, model: nn.Module, roles: meshplan.MeshRoles, plan: meshplan.ResolvedPlan | None,
                 options: TPOnlyOptions) -> None:
        """Runs before any collective, with the same answer on every rank."""
        if plan is None and options.require_tp:
            dims = dict(zip(roles.mesh.mesh_dim_names or (), roles.mesh.shape))
            raise meshplan.MeshError(
                f"tp_only needs a mesh dim {options.tp_mesh_name!r} larger than 1, but the mesh is {dims}; "
                "pass tp_mesh_name=... or require_tp=False."
            )

    def parallelize(self, model: nn.Module, roles: meshplan.MeshRoles, plan: meshplan.ResolvedPlan | None,
                    options: TPOnlyOptions) -> nn.Module:
        if plan is None:
            return model
        tp_mesh = roles.tp  # the sub-mesh meshplan resolved for the tp role
        for key, style in plan.styles.items():  # fresh style objects, in plan order
            for fqn in plan.matches[key]:  # the modules validation matched to the key
                parallelize_module(model.get_submodule(fqn), tp_mesh, style)
        return model


@meshplan.hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001 - meshplan's register callback
    register(TensorParallelOnly)
