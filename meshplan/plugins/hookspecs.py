"""Hook specifications: what a meshplan plugin may implement.

Every hook receives a ``register`` callback bound to the plugin whose implementation receives it
(:mod:`meshplan.plugins.registrar`), so meshplan records who contributed what, and new keyword arguments can be
added without breaking old plugins. meshplan calls each hook once through pluggy: hook wrappers
(``@hookimpl(wrapper=True)``) wrap every plugin's implementation. A plugin implementing a hook not specified
here (a misspelled name) fails to load, with the closest hook name in its error.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT_NAME = "meshplan"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class RegisterStrategy(Protocol):
    def __call__(
        self, strategy: Any, *, name: str | None = None, aliases: tuple[str, ...] = (),
        priority: int = 0, override: bool = False,
    ) -> None: ...


class RegisterTPPlan(Protocol):
    def __call__(
        self, model_class: type | str, provider: Any, *, priority: int = 0, override: bool = False
    ) -> None: ...


class RegisterStyle(Protocol):
    def __call__(self, name: str, factory: Any, *, priority: int = 0, override: bool = False) -> None: ...


@hookspec
def meshplan_register_strategies(register: RegisterStrategy) -> None:
    """Register strategies: ``register(StrategyClass | "pkg.mod:StrategyClass", name=..., aliases=...)``."""


@hookspec
def meshplan_register_tp_plans(register: RegisterTPPlan) -> None:
    """Register TP plan providers: ``register("pkg.mod.ModelClass" | ModelClass | "ModelClass", provider)``.

    A provider is a plan dict, a callable ``(model, sequence_parallel) -> plan``, or a dotted path to either.
    """


@hookspec
def meshplan_register_styles(register: RegisterStyle) -> None:
    """Register parallel-style names: ``register("colwise", factory)``; ``factory()`` returns a new style."""
