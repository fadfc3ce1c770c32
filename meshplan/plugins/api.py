"""Runtime registration and listings (the functions behind ``meshplan.register_*`` / ``list_*``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.errors import MeshplanError
from ..core.plan import ResolvedPlan, resolve_plan
from ..core.registry import Registration, Table
from .manager import get_host, get_registry


def register_strategy(
    strategy: Any, *, name: str | None = None, aliases: tuple[str, ...] = (), priority: int = 0,
    override: bool = False,
) -> None:
    """Register a strategy (class, instance or dotted path) at runtime, above every plugin."""
    get_host().register_runtime("strategy", strategy, name=name, aliases=aliases, priority=priority,
                                override=override)


def register_tp_plan(model_class: type | str, plan: Any, *, priority: int = 0, override: bool = False) -> None:
    """Register a TP plan provider for a model class (class, qualified name, or bare class name).

    ``plan`` is a dict ``{module pattern: style}``, a callable ``(model, sequence_parallel) -> dict``,
    or a dotted path to either.
    """
    get_host().register_runtime("tp_plan", model_class, plan, priority=priority, override=override)


def register_style(name: str, factory: Any, *, priority: int = 0, override: bool = False) -> None:
    """Register a parallel-style name; ``factory()`` must return a new torch ``ParallelStyle``."""
    get_host().register_runtime("style", name, factory, priority=priority, override=override)


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
    from ..core.dispatch import get_strategy

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
