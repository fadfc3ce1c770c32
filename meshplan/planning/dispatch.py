"""The dispatcher behind ``meshplan.parallelize``: axes -> roles -> plans -> validate -> apply, in one straight path.

It works on a given :class:`Strategy` and :class:`Registry`; looking names up in the loaded plugins is the job of
the public facade (:mod:`meshplan.api`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.errors import OptionsError, StrategyUnavailableError
from ..core.plans import FittedPlan, PlanSet
from ..core.registry import Registry
from ..core.roles import MeshRoles, resolve_roles
from ..core.strategy import Strategy, StrategyOptions, declared_axes
from ..experts.plan import experts_tp_sharded
from .axes import check_declared_axes, refuse_undeclared_axes, refuse_undeclared_roles
from .build import build_plan
from .legacy import LegacyStrategy, refuse_pre_contract_methods
from .resolve import resolve_plans

REPORT_ATTRIBUTE = "_meshplan_report"


@dataclass(frozen=True)
class Prepared:
    """Everything ``parallelize`` decided before touching the model; :meth:`apply` runs the strategy.

    ``plans`` holds the fitted plan of each axis in use; ``validated`` is what the strategy's ``validate``
    returned, handed to its ``parallelize``."""

    model: nn.Module
    roles: MeshRoles
    strategy: Strategy
    options: StrategyOptions
    plans: PlanSet
    validated: Any = None
    contract: Strategy | LegacyStrategy | None = dataclasses.field(default=None, repr=False)

    @property
    def device_mesh(self) -> DeviceMesh:
        return self.roles.mesh

    @property
    def tp_size(self) -> int:
        return self.roles.size("tp")

    @property
    def plan(self) -> FittedPlan | None:
        """The tensor-parallel plan (``plans.tp``)."""
        return self.plans.tp

    @property
    def ep_plan(self) -> FittedPlan | None:
        """The expert-parallel plan (``plans.ep``)."""
        return self.plans.ep

    def report(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "options": self.options.report(),
            "mesh": dict(zip(self.device_mesh.mesh_dim_names or (), self.device_mesh.shape)),
            "roles": self.roles.describe(),
            "tp_size": self.tp_size,
        } | self.plans.report()

    def apply(self) -> nn.Module:
        contract = self.contract or self.strategy
        model = contract.parallelize(self.model, self.roles, self.plans, self.options, self.validated)
        pipeline = getattr(model, "pipeline_plan", None)  # a PipelineModel: its stages and schedule too
        report = self.report() | ({} if pipeline is None else {"pipeline": pipeline.report()})
        object.__setattr__(model, REPORT_ATTRIBUTE, report)
        return model


def prepare(
    model: nn.Module, device_mesh: DeviceMesh, strategy: Strategy, registry: Registry, tp_plan: Any = None,
    ep_plan: Any = None, **options: Any,
) -> Prepared:
    """Resolve and validate everything for ``strategy``; no collective runs and the model is not modified.

    ``registry`` supplies plan providers and style names (:func:`meshplan.prepare` passes the loaded one). An axis
    the strategy does not declare in ``supports`` is refused first (:class:`UnsupportedAxisError`). The plan
    providers are then called once for every axis in use (TP with a ``tp`` dim > 1, EP with ``ep_size`` > 1:
    ``tp_plan`` / ``ep_plan`` override them; the ``pp`` entry with a ``pp`` dim > 1), each plan is matched and fitted
    (:func:`~meshplan.planning.build.build_plan`), and the roles learn whether EP may borrow the TP ranks (not when
    the TP plan shards the experts). The strategy's ``validate`` gets the plan set; what it returns reaches its
    ``parallelize``.
    """
    reason = strategy.unavailable_reason(device_mesh.device_type)
    if reason:
        raise StrategyUnavailableError(f"Strategy {strategy.name!r} cannot run here: {reason}")
    declared = declared_axes(strategy)
    contract: Strategy | LegacyStrategy = strategy if declared is not None else LegacyStrategy(strategy)
    if declared is not None:
        check_declared_axes(strategy.name, declared, strategy.options_class)
        refuse_pre_contract_methods(strategy)
    supports = contract.supports
    refuse_undeclared_axes(strategy.name, supports, device_mesh, options, ep_plan)
    opts = strategy.make_options(options)
    ep_size = getattr(opts, "ep_size", 1) if "ep" in supports else 1
    roles = resolve_roles(device_mesh, opts.mesh_roles(), strategy.name, ep_size=ep_size)
    refuse_undeclared_roles(strategy.name, supports, roles)
    if ep_plan is not None and roles.ep_size == 1:
        raise OptionsError(f"ep_plan was given but ep_size is 1: pass ep_size=N to strategy {strategy.name!r} "
                           "for expert parallelism.")
    plans = _build_plans(model, registry, roles, opts, {"tp": tp_plan, "ep": ep_plan, "pp": None})
    if plans.ep is not None:
        roles = dataclasses.replace(roles, ep_borrows_tp=not experts_tp_sharded(plans.tp, plans.ep))
        roles.check_expert_parallel()
    validated = contract.validate(model, roles, plans, opts)
    return Prepared(model, roles, strategy, opts, plans, validated, contract)


def _build_plans(model: nn.Module, registry: Registry, roles: MeshRoles, options: StrategyOptions,
                 explicit: Mapping[str, Any]) -> PlanSet:
    """The plan set of the axes in use (size > 1), providers resolved once for all of them."""
    sizes = {"tp": roles.size("tp"), "ep": roles.size("ep"), "pp": roles.size("pp")}
    wanted = {axis: explicit[axis] for axis, size in sizes.items() if size > 1}
    if not wanted:
        return PlanSet()
    resolved = resolve_plans(model, registry, wanted, options.sequence_parallel, sizes)
    fitted = {axis: build_plan(model, resolved[axis], axis, sizes[axis], options.strict)
              for axis in ("tp", "ep") if axis in resolved}
    return PlanSet(fitted.get("tp"), fitted.get("ep"), resolved.get("pp"))


def get_report(model: nn.Module) -> Mapping[str, Any] | None:
    """What ``parallelize`` did to ``model`` (strategy, options, applied plan), or ``None``."""
    return getattr(model, REPORT_ATTRIBUTE, None)
