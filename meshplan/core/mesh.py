"""DeviceMesh helpers: look dimensions up by name, including flattened ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    found = find_submesh(mesh, names)
    if found is not None:
        return found
    raise MeshError(
        f"The device mesh has no dimension for {purpose}: looked for {list(names)}, "
        f"but the mesh has {list(dim_names(mesh)) or 'no named dimensions'} (shape {tuple(mesh.shape)}). "
        "Name the mesh dims with init_device_mesh(..., mesh_dim_names=...) or pass the *_mesh_name options."
    )


def find_submesh(mesh: DeviceMesh, names: Sequence[str]) -> tuple[str, DeviceMesh] | None:
    """``(name, sub-mesh)`` for the first of ``names`` the mesh has (real or flattened), else ``None``."""
    for name in names:
        sub = submesh(mesh, name)
        if sub is not None:
            return name, sub
    return None


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


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(n for n in names if n))


def select_data_parallel_mesh(
    mesh: DeviceMesh, shard_names: Sequence[str], replicate_names: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> DataParallelMesh:
    """Pick the data-parallel sharding (and, for HSDP, replication) dims of ``mesh`` by name.

    ``shard_names`` and ``replicate_names`` are tried in order; names in ``exclude`` (e.g. the TP dim) are
    never used. A replicate dim of size 1 is ignored, so a plain FSDP run never gets a 2-D mesh by accident.
    A shard dim that overlaps the replicate dim (e.g. a flattened ``dp`` = replicate x shard) is skipped.
    A mesh without named dims is used whole when it is 1-D. Collective-free and identical on every rank.

    Raises:
        MeshError: no usable dim, naming every name looked for and the dims the mesh has.
    """
    shard_names, replicate_names = _unique(shard_names), _unique(replicate_names)
    excluded = set(exclude)
    if not mesh.mesh_dim_names and mesh.ndim == 1:
        return DataParallelMesh(mesh, "<unnamed>", mesh.size())
    replicate = find_submesh(mesh, [n for n in replicate_names if n not in excluded])
    if replicate is not None and replicate[1].size() == 1:
        replicate = None
    for name in shard_names:
        if name in excluded or (replicate is not None and name == replicate[0]):
            continue
        shard = submesh(mesh, name)
        if shard is None:
            continue
        if replicate is None:
            return DataParallelMesh(shard, name, shard.size())
        if mesh_ranks(shard) & mesh_ranks(replicate[1]) != frozenset({mesh.get_rank()}):
            continue  # overlaps the replicate dim (e.g. a flattened dp = dp_replicate x dp_shard)
        try:
            hybrid = mesh[(replicate[0], name)]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MeshError(
                f"Cannot build the HSDP mesh ({replicate[0]!r}, {name!r}) from a mesh with dims "
                f"{list(dim_names(mesh))}: {exc}. The replicate dim must come before the shard dim."
            ) from exc
        return DataParallelMesh(hybrid, name, shard.size(), replicate[0], replicate[1].size())
    looked_for = f"a sharding dim among {shard_names}"
    if replicate is not None:
        looked_for += f" that does not overlap the replicate dim {replicate[0]!r} (size {replicate[1].size()})"
    raise MeshError(
        f"The device mesh has no data-parallel dimension: looked for {looked_for}"
        + (f" (replicate dims looked for: {replicate_names})" if replicate_names else "")
        + (f", never using {sorted(excluded)}" if excluded else "")
        + f"; the mesh has {list(dim_names(mesh)) or 'no named dimensions'} (shape {tuple(mesh.shape)}). "
        "Add a data-parallel dim (size 1 is fine), e.g. init_device_mesh(..., mesh_dim_names=('dp_shard_cp', "
        "'tp')), or pass dp_shard_cp_mesh_name= / dp_replicate_mesh_name= to name yours."
    )
