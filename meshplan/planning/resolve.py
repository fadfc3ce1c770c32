"""Find the plan of every axis in use, calling each plan provider at most once.

Per axis: the explicit plan (``tp_plan=`` / ``ep_plan=``: a dict, a dotted path to a dict or function, or a
function; an axis-keyed one gives its entries for that axis), else the providers registered for the model's class
along its MRO (qualified name first, bare name second; the Hugging Face fallback is registered for
``PreTrainedModel`` and so comes last): the first provider with entries for the axis wins, so a TP-only provider
for a subclass does not hide the fallback's EP plan. A provider returns either a flat ``{pattern: style}`` mapping
(its TP plan) or ``{"tp": ..., "ep": ..., "pp": ...}`` (:data:`PLAN_AXES`), each value a mapping or a function
returning one, called only when that axis is used. The ``pp`` entry is not interpreted here: it is handed to the
pipeline axis as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..core.errors import ExpertParallelError, PlanNotFoundError
from ..core.plans import ResolvedPlan
from ..core.registry import Registry
from ..tensor_parallel.plan import PlanSpec, materialize_plan_source, normalize_plan

#: Axes a plan provider may return entries for (``{"tp": ..., "ep": ..., "pp": ...}``).
PLAN_AXES = ("tp", "ep", "pp")
AXIS_NAMES = {"tp": "tensor-parallel", "ep": "expert-parallel", "pp": "pipeline-parallel"}
#: Axes whose entries are passed through as given (the axis interprets them itself).
RAW_AXES = ("pp",)


def is_axis_keyed(spec: Any) -> bool:
    """Whether a plan is keyed by axis (``{"tp": ..., "ep": ...}``) rather than by module pattern."""
    return isinstance(spec, Mapping) and bool(spec) and all(key in PLAN_AXES for key in spec)


def _axis_entries(spec: PlanSpec, axis: str, model: nn.Module, sequence_parallel: bool, what: str,
                  registry: Registry) -> tuple[Any, str] | None:
    """``(entries, label)`` of a materialized plan for ``axis``, ``label`` naming the function that gave them
    (empty for a mapping); ``None`` when the plan has no entries for ``axis``. A flat plan is a TP plan. Entries of
    a :data:`RAW_AXES` axis are returned as given."""
    if not is_axis_keyed(spec):
        return (spec, "") if axis == "tp" else None
    if axis not in spec:
        return None
    value = spec[axis]
    if axis in RAW_AXES:
        return value, ""
    function = getattr(value, "func", value)  # functools.partial -> the function it calls
    label = "" if isinstance(value, Mapping) else f"[{axis}: {getattr(function, '__name__', type(value).__name__)}]"
    return materialize_plan_source(value, model, sequence_parallel, f"{what}[{axis!r}]", registry), label


def _normalized(model: nn.Module, axis: str, entries: Any, source: str, registry: Registry,
                sequence_parallel: bool) -> Any:
    """A :class:`ResolvedPlan` of ``entries`` (an EP plan's per-parameter entries folded into their experts
    module first); the entries themselves for a :data:`RAW_AXES` axis."""
    if axis in RAW_AXES:
        return entries
    if axis == "ep":
        from ..experts.plan import fold_expert_parameters  # the experts' styles: imported when EP is used

        entries = fold_expert_parameters(entries)
    return ResolvedPlan(normalize_plan(entries, registry), source, sequence_parallel)


def resolve_plans(model: nn.Module, registry: Registry, explicit: Mapping[str, Any],
                  sequence_parallel: bool = False, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``{axis: plan}`` for each axis of ``explicit`` (``{axis: explicit plan or None}``): a
    :class:`ResolvedPlan` for ``tp`` / ``ep``, the provider's entry as given for ``pp``. Each provider is called
    at most once. A ``tp`` or ``ep`` plan found nowhere raises :class:`PlanNotFoundError` (for ``ep``:
    :class:`ExpertParallelError` when the model has no experts; ``sizes`` gives the axis sizes for its message);
    a missing ``pp`` entry is left out."""
    resolved: dict[str, Any] = {}
    for axis, spec in explicit.items():
        if spec is None:
            continue
        what = f"{axis}_plan"
        entries = spec if axis in RAW_AXES else materialize_plan_source(spec, model, sequence_parallel, what, registry)
        if is_axis_keyed(entries):
            entries = (_axis_entries(entries, axis, model, sequence_parallel, what, registry) or ({}, ""))[0]
        source = f"explicit {what} ({spec if isinstance(spec, str) else type(spec).__name__})"
        resolved[axis] = _normalized(model, axis, entries, source, registry, sequence_parallel)
    missing = [axis for axis in explicit if axis not in resolved]
    for cls, registration in registry.tp_plan_providers(type(model)) if missing else ():
        what = f"plan provider for {cls.__qualname__} ({registration.target_name()})"
        spec = materialize_plan_source(registration.load(), model, sequence_parallel, what, registry)
        for axis in list(missing):
            part = _axis_entries(spec, axis, model, sequence_parallel, what, registry)
            if part is None:
                continue
            entries, label = part
            source = (f"provider {registration.target_name()}{label} for {cls.__qualname__} from "
                      f"{registration.provenance.describe()}")
            resolved[axis] = _normalized(model, axis, entries, source, registry, sequence_parallel)
            missing.remove(axis)
        if not missing:
            break
    for axis in missing:
        if axis not in RAW_AXES:
            raise _not_found(model, axis, (sizes or {}).get(axis, 1))
    return resolved


def resolve_plan(model: nn.Module, registry: Registry, plan: Any = None, sequence_parallel: bool = False,
                 axis: str = "tp") -> ResolvedPlan:
    """The plan of one axis (``"tp"`` or ``"ep"``): :func:`resolve_plans` for that axis alone."""
    return resolve_plans(model, registry, {axis: plan}, sequence_parallel)[axis]


def _not_found(model: nn.Module, axis: str, size: int) -> PlanNotFoundError | ExpertParallelError:
    name = type(model).__qualname__
    if axis == "tp":
        return PlanNotFoundError(
            f"No tensor-parallel plan for {name}: pass tp_plan=..., register one with "
            "meshplan.register_tp_plan(ModelClass, plan) or a plugin, or use a model that declares a "
            "Hugging Face `_tp_plan` / `config.base_model_tp_plan`."
        )
    error = PlanNotFoundError(
        f"No {AXIS_NAMES[axis]} plan for {name}: pass ep_plan=..., register one with "
        "meshplan.register_tp_plan(ModelClass, {'ep': plan}) or a plugin, or use a model that declares a "
        "Hugging Face `config.base_model_ep_plan`."
    )
    from ..experts.plan import missing_plan_error  # the experts' module scan: imported when EP is used

    return missing_plan_error(model, size, error)
