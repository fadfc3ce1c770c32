"""Device meshes described on the command line, and the strategy options that name their dims.

A mesh spec is ``name=size`` pairs, outermost first: ``dp_replicate=8,dp_shard=256,tp=8``. The
canonical dim names are ``dp_replicate`` (replicas), ``dp_shard`` (sharded data parallel; ``dp`` is
accepted as a synonym), ``cp`` (context parallel) and ``tp`` (tensor parallel).

Strategies name the dims they use through ``*_mesh_name`` options (``tp_mesh_name``,
``dp_shard_cp_mesh_name``, ``dp_mesh_name`` ...). :func:`mesh_name_options` reads the option names as
underscore-joined canonical dims and points each option at the mesh: at the dim itself when one dim
matches, at a flattened dim (``DeviceMesh._flatten``) when several do, and leaves the option alone
when the mesh already has the default name or none of the dims. So one mesh spec serves ``fsdp2``
(``dp_shard_cp`` = ``dp_shard`` x ``cp``) and ``ddp`` (``dp`` = ``dp_replicate`` x ``dp_shard``) alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..core.errors import MeshError
from ..core.strategy import Strategy

#: Dims whose name has two underscore-separated parts; every other atom is one part.
TWO_PART_DIMS = ("dp_replicate", "dp_shard")
ONE_PART_DIMS = ("dp", "cp", "tp", "ep", "pp")
#: What a data-parallel atom falls back to when the mesh lacks it.
FALLBACKS: dict[str, tuple[str, ...]] = {"dp": ("dp_replicate", "dp_shard"), "dp_shard": ("dp",)}
SUFFIX = "_mesh_name"


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"dp_shard=4,tp=2"`` -> ``{"dp_shard": 4, "tp": 2}`` (order kept; sizes must be positive).

    A mapping is checked and returned as a dict.
    """
    if isinstance(spec, Mapping):
        bad = {k: v for k, v in spec.items() if not isinstance(k, str) or not k or not isinstance(v, int) or v < 1}
        if bad or not spec:
            raise MeshError(f"Bad mesh {dict(spec)!r}: expected {{dim name: positive size}}, e.g. {{'dp_shard': 8}}.")
        return dict(spec)
    dims: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise MeshError(
                f"Bad mesh spec {spec!r}: expected name=size pairs such as 'dp_replicate=8,dp_shard=256,tp=8' "
                f"(problem at {part!r})."
            )
        if name in dims:
            raise MeshError(f"Bad mesh spec {spec!r}: dim {name!r} appears twice.")
        dims[name] = int(size)
    return dims


def world_size(dims: Mapping[str, int]) -> int:
    return math.prod(dims.values())


def build_mesh(dims: Mapping[str, int], device_type: str = "cpu") -> DeviceMesh:
    """``init_device_mesh`` over the default process group (its size must equal the product of dims)."""
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def split_dims(base: str) -> list[str] | None:
    """``"dp_shard_cp"`` -> ``["dp_shard", "cp"]``; ``None`` when the name is not made of canonical dims."""
    parts, atoms, i = base.split("_"), [], 0
    while i < len(parts):
        pair = "_".join(parts[i:i + 2])
        if pair in TWO_PART_DIMS:
            atoms.append(pair)
            i += 2
        elif parts[i] in ONE_PART_DIMS:
            atoms.append(parts[i])
            i += 1
        else:
            return None
    return atoms


def _dims_for(atoms: list[str], names: tuple[str, ...]) -> list[str]:
    """The mesh dims ``atoms`` stand for, in mesh order (missing atoms fall back or drop out)."""
    found: list[str] = []
    for atom in atoms:
        candidates = (atom,) if atom in names else FALLBACKS.get(atom, ())
        found += [c for c in candidates if c in names and c not in found]
    return sorted(found, key=names.index)


def mesh_name_options(strategy: Strategy, mesh: DeviceMesh, given: Mapping[str, Any] = ()) -> dict[str, str]:
    """``*_mesh_name`` options that point ``strategy`` at ``mesh``'s dims, flattening dims where needed.

    Options in ``given`` (set by the user) are left alone, as are options whose default dim exists.
    Flattening happens on ``mesh`` (its root mesh), exactly as a training script would do it.
    """
    names = tuple(mesh.mesh_dim_names or ())
    options: dict[str, str] = {}
    flattened: dict[tuple[str, ...], str] = {}
    for info in strategy.describe_options():
        if not info.name.endswith(SUFFIX) or info.name in given or info.default in names:
            continue
        base = info.name[: -len(SUFFIX)]
        atoms = split_dims(base)
        dims = [base] if base in names else _dims_for(atoms or [], names)
        if len(dims) == 1:
            options[info.name] = dims[0]
        elif len(dims) > 1:
            key = tuple(dims)
            if key not in flattened:
                flattened[key] = info.default if isinstance(info.default, str) and info.default else base
                mesh[key]._flatten(flattened[key])
            options[info.name] = flattened[key]
    return options
