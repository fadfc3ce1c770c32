"""Device meshes described on the command line.

A mesh spec is ``name=size`` pairs, outermost first: ``dp_replicate=8,dp_shard=256,tp=8``. The
canonical dim names are ``dp_replicate`` (replicas), ``dp_shard`` (sharded data parallel; ``dp`` is
accepted as a synonym), ``cp`` (context parallel) and ``tp`` (tensor parallel).

Strategies find their dims by role (:mod:`meshplan.core.roles`), so one mesh spec serves ``fsdp2``
(sharding over ``dp_shard`` x ``cp``), ``ddp`` (replicating over ``dp_replicate`` x ``dp_shard``) and
``megatron_fsdp`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..core.errors import MeshError


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
