"""Plan sources and normalization: a dict, dotted path or function becomes a plan mapping, and its style names
become fresh torch ``ParallelStyle`` objects.

Finding the plan of each axis (explicit plan, else the providers along the model's MRO) is the planning layer's
job (:mod:`meshplan.planning.resolve`); the plan types live in :mod:`meshplan.core.plans`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..core.errors import PlanError, PlanSourceError
from ..core.imports import import_class_from_path
from ..core.plans import ResolvedPlan, describe_style
from ..core.registry import Registry
from .vocabulary import copy_style, make_style

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

PlanSpec = Mapping[str, "str | ParallelStyle"]

__all__ = ["PlanSpec", "ResolvedPlan", "call_plan_function", "describe_style", "materialize_plan_source",
           "normalize_plan"]


def call_plan_function(fn: Callable[..., Any], model: nn.Module, sequence_parallel: bool,
                       registry: Registry | None = None) -> Any:
    """Call a plan function as ``fn(model, sequence_parallel)``, or ``fn()`` if it takes no arguments; a
    function with a ``registry`` parameter also gets the style registry (``registry=...``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(model, sequence_parallel)
    required = [p for p in params.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return fn()
    extra = {"registry": registry} if registry is not None and "registry" in params else {}
    return fn(model, sequence_parallel, **extra)


def materialize_plan_source(source: Any, model: nn.Module, sequence_parallel: bool, what: str,
                            registry: Registry | None = None) -> PlanSpec:
    """Turn a dict, a dotted path to a dict or function, or a callable into a plan mapping."""
    if isinstance(source, str):
        source = import_class_from_path(source)
        if not (isinstance(source, Mapping) or callable(source)):
            raise PlanSourceError(
                f"{what} points to a {type(source).__name__}; it must name a dict or a function returning one."
            )
    if callable(source) and not isinstance(source, Mapping):
        source = call_plan_function(source, model, sequence_parallel, registry)
    if not isinstance(source, Mapping):
        raise PlanSourceError(
            f"{what} must be a dict of {{module pattern: style}}, a dotted path ('pkg.mod.PLAN') to a dict or "
            f"to a function returning one, or such a function; got {type(source).__name__}."
        )
    return source


def normalize_plan(plan: PlanSpec, registry: Registry) -> dict[str, ParallelStyle]:
    """Style names become new style objects; given style objects are copied; keys are checked."""
    from torch.distributed.tensor.parallel import ParallelStyle  # heavy: imported when a plan is used

    normalized: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        if not isinstance(key, str):
            raise PlanError(f"Plan keys must be module-path strings, got {key!r}.")
        if isinstance(style, ParallelStyle):
            normalized[key] = copy_style(style)
        elif isinstance(style, str):
            normalized[key] = make_style(style, registry)
        else:
            raise PlanError(
                f"Plan entry {key!r} has style {style!r}; expected a style name or a torch ParallelStyle."
            )
    return normalized
