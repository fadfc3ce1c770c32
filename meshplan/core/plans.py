"""The plan types every axis shares: resolved -> matched -> fitted, and the plan set a strategy receives.

* :class:`ResolvedPlan`: a plan found (explicit, or a provider's) and normalized into fresh style objects; its
  keys are not yet matched to modules (what :func:`meshplan.get_tp_plan` returns).
* :class:`MatchedPlan`: every key matched to the modules it selects (keys matching nothing dropped or refused),
  style/module types and tied parameters checked.
* :class:`FittedPlan`: a matched plan fitted to the size of its axis (head counts, KV-head replication, modules a
  style leaves whole): what a strategy applies.
* :class:`PlanSet`: the fitted plan of each axis in use (``tp``, ``ep``) and the pipeline helper's ``pp`` data,
  built once per ``prepare`` by :mod:`meshplan.planning`.

Pure data: nothing here imports an axis, so strategies and every layer can name these types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle


def describe_style(style: ParallelStyle) -> str:
    """How a style is shown in reports: its ``repr`` (torch's and meshplan's styles list their layouts); a
    style without its own ``__repr__`` shows its class name, never an object address."""
    if type(style).__repr__ is object.__repr__:
        return f"{type(style).__name__}()"
    return repr(style)


@dataclass(frozen=True)
class ResolvedPlan:
    """A normalized plan and where it came from, not yet matched to modules (``matches`` is empty)."""

    styles: dict[str, ParallelStyle]
    source: str
    sequence_parallel: bool = False
    matches: dict[str, list[str]] = field(default_factory=dict)
    replicated_linears: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """The plan: per key its style and matched modules, plus Linear layers left replicated."""
        return {
            "source": self.source,
            "sequence_parallel": self.sequence_parallel,
            "entries": [
                {"key": key, "style": describe_style(style), "modules": self.matches.get(key, [])}
                for key, style in self.styles.items()
            ],
            "replicated_linears": list(self.replicated_linears),
        }


@dataclass(frozen=True)
class MatchedPlan(ResolvedPlan):
    """A plan whose keys are matched to modules (``matches``: key -> module names, none empty) and checked."""

    def fitted(self, axis: str, size: int, **changes: Any) -> FittedPlan:
        """This plan, with ``changes``, as fitted to ``size`` ranks of ``axis``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes
        return FittedPlan(**values | {"axis": axis, "size": size})


@dataclass(frozen=True)
class FittedPlan(MatchedPlan):
    """A matched plan fitted to ``size`` ranks of ``axis`` (``"tp"``, ``"ep"``): ready to apply."""

    axis: str = "tp"
    size: int = 1


@dataclass(frozen=True)
class PlanSet:
    """The plans of one ``prepare``, per axis: ``tp`` and ``ep`` (``None`` when the axis is off), and ``pp``,
    the pipeline entry of the plan providers passed through untouched (``None`` without a pipeline axis)."""

    tp: FittedPlan | None = None
    ep: FittedPlan | None = None
    pp: Any = None

    def report(self) -> dict[str, Any]:
        """``{"plan": ..., "ep_plan": ...}`` as ``meshplan.get_report`` shows them."""
        return {"plan": None if self.tp is None else self.tp.report(),
                "ep_plan": None if self.ep is None else self.ep.report()}
