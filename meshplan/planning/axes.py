"""Which parallel axes a ``prepare`` asks for, and the refusal of those its strategy does not declare."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.distributed.device_mesh import DeviceMesh

from ..core.axis_options import ExpertParallelOptions
from ..core.errors import UnsupportedAxisError, UnsupportedConfigurationError
from ..core.mesh import dim_names
from ..core.roles import AXIS_DIMS, MeshRoles
from ..core.strategy import AXES, StrategyOptions

AXIS_LABELS = {"tp": "tensor parallelism", "ep": "expert parallelism", "cp": "context parallelism",
               "pp": "pipeline parallelism"}


def check_declared_axes(name: str, supports: frozenset[str], options_class: type[StrategyOptions]) -> None:
    """:class:`UnsupportedConfigurationError` for a strategy whose ``supports`` names an unknown axis, or declares
    ``"ep"`` without options derived from :class:`ExpertParallelOptions` (a mistake of the strategy's author)."""
    unknown = sorted(supports - AXES)
    if unknown:
        raise UnsupportedConfigurationError(
            f"Strategy {name!r} declares supports={sorted(supports)}, but {unknown} are not axes; choose among "
            f"{sorted(AXES)} (data parallelism is every strategy's own job).")
    if "ep" in supports and not issubclass(options_class, ExpertParallelOptions):
        raise UnsupportedConfigurationError(
            f"Strategy {name!r} declares 'ep' but its options_class {options_class.__name__} does not derive from "
            "meshplan.ExpertParallelOptions, which carries ep_size.")


def refuse_undeclared_axes(name: str, supports: frozenset[str], mesh: DeviceMesh, options: Mapping[str, Any],
                           ep_plan: Any) -> None:
    """:class:`UnsupportedAxisError` for an axis in use that strategy ``name`` does not declare: ``ep_size`` > 1
    (or an ``ep_plan``), or a ``tp`` / ``cp`` / ``pp`` mesh dim larger than 1. Collective-free and the same on
    every rank (it reads only the arguments and the mesh's shape)."""
    in_use = {dim: size for dim, size in zip(dim_names(mesh), mesh.shape) if size > 1}
    for axis, dim in AXIS_DIMS.items():
        if axis not in supports and dim in in_use:
            _refuse(name, supports, axis, f"mesh dim {dim!r} of size {in_use[dim]}",
                    f"drop the {dim!r} dim (or make it size 1)")
    if "ep" not in supports:
        ep_size = options.get("ep_size", 1)
        if ep_size != 1:
            _refuse(name, supports, "ep", f"ep_size={ep_size!r}", "drop ep_size")
        if ep_plan is not None:
            _refuse(name, supports, "ep", "ep_plan=...", "drop ep_plan")


def _refuse(name: str, supports: frozenset[str], axis: str, what: str, fix: str) -> None:
    raise UnsupportedAxisError(
        f"Strategy {name!r} does not support {AXIS_LABELS[axis]} ({axis!r}), asked for by {what}: it supports "
        f"{sorted(supports)}. {fix[0].upper()}{fix[1:]}, or use a strategy whose supports include {axis!r} "
        "(`meshplan strategies --json` lists them).")


def refuse_undeclared_roles(name: str, supports: frozenset[str], roles: MeshRoles) -> None:
    """:class:`UnsupportedAxisError` for a ``tp`` / ``cp`` / ``pp`` role larger than 1 (found under a renamed dim,
    e.g. ``tp_mesh_name="tensor"``) that strategy ``name`` does not declare."""
    for axis in AXIS_DIMS:
        if axis not in supports and roles.size(axis) > 1:
            _refuse(name, supports, axis, f"mesh dims {list(roles.dims[axis])} of size {roles.size(axis)}",
                    "drop those dims (or make them size 1)")
