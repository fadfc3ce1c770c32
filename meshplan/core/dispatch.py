"""The dispatcher behind ``meshplan.parallelize``: plan -> normalize -> validate -> apply, in one straight path.

It works on a given :class:`Strategy` and :class:`Registry`; looking names up in the loaded plugins is the
job of the public facade (:mod:`meshplan.api`), so ``core`` never imports the plugin layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..experts.plan import experts_tp_sharded, resolve_expert_plan
from ..tensor_parallel.plan import ResolvedPlan, resolve_plan
from ..tensor_parallel.validation import fit_to_tp_size, match_and_check
from .errors import OptionsError, StrategyUnavailableError, UnsupportedConfigurationError
from .registry import Registry
from .roles import MeshRoles, resolve_roles
from .strategy import Strategy, StrategyOptions

REPORT_ATTRIBUTE = "_meshplan_report"


@dataclass(frozen=True)
class Prepared:
    """Everything ``parallelize`` decided before touching the model; :meth:`apply` runs the strategy."""

    model: nn.Module
    roles: MeshRoles
    strategy: Strategy
    options: StrategyOptions
    plan: ResolvedPlan | None
    ep_plan: ResolvedPlan | None = None

    @property
    def device_mesh(self) -> DeviceMesh:
        return self.roles.mesh

    @property
    def tp_size(self) -> int:
        return self.roles.size("tp")

    def report(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "options": self.options.report(),
            "mesh": dict(zip(self.device_mesh.mesh_dim_names or (), self.device_mesh.shape)),
            "roles": self.roles.describe(),
            "tp_size": self.tp_size,
            "plan": None if self.plan is None else self.plan.report(),
            "ep_plan": None if self.ep_plan is None else self.ep_plan.report(),
        }

    def apply(self) -> nn.Module:
        expert = {} if self.ep_plan is None else {"ep_plan": self.ep_plan}
        model = self.strategy.parallelize(self.model, self.roles, self.plan, self.options, **expert)
        object.__setattr__(model, REPORT_ATTRIBUTE, self.report())
        return model


def prepare(
    model: nn.Module, device_mesh: DeviceMesh, strategy: Strategy, registry: Registry, tp_plan: Any = None,
    ep_plan: Any = None, **options: Any,
) -> Prepared:
    """Resolve and validate everything for ``strategy``; no collective runs and the model is not modified.

    ``registry`` supplies plan providers and style names (:func:`meshplan.prepare` passes the loaded one).
    With an ``ep_size`` option above 1 the EP plan is resolved too (``ep_plan`` overrides the providers), the
    roles learn whether EP may borrow the TP ranks (not when the TP plan shards the experts), and the strategy's
    ``validate`` and ``parallelize`` get the EP plan as the keyword ``ep_plan``.
    """
    reason = strategy.unavailable_reason(device_mesh.device_type)
    if reason:
        raise StrategyUnavailableError(f"Strategy {strategy.name!r} cannot run here: {reason}")
    opts = strategy.make_options(options)
    roles = resolve_roles(device_mesh, opts.mesh_roles(), strategy.name, ep_size=getattr(opts, "ep_size", 1))
    plan = None
    if roles.size("tp") > 1:
        plan = match_and_check(model, resolve_plan(model, registry, tp_plan, opts.sequence_parallel), opts.strict)
        plan = fit_to_tp_size(model, plan, roles.size("tp"))
    if ep_plan is not None and roles.ep_size == 1:
        raise OptionsError(f"ep_plan was given but ep_size is 1: pass ep_size=N to strategy {strategy.name!r} "
                           "for expert parallelism.")
    if roles.ep_size == 1:
        strategy.validate(model, roles, plan, opts)
        return Prepared(model, roles, strategy, opts, plan)
    if "ep_plan" not in inspect.signature(strategy.parallelize).parameters:
        raise UnsupportedConfigurationError(
            f"Strategy {strategy.name!r} has an ep_size option but its parallelize() takes no ep_plan keyword, so it "
            "cannot apply expert parallelism; add `ep_plan: ResolvedPlan | None = None` to it.")
    expert_plan = resolve_expert_plan(model, registry, ep_plan, roles.ep_size, strict=opts.strict)
    roles = dataclasses.replace(roles, ep_borrows_tp=not experts_tp_sharded(plan, expert_plan))
    roles.check_expert_parallel()
    strategy.validate(model, roles, plan, opts, ep_plan=expert_plan)
    return Prepared(model, roles, strategy, opts, plan, expert_plan)


def get_report(model: nn.Module) -> Mapping[str, Any] | None:
    """What ``parallelize`` did to ``model`` (strategy, options, applied plan), or ``None``."""
    return getattr(model, REPORT_ATTRIBUTE, None)
