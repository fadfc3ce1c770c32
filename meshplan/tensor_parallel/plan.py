"""Resolve a tensor-parallel plan and normalize it into fresh torch ``ParallelStyle`` objects.

Resolution order: explicit ``tp_plan`` (dict | dotted path | callable) > the provider registered for
the model's class (walking its MRO: qualified name first, bare name second; the Hugging Face
fallback is registered for ``PreTrainedModel`` and so comes last) > :class:`PlanNotFoundError`.

The same providers give expert-parallel plans: a provider may return ``{"tp": ..., "ep": ...}`` (see
:data:`PLAN_AXES`), and ``resolve_plan(..., axis="ep")`` takes the first provider along the MRO with EP entries.
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


#: Axes a plan provider may return entries for. A provider returns either a flat ``{pattern: style}`` mapping
#: (its tensor-parallel plan) or ``{"tp": ..., "ep": ...}``, each value a mapping or a function returning one
#: (called only when that axis is used).
PLAN_AXES = ("tp", "ep")
AXIS_NAMES = {"tp": "tensor-parallel", "ep": "expert-parallel"}


def is_axis_keyed(spec: Any) -> bool:
    """Whether a plan is keyed by axis (``{"tp": ..., "ep": ...}``) rather than by module pattern."""
    return isinstance(spec, Mapping) and bool(spec) and all(key in PLAN_AXES for key in spec)


def axis_part(spec: PlanSpec, axis: str, model: nn.Module, sequence_parallel: bool, what: str,
              registry: Registry | None = None) -> tuple[PlanSpec, str] | None:
    """``(entries, label)`` of a materialized plan for ``axis``, ``label`` naming the function that gave them
    (empty for a mapping); ``None`` when the plan has no entries for ``axis``. A flat plan is a TP plan."""
    if not is_axis_keyed(spec):
        return (spec, "") if axis == "tp" else None
    if axis not in spec:
        return None
    value = spec[axis]
    function = getattr(value, "func", value)  # functools.partial -> the function it calls
    label = "" if isinstance(value, Mapping) else f"[{axis}: {getattr(function, '__name__', type(value).__name__)}]"
    return materialize_plan_source(value, model, sequence_parallel, f"{what}[{axis!r}]", registry), label


def normalize_axis_plan(model: nn.Module, spec: PlanSpec, registry: Registry, axis: str) -> dict[str, ParallelStyle]:
    """:func:`normalize_plan`, after folding an EP plan's per-parameter entries into their experts module."""
    if axis == "ep":
        from ..experts.plan import fold_expert_parameters

        spec = fold_expert_parameters(spec)
    return normalize_plan(spec, registry)


def resolve_plan(
    model: nn.Module, registry: Registry, tp_plan: Any = None, sequence_parallel: bool = False, axis: str = "tp",
) -> ResolvedPlan:
    """Find the plan for ``model`` on ``axis`` (``"tp"`` or ``"ep"``) and normalize it (no matching or
    validation yet).

    ``tp_plan`` is the explicit plan for that axis (an axis-keyed plan gives its ``axis`` entries). Without it,
    providers are looked up along the model's MRO and the first that returns entries for ``axis`` wins, so a
    TP-only provider registered for a subclass does not hide the Hugging Face fallback's EP plan (nor an EP-only
    one its TP plan).
    """
    label = AXIS_NAMES[axis]
    if tp_plan is not None:
        what = f"{axis}_plan"
        spec = materialize_plan_source(tp_plan, model, sequence_parallel, what, registry)
        if is_axis_keyed(spec):
            spec = (axis_part(spec, axis, model, sequence_parallel, what, registry) or ({}, ""))[0]
        source = f"explicit {what} ({tp_plan if isinstance(tp_plan, str) else type(tp_plan).__name__})"
        return ResolvedPlan(normalize_axis_plan(model, spec, registry, axis), source, sequence_parallel)
    for cls, registration in registry.tp_plan_providers(type(model)):
        provider = registration.load()
        what = f"plan provider for {cls.__qualname__} ({registration.target_name()})"
        part = axis_part(materialize_plan_source(provider, model, sequence_parallel, what, registry), axis, model,
                         sequence_parallel, what, registry)
        if part is not None:
            entries, label = part
            source = (f"provider {registration.target_name()}{label} for {cls.__qualname__} from "
                      f"{registration.provenance.describe()}")
            return ResolvedPlan(normalize_axis_plan(model, entries, registry, axis), source, sequence_parallel)
    if axis == "tp":
        raise PlanNotFoundError(
            f"No tensor-parallel plan for {type(model).__qualname__}: pass tp_plan=..., register one with "
            "meshplan.register_tp_plan(ModelClass, plan) or a plugin, or use a model that declares a "
            "Hugging Face `_tp_plan` / `config.base_model_tp_plan`."
        )
    raise PlanNotFoundError(
        f"No {label} plan for {type(model).__qualname__}: pass ep_plan=..., register one with "
        "meshplan.register_tp_plan(ModelClass, {'ep': plan}) or a plugin, or use a model that declares a "
        "Hugging Face `config.base_model_ep_plan`."
    )
