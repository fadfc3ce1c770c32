"""A minimal meshplan strategy plugin with two strategies and no data-parallel wrapping (inference, or your own DP).

* ``tp_only`` declares ``supports = {"tp"}`` and implements ``parallelize`` itself: it applies the TP plan.
* ``model_parallel_only`` declares ``{"tp", "ep"}`` and subclasses ``meshplan.ComposedStrategy``: meshplan runs
  the shared order (tensor parallel, then expert parallel with ``ep_size``) and the strategy only says how to
  wrap for data parallelism, here not at all.

meshplan has already resolved, matched and fitted the plans (``plans.tp``, ``plans.ep``) when ``parallelize`` is
called, and refuses an axis a strategy does not declare (``UnsupportedAxisError``) before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    supports = frozenset({"tp"})
    aliases = ("tensor-parallel-only",)
    description = "tensor-parallel plan only, no data-parallel wrapping (inference, or your own DP)"
    options_class = TPOnlyOptions

    def validate(self, model: nn.Module, roles: meshplan.MeshRoles, plans: meshplan.PlanSet,
                 options: TPOnlyOptions) -> None:
        """Runs before any collective, with the same answer on every rank; what it returns reaches parallelize."""
        if plans.tp is None and options.require_tp:
            dims = dict(zip(roles.mesh.mesh_dim_names or (), roles.mesh.shape))
            raise meshplan.MeshError(
                f"tp_only needs a mesh dim {options.tp_mesh_name!r} larger than 1, but the mesh is {dims}; "
                "pass tp_mesh_name=... or require_tp=False."
            )

    def parallelize(self, model: nn.Module, roles: meshplan.MeshRoles, plans: meshplan.PlanSet,
                    options: TPOnlyOptions, validated: None) -> nn.Module:
        plan = plans.tp
        if plan is None:
            return model
        tp_mesh = roles.tp  # the sub-mesh meshplan resolved for the tp role
        for key, style in plan.styles.items():  # fresh style objects, in plan order
            for fqn in plan.matches[key]:  # the modules validation matched to the key
                parallelize_module(model.get_submodule(fqn), tp_mesh, style)
        return model


@dataclass
class ModelParallelOptions(meshplan.ExpertParallelOptions):
    """Options of ``model_parallel_only``: ``tp_mesh_name``, ``sequence_parallel``, ``strict`` and ``ep_size``
    (expert parallelism over ranks carved from the ``dp`` dim, and from ``tp`` when the TP plan leaves the
    experts whole)."""


class ModelParallelOnly(meshplan.ComposedStrategy):
    """Tensor and expert parallelism in meshplan's shared order; no data-parallel wrapping."""

    name = "model_parallel_only"
    supports = frozenset({"tp", "ep"})
    description = "TP and EP plans only, no data-parallel wrapping (inference, or your own DP)"
    options_class = ModelParallelOptions

    def wrap_data_parallel(self, model: nn.Module, roles: meshplan.MeshRoles, plans: meshplan.PlanSet,
                           options: ModelParallelOptions, validated: Any, done: meshplan.Composition) -> nn.Module:
        return model  # done.experts: the experts modules EP split; roles.expert_data_parallel: who holds the same


@meshplan.hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001 - meshplan's register callback
    register(TensorParallelOnly)
    register(ModelParallelOnly)
