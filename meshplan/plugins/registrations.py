"""Typed registrations: one builder per hook kind, behind both the plugins' ``register`` callbacks and the
runtime ``meshplan.register_*`` functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..core.errors import RegistrationError
from ..core.registry import Provenance, Registration, class_key


def strategy_registration(
    provenance: Provenance, strategy: Any, name: str | None = None, *, aliases: Sequence[str] = (),
    priority: int = 0, override: bool = False,
) -> Registration:
    """A strategy registration; ``name`` and ``aliases`` default to the strategy class's own."""
    aliases = tuple(aliases or ())
    if name is None:
        if isinstance(strategy, str):
            raise RegistrationError(f"Registering strategy {strategy!r} by path needs name=...")
        name = getattr(strategy, "name", None)
        aliases = aliases or tuple(getattr(strategy, "aliases", ()))
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"Strategy {strategy!r} has no name; pass name=... to register().")
    return Registration("strategy", name, strategy, provenance, int(priority), bool(override), aliases)


def tp_plan_registration(
    provenance: Provenance, model_class: type | str, provider: Any, *, priority: int = 0, override: bool = False,
) -> Registration:
    """A TP plan provider registration for a model class (class, qualified name or bare class name)."""
    return Registration("tp_plan", class_key(model_class), provider, provenance, int(priority), bool(override))


def style_registration(
    provenance: Provenance, name: str, factory: Any, *, priority: int = 0, override: bool = False,
) -> Registration:
    """A parallel-style name registration; ``factory()`` returns a new torch ``ParallelStyle``."""
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"A parallel style needs a non-empty name, got {name!r}.")
    return Registration("style", name, factory, provenance, int(priority), bool(override))


#: registration hook -> the typed builder behind the ``register`` callback it receives
HOOKS: tuple[tuple[str, Callable[..., Registration]], ...] = (
    ("meshplan_register_styles", style_registration),
    ("meshplan_register_strategies", strategy_registration),
    ("meshplan_register_tp_plans", tp_plan_registration),
)
