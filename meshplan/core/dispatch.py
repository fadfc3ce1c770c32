"""``meshplan.parallelize``: strategy -> plan -> normalize -> validate -> apply, in one straight path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .errors import StrategyUnavailableError, UnknownStrategyError
from .mesh import dim_size
from .names import did_you_mean
from .plan import ResolvedPlan, resolve_plan
from .strategy import Strategy, StrategyOptions
from .validation import match_and_check, validate_tp_size

REPORT_ATTRIBUTE = "_meshplan_report"


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name`` (aliases, case and ``-``/``_`` insensitive), as an instance."""
    from ..plugins.manager import get_host

    host = get_host()
    registration = host.registry.strategies.find(name)
    if registration is None:
        known = ", ".join(sorted(host.registry.strategies.keys())) or "none"
        raise UnknownStrategyError(
            f"Unknown strategy {name!r}. Known strategies: {known}."
            f"{did_you_mean(name, host.registry.strategies.keys())}{host.failure_hint('strategy', name)}"
        )
    target = registration.load()
    strategy = target() if isinstance(target, type) else target
    if not isinstance(strategy, Strategy):
        raise UnknownStrategyError(
            f"Strategy {name!r} from {registration.provenance.describe()} is a {type(strategy).__name__}, "
            "not a meshplan.Strategy."
        )
    return strategy


@dataclass(frozen=True)
class Prepared:
    """Everything ``parallelize`` decided before touching the model; :meth:`apply` runs the strategy."""

    model: nn.Module
    device_mesh: DeviceMesh
    strategy: Strategy
    options: StrategyOptions
    plan: ResolvedPlan | None
    tp_size: int

    def report(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "options": {k: repr(v) for k, v in vars(self.options).items()},
            "mesh": dict(zip(self.device_mesh.mesh_dim_names or (), self.device_mesh.shape)),
            "tp_size": self.tp_size,
            "plan": None if self.plan is None else self.plan.report(),
        }

    def apply(self) -> nn.Module:
        model = self.strategy.parallelize(self.model, self.device_mesh, self.plan, self.options)
        object.__setattr__(model, REPORT_ATTRIBUTE, self.report())
        return model


def prepare(
    model: nn.Module, device_mesh: DeviceMesh, strategy: str | Strategy = "fsdp2", tp_plan: Any = None,
    **options: Any,
) -> Prepared:
    """Resolve and validate everything; no collective runs and the model is not modified."""
    from ..plugins.manager import get_registry

    chosen = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
    reason = chosen.unavailable_reason(device_mesh.device_type)
    if reason:
        raise StrategyUnavailableError(f"Strategy {chosen.name!r} cannot run here: {reason}")
    opts = chosen.make_options(options)
    tp_size = dim_size(device_mesh, opts.tp_mesh_name)
    plan = None
    if tp_size > 1:
        validate_tp_size(model, tp_size)
        plan = resolve_plan(model, get_registry(), tp_plan, opts.sequence_parallel)
        plan = match_and_check(model, plan, strict=opts.strict)
    chosen.validate(model, device_mesh, plan, opts)
    return Prepared(model, device_mesh, chosen, opts, plan, tp_size)


def parallelize(
    model: nn.Module, device_mesh: DeviceMesh, strategy: str | Strategy = "fsdp2", tp_plan: Any = None,
    **options: Any,
) -> nn.Module:
    """Parallelize ``model`` on ``device_mesh`` with the named strategy and the model's TP plan.

    ``tp_plan`` overrides the registered plan: a dict ``{module pattern: style name | ParallelStyle}``,
    a dotted path to such a dict or to a function returning one, or a callable
    ``(model, sequence_parallel) -> dict``. Remaining keyword arguments are the strategy's options.
    """
    return prepare(model, device_mesh, strategy, tp_plan, **options).apply()


def get_report(model: nn.Module) -> Mapping[str, Any] | None:
    """What ``parallelize`` did to ``model`` (strategy, options, applied plan), or ``None``."""
    return getattr(model, REPORT_ATTRIBUTE, None)
