"""The public facade: ``parallelize``, ``prepare``, strategy lookup, runtime registration and listings.

Everything here works on the process-wide registry that the plugin layer fills on first use; the
machinery itself lives in :mod:`meshplan.planning` (dispatch, plans), :mod:`meshplan.core` (contracts, registry)
and :mod:`meshplan.plugins` (discovery).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from .core.errors import MeshplanError, UnknownStrategyError
from .core.naming import did_you_mean
from .core.plans import ResolvedPlan
from .core.registry import Registration, Table, class_key
from .core.strategy import Strategy, declared_axes
from .planning import dispatch
from .planning.dispatch import Prepared, get_report
from .planning.resolve import resolve_plan
from .plugins.manager import get_host, get_registry

__all__ = [
    "Prepared", "get_report", "get_strategy", "get_tp_plan", "list_plugins", "list_strategies", "list_styles",
    "list_tp_plans", "parallelize", "parallelize_megatron_fsdp", "prepare", "register_strategy", "register_style",
    "register_tp_plan", "unregister_tp_plan",
]


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name`` (aliases, case and ``-``/``_`` insensitive), as an instance."""
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


def prepare(
    model: nn.Module, device_mesh: DeviceMesh, strategy: str | Strategy = "fsdp2", tp_plan: Any = None,
    ep_plan: Any = None, **options: Any,
) -> Prepared:
    """Resolve and validate everything; no collective runs and the model is not modified."""
    chosen = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
    return dispatch.prepare(model, device_mesh, chosen, get_registry(), tp_plan, ep_plan, **options)


def parallelize(
    model: nn.Module, device_mesh: DeviceMesh, strategy: str | Strategy = "fsdp2", tp_plan: Any = None,
    ep_plan: Any = None, **options: Any,
) -> nn.Module:
    """Parallelize ``model`` on ``device_mesh`` with the named strategy and the model's TP plan.

    ``tp_plan`` overrides the registered plan: a dict ``{module pattern: style name | ParallelStyle}``,
    a dotted path to such a dict or to a function returning one, or a callable
    ``(model, sequence_parallel) -> dict``. ``ep_plan`` does the same for expert parallelism (used with the
    ``ep_size`` option; e.g. ``{"layers.*.mlp.experts": "ep_dispatch_experts"}``). Remaining keyword arguments
    are the strategy's options.
    """
    return prepare(model, device_mesh, strategy, tp_plan, ep_plan, **options).apply()


def parallelize_megatron_fsdp(
    model: nn.Module, device_mesh: DeviceMesh, optimizer: Optimizer | None = None, tp_plan: Any = None,
    **options: Any,
) -> tuple[nn.Module, Optimizer | None]:
    """``meshplan.parallelize(..., strategy="megatron_fsdp")`` returning ``(model, optimizer)``.

    ``optimizer`` is wrapped in place (the same object is returned); ``None`` returns ``None``. The other
    keyword arguments are :class:`~meshplan.strategies.megatron_fsdp.MegatronFSDPOptions` fields.
    """
    prepared = prepare(model, device_mesh, "megatron_fsdp", tp_plan, optimizer=optimizer, **options)
    wrapped = prepared.apply()
    return wrapped, optimizer


def register_strategy(
    strategy: Any, *, name: str | None = None, aliases: tuple[str, ...] = (), priority: int = 0,
    override: bool = False,
) -> None:
    """Register a strategy (class, instance or dotted path) at runtime, above every plugin."""
    get_host().register_strategy(strategy, name, aliases=aliases, priority=priority, override=override)


def register_tp_plan(model_class: type | str, plan: Any, *, priority: int = 0, override: bool = False) -> None:
    """Register a TP plan provider for a model class (class, qualified name, or bare class name).

    ``plan`` is a dict ``{module pattern: style}``, a callable ``(model, sequence_parallel) -> dict``,
    or a dotted path to either.
    """
    get_host().register_tp_plan(model_class, plan, priority=priority, override=override)


def unregister_tp_plan(model_class: type | str) -> bool:
    """Remove every TP plan provider registered for exactly ``model_class`` (class, qualified name, or bare
    class name as it was registered), built-in and plugin ones included, until plugins are discovered again.

    Returns whether anything was removed. Providers of the class's bases still apply (MRO lookup).
    """
    return bool(get_host().unregister("tp_plan", class_key(model_class)))


def register_style(name: str, factory: Any, *, priority: int = 0, override: bool = False) -> None:
    """Register a parallel-style name; ``factory()`` must return a new torch ``ParallelStyle``."""
    get_host().register_style(name, factory, priority=priority, override=override)


def get_tp_plan(model: nn.Module, sequence_parallel: bool = False, tp_plan: Any = None) -> ResolvedPlan:
    """The normalized plan ``parallelize`` would use for ``model`` (not yet matched or validated)."""
    return resolve_plan(model, get_registry(), tp_plan, sequence_parallel)


def _status(table: Table, reg: Registration) -> tuple[str, str | None]:
    """Whether a registration is the active one for its key, shadowed, or in conflict."""
    try:
        winner = table.find(reg.key)
    except MeshplanError as exc:
        return "conflict", str(exc)
    return ("active", None) if winner is reg or (winner and winner.target_id == reg.target_id) else (
        "shadowed", None)


def _entry(table: Table, reg: Registration) -> dict[str, Any]:
    status, error = _status(table, reg)
    return {
        "key": reg.key, "target": reg.target_name(), "plugin": reg.provenance.plugin,
        "tier": reg.provenance.tier.name.lower(), "distribution": reg.provenance.distribution,
        "version": reg.provenance.version, "priority": reg.priority, "override": reg.override,
        "status": status, "error": error,
    }


def list_strategies() -> list[dict[str, Any]]:
    """Every registered strategy with aliases, provenance, options and availability here."""
    table = get_registry().strategies
    rows = []
    for reg in table.registrations():
        row = _entry(table, reg) | {"name": reg.key, "aliases": list(reg.aliases)}
        try:
            strategy = get_strategy(reg.key) if row["status"] == "active" else None
        except MeshplanError as exc:
            row |= {"status": "broken", "error": str(exc)}
            strategy = None
        if strategy is not None:
            row["description"] = strategy.description
            declared = declared_axes(strategy)
            row["supports"] = None if declared is None else sorted(declared)
            row["options"] = [
                {"name": o.name, "type": o.type, "default": repr(o.default)} for o in strategy.describe_options()
            ]
            row["unavailable_reason"] = strategy.unavailable_reason()
        rows.append(row)
    return sorted(rows, key=lambda r: r["name"])


def list_tp_plans() -> list[dict[str, Any]]:
    """Every registered TP plan provider (model class -> provider) with provenance."""
    table = get_registry().tp_plans
    rows = [_entry(table, reg) | {"model_class": reg.key} for reg in table.registrations()]
    return sorted(rows, key=lambda r: r["model_class"])


def list_styles() -> list[dict[str, Any]]:
    """Every registered parallel-style name."""
    table = get_registry().styles
    return sorted((_entry(table, reg) | {"name": reg.key} for reg in table.registrations()),
                  key=lambda r: r["name"])


def list_plugins() -> list[dict[str, Any]]:
    """Every plugin seen: loaded, failed (with the error), disabled, or not in the allow-list."""
    return [record.as_dict() for record in get_host().records.values()]
