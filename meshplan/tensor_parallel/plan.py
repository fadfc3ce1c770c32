"""Resolve a tensor-parallel plan and normalize it into fresh torch ``ParallelStyle`` objects.

Resolution order: explicit ``tp_plan`` (dict | dotted path | callable) > the provider registered for
the model's class (walking its MRO: qualified name first, bare name second; the Hugging Face
fallback is registered for ``PreTrainedModel`` and so comes last) > :class:`PlanNotFoundError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..core.errors import PlanError, PlanNotFoundError, PlanSourceError
from ..core.imports import import_class_from_path
from ..core.registry import Registry
from .vocabulary import copy_style, make_style

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

PlanSpec = Mapping[str, "str | ParallelStyle"]


@dataclass(frozen=True)
class ResolvedPlan:
    """A normalized plan and where it came from; ``matches`` is filled by validation."""

    styles: dict[str, ParallelStyle]
    source: str
    sequence_parallel: bool = False
    matches: dict[str, list[str]] = field(default_factory=dict)
    replicated_linears: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """The applied plan: per key its style and matched modules, plus Linear layers left replicated."""
        return {
            "source": self.source,
            "sequence_parallel": self.sequence_parallel,
            "entries": [
                {"key": key, "style": describe_style(style), "modules": self.matches.get(key, [])}
                for key, style in self.styles.items()
            ],
            "replicated_linears": list(self.replicated_linears),
        }


def describe_style(style: ParallelStyle) -> str:
    """How a style is shown in reports: its ``repr`` (torch's and meshplan's styles list their layouts); a
    style without its own ``__repr__`` shows its class name, never an object address."""
    if type(style).__repr__ is object.__repr__:
        return f"{type(style).__name__}()"
    return repr(style)


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


def resolve_plan(
    model: nn.Module, registry: Registry, tp_plan: Any = None, sequence_parallel: bool = False
) -> ResolvedPlan:
    """Find the plan for ``model`` and normalize it (no matching or validation yet)."""
    if tp_plan is not None:
        spec = materialize_plan_source(tp_plan, model, sequence_parallel, "tp_plan", registry)
        source = f"explicit tp_plan ({tp_plan if isinstance(tp_plan, str) else type(tp_plan).__name__})"
        return ResolvedPlan(normalize_plan(spec, registry), source, sequence_parallel)
    found = registry.find_tp_plan(type(model))
    if found is None:
        raise PlanNotFoundError(
            f"No tensor-parallel plan for {type(model).__qualname__}: pass tp_plan=..., register one with "
            "meshplan.register_tp_plan(ModelClass, plan) or a plugin, or use a model that declares a "
            "Hugging Face `_tp_plan` / `config.base_model_tp_plan`."
        )
    cls, registration = found
    provider = registration.load()
    what = f"TP plan provider for {cls.__qualname__} ({registration.target_name()})"
    spec = materialize_plan_source(provider, model, sequence_parallel, what, registry)
    source = f"provider {registration.target_name()} for {cls.__qualname__} from {registration.provenance.describe()}"
    return ResolvedPlan(normalize_plan(spec, registry), source, sequence_parallel)
