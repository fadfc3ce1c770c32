"""Run a pre-contract strategy (no ``supports``) for one release, with a ``DeprecationWarning``.

Before the axis contract a strategy took ``parallelize(self, model, roles, plan, options)`` (and ``ep_plan=None``
for expert parallelism) and ``validate`` the same, returning nothing. :class:`LegacyStrategy` presents such a
strategy through the contract: its axes are inferred the old way (TP always, CP when its options have a ``cp``
role, EP when its options have ``ep_size`` and its ``parallelize`` an ``ep_plan`` keyword) and it is called with
``plans.tp`` (and ``ep_plan=plans.ep``). The adapter, and the signature reading it needs, go away in 0.3.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

from torch import nn

from ..core.errors import UnsupportedConfigurationError
from ..core.plans import PlanSet
from ..core.roles import MeshRoles
from ..core.strategy import Strategy, StrategyOptions

REMOVED_IN = "0.3"


class LegacyStrategy:
    """The contract's face of a pre-contract strategy (see the module docstring)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.options_class = strategy.options_class
        self.takes_ep_plan = "ep_plan" in _parameters(strategy.parallelize)
        self.validate_takes_ep_plan = "ep_plan" in _parameters(strategy.validate)
        fields = {f.name for f in dataclasses.fields(strategy.options_class)}
        try:
            has_cp_role = "cp" in strategy.options_class().mesh_roles()
        except TypeError:  # options without defaults: no inference possible, CP stays off
            has_cp_role = False
        ep = "ep_size" in fields and self.takes_ep_plan
        self.supports = frozenset({"tp"} | ({"cp"} if has_cp_role else set()) | ({"ep"} if ep else set()))
        warnings.warn(
            f"Strategy {strategy.name!r} ({type(strategy).__module__}.{type(strategy).__qualname__}) has no "
            "`supports` declaration: it runs through the pre-contract adapter, which is removed in meshplan "
            f"{REMOVED_IN}. Declare `supports = frozenset({sorted(self.supports)})` and take "
            "`validate(self, model, roles, plans, options)` / `parallelize(self, model, roles, plans, options, "
            "validated)` (plans.tp, plans.ep); see the README's 'Writing a strategy'.",
            DeprecationWarning, stacklevel=4)

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions) -> None:
        self.strategy.validate(model, roles, plans.tp, options,
                               **(self._expert(plans) if self.validate_takes_ep_plan else {}))

    def parallelize(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                    validated: Any) -> nn.Module:
        return self.strategy.parallelize(model, roles, plans.tp, options, **self._expert(plans))

    def _expert(self, plans: PlanSet) -> dict[str, Any]:
        return {"ep_plan": plans.ep} if plans.ep is not None else {}


def refuse_pre_contract_methods(strategy: Strategy) -> None:
    """:class:`UnsupportedConfigurationError` for a strategy that declares ``supports`` (so it is called through the
    contract) but whose ``validate`` / ``parallelize`` keep the pre-contract signature, e.g. a subclass of a built-in
    strategy overriding ``parallelize(self, model, roles, plan, options)``: it would otherwise fail mid-way with a
    bare ``TypeError``. Reads signatures only, so it raises the same on every rank before any collective."""
    for method, arguments in (("validate", 4), ("parallelize", 5)):
        try:
            inspect.signature(getattr(strategy, method)).bind(*range(arguments))
        except ValueError:  # no signature to read (a C function): nothing to check
            continue
        except TypeError as error:
            raise UnsupportedConfigurationError(
                f"Strategy {strategy.name!r} ({type(strategy).__qualname__}) declares supports="
                f"{sorted(strategy.supports)} but its {method}() does not take the contract's arguments ({error}): "
                "take `validate(self, model, roles, plans, options)` and `parallelize(self, model, roles, plans, "
                "options, validated)` (plans.tp, plans.ep, plans.pp); see the README's 'Writing a strategy'."
            ) from None


def _parameters(function: Any) -> Any:
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
