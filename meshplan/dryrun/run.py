"""``meshplan explain``: run the real parallelize path on the meta device with a fake world of any size.

The model is built on the meta device (no memory, no weights), a fake process group of the mesh's
size stands in for the cluster, and ``meshplan.prepare(...).apply()`` runs exactly as in a training
job: same strategy lookup, plan resolution, validation and strategy code. The result is a report
(a JSON-ready dict, schema in ``docs/explain.md``) of what was decided and what each rank would hold.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..api import get_report, get_strategy, prepare
from ..core.errors import MeshplanError, OptionsError
from ..core.fake_pg import fake_process_group
from ..core.strategy import Strategy
from ..plugins.manager import get_registry
from .all_ranks import AllRanks, RankLayoutUnknown, all_ranks, fsdp_sharded_parameters, mesh_coordinates, rank_groups
from .balance import imbalance_note, replicated_parameters
from .large_world import large_world_shortcuts
from .layout import ParamLayout, fsdp_units, memory, param_layouts
from .meshspec import build_mesh, parse_mesh_spec, world_size
from .modelsource import build_model, resolve_source
from .name_summary import summarize_names
from .pipeline_ranks import pipeline_all_ranks, pipeline_section, pp_slices
from .shared_ranks import share_rank_list
from .values import json_value

#: Roles whose ranks should each hold a different piece of every matrix.
MODEL_PARALLEL_ROLES = ("tp", "ep")

SCHEMA = "meshplan.explain/2"

#: ``--precision``: the dtype parameters are stored in, and whether to ask the strategy for no casting.
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "bf16-mixed": (torch.float32, False),  # fp32 master weights; the strategy's default mixed precision
    "fp32": (torch.float32, True),
    "bf16": (torch.bfloat16, True),
}
PHASES = ("model", "mesh", "strategy", "prepare", "apply", "inspect")


class _Phases:
    """Times each phase and remembers which one was running when something failed."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.current = ""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current, start = name, time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back on after, if it was on).

    A dry run allocates a whole model of modules, parameters, DTensor specs and FSDP states that stay alive until
    it returns, so automatic collections inside it free next to nothing; but once enough of those objects pile up,
    CPython runs a full collection that traverses every object of the process (torch and transformers included:
    ~0.2 s), and whether it falls inside the run depended on how many objects the run happened to create. Cyclic
    garbage made in the block is collected by the next automatic collection after it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _error(exc: BaseException, phase: str) -> dict[str, Any]:
    return {"phase": phase, "type": type(exc).__name__, "message": str(exc),
            "exit_code": 2 if isinstance(exc, MeshplanError) else 1}


def _precision_options(strategy: Any, precision: str) -> dict[str, Any]:
    """``mp_policy`` for strategies that take one, when the precision asks for no casting."""
    no_cast = PRECISIONS[precision][1]
    if not no_cast or "mp_policy" not in {o.name for o in strategy.describe_options()}:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy  # loaded on use: keeps start-up light

    return {"mp_policy": MixedPrecisionPolicy()}


def _strategy_section(strategy: Any) -> dict[str, Any]:
    registration = get_registry().strategies.find(strategy.name)
    provenance = registration.provenance if registration is not None else None
    return {
        "name": strategy.name,
        "description": strategy.description,
        "provenance": provenance.describe() if provenance else "passed as an object",
        "plugin": provenance.plugin if provenance else None,
        "distribution": provenance.distribution if provenance else None,
        "version": provenance.version if provenance else None,
    }


def _entries(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A plan's entries with their matched modules summarized."""
    return [{"key": e["key"], "style": e["style"], "count": len(e["modules"]),
             "modules": summarize_names(e["modules"])} for e in plan["entries"]]


def _plan_section(plan: Mapping[str, Any] | None, tp_size: int) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "source": plan["source"],
        "sequence_parallel": plan["sequence_parallel"],
        "tp_size": tp_size,
        "entries": _entries(plan),
        "replicated_linears": {"count": len(plan["replicated_linears"]),
                               "modules": summarize_names(plan["replicated_linears"])},
    }


def _ep_plan_section(plan: Mapping[str, Any] | None, ep_size: int) -> dict[str, Any] | None:
    """The expert-parallel plan as applied (``None`` without EP)."""
    if plan is None:
        return None
    return {"source": plan["source"], "ep_size": ep_size, "entries": _entries(plan)}


def _group_units(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Units with identical numbers (repeated layers) become one row with a summarized module pattern."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for unit in units:
        key = tuple(v for k, v in unit.items() if k != "module")
        groups.setdefault(key, []).append(unit)
    rows = []
    for members in groups.values():
        for summary in summarize_names(u["module"] for u in members):
            rows.append({"modules": summary["pattern"], "count": summary["count"]}
                        | {k: v for k, v in members[0].items() if k != "module"})
    return rows


def _all_ranks(report: dict[str, Any], compute: Callable[[], AllRanks], layouts: list[ParamLayout]
               ) -> AllRanks | None:
    """Every rank's elements (``compute()``), checked against this rank's real shards (``layouts``); ``None`` (and
    a note) when unknown."""
    try:
        spread = compute()
    except RankLayoutUnknown as exc:
        report["notes"].append(f"The worst rank is not reported: {exc}")
        return None
    rank = torch.distributed.get_rank()
    computed = spread.local_by_name(rank)
    wrong = [p for p in layouts if computed.get(p.name) != p.local]
    if wrong:
        report["notes"].append(
            f"The all-rank computation disagrees with rank {rank}'s real shards for {len(wrong)} parameters, e.g. "
            f"{wrong[0].name} (computed {computed.get(wrong[0].name)}, real {wrong[0].local}); max_local is "
            "not reported.")
        return None
    return spread


def _model_parallel_meshes(roles: Any) -> dict[str, Any]:
    """``{role: 1-D sub-mesh}`` of the tensor- and expert-parallel roles larger than 1."""
    meshes = {role: getattr(roles, role, None) for role in MODEL_PARALLEL_ROLES}
    return {role: mesh for role, mesh in meshes.items() if mesh is not None and mesh.size() > 1}


def _without_pp(model: nn.Module, device_mesh: Any, pp_mesh: Any, strategy: Strategy, tp_plan: Any,
                options: Mapping[str, Any]) -> nn.Module:
    """``model`` parallelized on the shown rank's slice of the mesh without the pp dim (every stage's parameters
    are laid out as they are there); unchanged when the mesh has no other dim."""
    from ..api import prepare

    pp_dims = set(pp_mesh.mesh_dim_names or ())
    others = tuple(n for n in device_mesh.mesh_dim_names or () if n not in pp_dims)
    if not others:
        return model
    return prepare(model, device_mesh[others], strategy, tp_plan, **options).apply()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def explain(
    model: str,
    mesh: str | Mapping[str, int],
    strategy: str | Strategy = "fsdp2",
    *,
    tp_plan: Any = None,
    sequence_parallel: bool = False,
    overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    precision: str = "bf16-mixed",
    rank: int = 0,
    ep_size: int | None = None,
    raise_errors: bool = True,
) -> dict[str, Any]:
    """Dry-run ``meshplan.parallelize`` for ``model`` on ``mesh`` and report what every rank would hold.

    Args:
        model: a config.json path (or folder), a preset name (``meshplan presets``) or a model_type.
        mesh: ``"dp_replicate=8,dp_shard=256,tp=8"`` or ``{"dp_shard": 256, "tp": 8}``, outermost first.
        strategy: registered strategy name (or a :class:`~meshplan.Strategy` instance).
        tp_plan: as for :func:`meshplan.parallelize` (dict, dotted path or callable).
        sequence_parallel: ask the plan provider for its sequence-parallel variant.
        overrides: config overrides (dotted keys reach nested configs).
        options: further strategy options.
        precision: ``bf16-mixed`` (fp32 storage, strategy default mixed precision), ``fp32`` or ``bf16``.
        rank: the rank whose shards are measured (the worst rank over all ranks is reported as well).
        ep_size: expert-parallel size, passed to the strategy as its ``ep_size`` option (same as
            ``options={"ep_size": n}``; a strategy without that option rejects it).
        raise_errors: re-raise a failure (else it is recorded under ``"error"`` and the report returned).

    Returns:
        The report; its schema is documented in ``docs/explain.md``.
    """
    phases = _Phases()
    report: dict[str, Any] = {"schema": SCHEMA, "model": None, "mesh": None, "strategy": None, "plan": None,
                              "ep_plan": None, "pipeline": None,
                              "replicated_parameters": None, "fsdp_units": [], "memory": None, "notes": [],
                              "timings_s": phases.timings, "error": None}
    options = dict(options or {})
    if ep_size is not None:
        options["ep_size"] = ep_size
    with _collector_paused():
        try:
            with phases("mesh"):
                dims = parse_mesh_spec(mesh)
            with phases("model"):
                if precision not in PRECISIONS:
                    raise OptionsError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
                source = resolve_source(model)
                dtype = PRECISIONS[precision][0]
                built = build_model(source, overrides, device="meta", dtype=dtype)
                total = _count(built)
                report["model"] = {"name": model, "origin": source.origin, "model_type": source.model_type,
                                   "class": type(built).__qualname__, "parameters": total,
                                   "dtype": str(dtype).removeprefix("torch."), "overrides": dict(overrides or {})}
            phases.current = "mesh"  # creating the fake world is part of building the mesh
            with fake_process_group(world_size(dims), rank), large_world_shortcuts():
                _explain_in_world(report, phases, built, dims, strategy, tp_plan, sequence_parallel, options,
                                  precision, total)
        except Exception as exc:
            report["error"] = _error(exc, phases.current)
            if raise_errors:
                raise
    return report


def _context_parallel_section(model: nn.Module, prepared: Any) -> dict[str, Any] | None:
    """How the sequence is split when the ``cp`` role is larger than 1 (``None`` otherwise)."""
    size = prepared.roles.size("cp")
    if size == 1:
        return None
    return {"size": size, "implementation": getattr(prepared.options, "cp_implementation", None),
            "attention": getattr(model, "_meshplan_cp_inner", None), "sequence_multiple": 2 * size}


def _explain_in_world(
    report: dict[str, Any], phases: _Phases, model: nn.Module, dims: dict[str, int], strategy_arg: str | Strategy,
    tp_plan: Any, sequence_parallel: bool, options: Mapping[str, Any], precision: str, total: int,
) -> None:
    """The part of :func:`explain` that runs inside the fake world (fills ``report`` as it goes)."""
    with phases("mesh"):
        device_mesh = build_mesh(dims, "cpu")
        share_rank_list(device_mesh)  # one tuple of the world's ranks for every mesh derived from it
        report["mesh"] = {"dims": dims, "world_size": device_mesh.size(), "rank": torch.distributed.get_rank(),
                          "coordinate": dict(zip(dims, device_mesh.get_coordinate() or ())),
                          "roles": {}}
    with phases("strategy"):
        strategy = strategy_arg if isinstance(strategy_arg, Strategy) else get_strategy(strategy_arg)
        report["strategy"] = _strategy_section(strategy)
        chosen = {**_precision_options(strategy, precision), **options}
        if sequence_parallel:
            chosen["sequence_parallel"] = True
    with phases("prepare"):
        prepared = prepare(model, device_mesh, strategy, tp_plan, **chosen)
        report["mesh"]["roles"] = prepared.roles.describe()
        report["strategy"]["options"] = {k: json_value(v) for k, v in vars(prepared.options).items()}
    pp = prepared.roles.size("pp")
    reference = copy.deepcopy(model) if pp > 1 else None  # the whole model, laid out without pp (meta: cheap)
    with phases("apply"):
        model = prepared.apply()
        report["mesh"]["context_parallel"] = _context_parallel_section(model, prepared)
        if reference is not None:
            reference = _without_pp(reference, device_mesh, prepared.roles.pp, strategy, tp_plan, chosen)
    with phases("inspect"):
        applied = get_report(model) or {}
        report["plan"] = _plan_section(applied.get("plan"), prepared.tp_size)
        report["ep_plan"] = _ep_plan_section(applied.get("ep_plan"), prepared.roles.size("ep"))
        parallel = _model_parallel_meshes(prepared.roles)
        tp_dims = {n for m in parallel.values() for n in m.mesh_dim_names or ()}
        layouts = param_layouts(model, tp_dims)
        units = fsdp_units(model, layouts)
        report["fsdp_units"] = _group_units(units)
        world = device_mesh.size()
        names = tuple(device_mesh.mesh_dim_names or ())
        if reference is None:
            everything, named = layouts, layouts
            spread = _all_ranks(report, lambda: all_ranks(model.named_parameters(), world,
                                                          fsdp_sharded_parameters(model)), layouts)
        else:
            everything = param_layouts(reference, tp_dims)
            named = [dataclasses.replace(p, name=model.original_name(p.name)) for p in layouts]
            plan = model.pipeline_plan
            pp_dim = (prepared.roles.pp.mesh_dim_names or ("pp",))[0]
            coordinate, counterpart = pp_slices(device_mesh, pp_dim, report["mesh"]["coordinate"][pp_dim])
            spread = _all_ranks(report, lambda: pipeline_all_ranks(
                all_ranks(reference.named_parameters(), world, fsdp_sharded_parameters(reference)), plan,
                coordinate, counterpart), named)
            report["pipeline"] = pipeline_section(plan, spread, everything, coordinate)
        report["memory"] = memory(named, units, total, spread, lambda r: {
            name: int(c[r]) for name, c in zip(names, mesh_coordinates(device_mesh, world))},
            everything=everything, pp=pp)
        if spread is not None:
            report["replicated_parameters"] = replicated_parameters(spread, {
                role: (mesh.size(), rank_groups(mesh, world)[0]) for role, mesh in parallel.items()})
            note = imbalance_note(spread, total, report["memory"]["parameters"]["shards"])
            if note:
                report["notes"].append(note)
        after = sum(p.numel for p in everything)
        if after != total:
            report["notes"].append(f"The model has {after:,} parameter elements after parallelize but {total:,} "
                                   "before: a tied weight was probably split into two parameters.")
        if not units:
            report["notes"].append(f"Strategy {strategy.name!r} created no FSDP units.")
        if precision == "bf16-mixed" and "mp_policy" not in {o.name for o in strategy.describe_options()}:
            report["notes"].append(f"Strategy {strategy.name!r} has no mp_policy option: parameters are "
                                   "computed in their storage dtype.")
