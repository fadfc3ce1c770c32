"""DeviceMesh helpers: look dimensions up by name (including flattened ones), the data-parallel mesh type."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from .torch_private import flattened_dim


def dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    """The mesh's named dimensions (a 1-D unnamed mesh has none)."""
    return tuple(mesh.mesh_dim_names or ())


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh | None:
    """The sub-mesh for dimension ``name`` (a real or flattened dim), or ``None`` if the mesh lacks it."""
    if not mesh.mesh_dim_names:
        return None
    return mesh[name] if name in mesh.mesh_dim_names else flattened_dim(mesh, name)


def dim_size(mesh: DeviceMesh, name: str) -> int:
    """Size of dimension ``name``; 1 when the mesh has no such dimension."""
    sub = submesh(mesh, name)
    return 1 if sub is None else sub.size()


def mesh_ranks(mesh: DeviceMesh) -> frozenset[int]:
    """The global ranks a (sub-)mesh spans from this rank's point of view (no communication)."""
    return frozenset(int(r) for r in mesh.mesh.flatten().tolist())


@dataclass(frozen=True)
class DataParallelMesh:
    """The data-parallel part of a device mesh, as FSDP2 wants it.

    ``mesh`` is 1-D (``shard_name``) for plain FSDP and 2-D (``replicate_name``, ``shard_name``) for HSDP;
    a 2-D mesh is built only when the replicate dim is larger than 1.
    """

    mesh: DeviceMesh
    shard_name: str
    shard_size: int
    replicate_name: str | None = None
    replicate_size: int = 1

    @property
    def is_hybrid(self) -> bool:
        """True for HSDP (replicate across ``replicate_name``, shard across ``shard_name``)."""
        return self.replicate_name is not None

    def describe(self) -> str:
        if self.is_hybrid:
            return (f"HSDP {self.replicate_name}={self.replicate_size} x {self.shard_name}={self.shard_size}")
        return f"FSDP {self.shard_name}={self.shard_size}"
