"""DeviceMesh helpers: look dimensions up by name, including flattened ones."""

from __future__ import annotations

from collections.abc import Sequence

from torch.distributed.device_mesh import DeviceMesh

from .errors import MeshError


def dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    """The mesh's named dimensions (a 1-D unnamed mesh has none)."""
    return tuple(mesh.mesh_dim_names or ())


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh | None:
    """The sub-mesh for dimension ``name`` (a real or flattened dim), or ``None`` if the mesh lacks it."""
    if not mesh.mesh_dim_names:
        return None
    try:
        return mesh[name]
    except KeyError:
        return None


def dim_size(mesh: DeviceMesh, name: str) -> int:
    """Size of dimension ``name``; 1 when the mesh has no such dimension."""
    sub = submesh(mesh, name)
    return 1 if sub is None else sub.size()


def require_submesh(mesh: DeviceMesh, names: Sequence[str], purpose: str) -> tuple[str, DeviceMesh]:
    """The first of ``names`` that the mesh has, or a :class:`MeshError` saying what was looked for."""
    for name in names:
        sub = submesh(mesh, name)
        if sub is not None:
            return name, sub
    raise MeshError(
        f"The device mesh has no dimension for {purpose}: looked for {list(names)}, "
        f"but the mesh has {list(dim_names(mesh)) or 'no named dimensions'} (shape {tuple(mesh.shape)}). "
        "Name the mesh dims with init_device_mesh(..., mesh_dim_names=...) or pass the *_mesh_name options."
    )
