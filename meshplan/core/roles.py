"""Mesh roles: which dims of a device mesh each parallel role uses, resolved once by ``prepare()``.

A strategy's options declare, per role, the dims it may use (:class:`RoleDims`: the ``*_mesh_name`` option
first, then fallbacks). :func:`resolve_roles` picks the first candidate present in the mesh for every role,
then checks, without any collective, that

* no two roles share ranks (the data-parallel shard dim may already contain ``cp``, as ``dp_shard_cp`` does);
* every mesh dim larger than 1 belongs to a role, so no rank is silently left an unsynchronised copy.

The result, :class:`MeshRoles`, hands strategies their sub-meshes. Sub-meshes that need new process groups
(flattened dims) are built on first access, i.e. when the strategy applies, never during validation.

Expert parallelism (``ep_size > 1``) has no dim of its own: its ranks are carved from the data-parallel shard
ranks (``dp_shard x cp``) and, when the experts are not TP-sharded, from the TP ranks too (which hold the same
tokens, so they can serve different experts instead of repeating the same computation). The borrowed ranks,
flattened in that order (TP innermost), are unflattened into ``(expert data parallel, ep)`` with ``ep``
innermost, as torchtitan and transformers do (:func:`carve_expert_meshes`):

* ``ep``: ranks that split the experts (consecutive borrowed ranks, so whole TP groups);
* ``expert_data_parallel``: the ranks that hold the *same* experts, over which FSDP2 shards and reduces the
  expert parameters (with ``dp_replicate`` as its HSDP replicate dim when that is larger than 1).

Only ``DeviceMesh`` layout operations are used (``_flatten``, ``_unflatten``, ``_concatenate``): no global rank
list is built, so it runs on fake process groups of thousands of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh

from .errors import ExpertParallelError, MeshError
from .expert_mesh import ExpertMeshes, carve_expert_meshes, check_expert_parallel_size
from .mesh import DataParallelMesh, dim_names, dim_size, mesh_ranks, submesh
from .torch_private import concatenate, flatten

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Roles in resolution order: the shard dim is resolved last so it can be told apart from cp / replicate.
ROLE_ORDER = ("pp", "tp", "cp", "dp_replicate", "dp_shard")
#: The canonical mesh dim of each model-parallel axis a strategy declares in ``Strategy.supports`` (data
#: parallelism is the strategy's own job). A mesh dim of one of these names larger than 1 is refused before any
#: work unless the strategy declares the axis.
AXIS_DIMS = {"tp": "tp", "cp": "cp", "pp": "pp"}
#: Roles whose sub-meshes are used whole by an unnamed 1-D mesh.
DATA_ROLES = ("dp_shard", "dp_replicate")

#: One candidate: a dim name (real or flattened), or several dims to be flattened into one.
DimSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class RoleDims:
    """Where a role may live in the mesh: ``option`` (an ``*_mesh_name`` option, for messages) and the
    candidate dims tried in order. A tuple candidate matches when any of its dims exists; the present ones
    are flattened together."""

    option: str | None
    candidates: tuple[DimSpec, ...]

    def looked_for(self) -> list[str]:
        return ["+".join(c) if isinstance(c, tuple) else c for c in self.candidates]


@dataclass
class MeshRoles:
    """The sub-meshes of each parallel role of ``mesh``; see :func:`resolve_roles`.

    ``dims`` maps each present role to the mesh dims it uses (one name, or several that are flattened).
    Roles absent from ``dims`` have size 1. ``shard_includes_cp`` is true when the data-parallel shard dim
    already spans the context-parallel ranks (a flattened ``dp_shard_cp``).
    """

    mesh: DeviceMesh
    dims: Mapping[str, tuple[str, ...]]
    shard_includes_cp: bool = False
    ep_size: int = 1
    ep_borrows_tp: bool = True
    _cache: dict[str, DeviceMesh] = field(default_factory=dict, repr=False, compare=False)
    _experts: ExpertMeshes | None = field(default=None, repr=False, compare=False)

    def size(self, role: str) -> int:
        """How many ranks the role spans (1 when absent)."""
        if role == "ep":
            return self.ep_size
        names = self.dims.get(role)
        if names is None:
            return 1
        if names == ("<whole>",):
            return self.mesh.size()
        return math.prod(dim_size(self.mesh, n) for n in names)

    def submesh(self, role: str) -> DeviceMesh | None:
        """The 1-D sub-mesh of ``role`` (flattening its dims on first access), or ``None`` if absent."""
        names = self.dims.get(role)
        if names is None:
            return None
        if names == ("<whole>",):
            return self.mesh
        return self._flat(names)

    @property
    def tp(self) -> DeviceMesh | None:
        """The tensor-parallel sub-mesh, ``None`` without TP (absent or size 1)."""
        return self.submesh("tp") if self.size("tp") > 1 else None

    @property
    def cp(self) -> DeviceMesh | None:
        """The context-parallel sub-mesh, ``None`` without CP (absent or size 1)."""
        return self.submesh("cp") if self.size("cp") > 1 else None

    @property
    def pp(self) -> DeviceMesh | None:
        """The pipeline-parallel sub-mesh, ``None`` without PP (absent or size 1). Only strategies that declare
        ``"pp"`` have the role (:func:`pipeline_role`)."""
        return self.submesh("pp") if self.size("pp") > 1 else None

    @property
    def data_parallel(self) -> DataParallelMesh | None:
        """The FSDP (1-D) or HSDP (2-D) mesh for dense parameters: shards over ``dp_shard`` x ``cp``."""
        if "dp_shard" not in self.dims and "dp_replicate" not in self.dims:
            return None
        if "dp_shard" not in self.dims:
            name = _flat_name(self.dims["dp_replicate"])
            return DataParallelMesh(self.submesh("dp_replicate"), name, self.size("dp_replicate"))
        shard_dims = self._shard_dims()
        shard_name = _flat_name(shard_dims)
        shard = self._flat(shard_dims)
        if self.size("dp_replicate") == 1:
            return DataParallelMesh(shard, shard_name, shard.size())
        replicate_name = _flat_name(self.dims["dp_replicate"])
        try:
            hybrid = concatenate([self._flat(self.dims["dp_replicate"]), shard])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MeshError(
                f"Cannot build the HSDP mesh ({replicate_name!r}, {shard_name!r}) from a mesh with dims "
                f"{list(dim_names(self.mesh))}: {exc}. The replicate and shard dims must not share ranks."
            ) from exc
        return DataParallelMesh(hybrid, shard_name, shard.size(), replicate_name, self.size("dp_replicate"))

    @property
    def ep_borrowed_dims(self) -> tuple[str, ...]:
        """The mesh dims the EP ranks are carved from (empty without EP)."""
        if self.ep_size == 1:
            return ()
        tp = self.dims["tp"] if self.ep_borrows_tp and self.size("tp") > 1 else ()
        return (*self._shard_dims(), *tp)

    def check_expert_parallel(self) -> None:
        """:class:`ExpertParallelError` unless ``ep_size`` fits the ranks it borrows; collective-free."""
        if self.ep_size == 1:
            return
        shard = math.prod(dim_size(self.mesh, n) for n in self._shard_dims())
        tp = self.size("tp") if self.ep_borrows_tp else 1
        check_expert_parallel_size(self.ep_size, shard, tp, " x ".join(self.ep_borrowed_dims) or "no dims")

    def expert_meshes(self) -> ExpertMeshes | None:
        """The carved EP meshes (built on first access), ``None`` without EP."""
        if self.ep_size == 1:
            return None
        if self._experts is None:
            dense = self.data_parallel
            if dense is None or "dp_shard" not in self.dims:
                raise ExpertParallelError(f"ep_size={self.ep_size} needs a data-parallel shard dim to carve the "
                                          "expert-parallel ranks from.")
            tp = self.tp if self.ep_borrows_tp else None
            self._experts = carve_expert_meshes(dense, self.ep_size, tp, self.ep_borrowed_dims)
        return self._experts

    @property
    def ep(self) -> DeviceMesh | None:
        """The expert-parallel sub-mesh (``None`` without EP)."""
        meshes = self.expert_meshes()
        return None if meshes is None else meshes.ep

    @property
    def expert_data_parallel(self) -> DataParallelMesh | None:
        """The FSDP/HSDP mesh for expert parameters: the ranks that hold the same experts."""
        meshes = self.expert_meshes()
        return self.data_parallel if meshes is None else meshes.data_parallel

    def describe(self) -> dict[str, dict[str, object]]:
        """``{role: {"dims": [...], "size": n}}`` for every present role (reports, ``explain``)."""
        report = {role: {"dims": list(names), "size": self.size(role)} for role, names in self.dims.items()}
        if self.ep_size > 1:
            report["ep"] = {"dims": list(self.ep_borrowed_dims), "size": self.ep_size}
        return report

    def _shard_dims(self) -> tuple[str, ...]:
        """The dims FSDP shards over: ``dp_shard``, plus ``cp`` unless the shard dim already spans it."""
        shard = self.dims.get("dp_shard", ())
        return (*shard, *self.dims["cp"]) if self.size("cp") > 1 and not self.shard_includes_cp else shard

    def _flat(self, names: tuple[str, ...]) -> DeviceMesh:
        name = _flat_name(names)
        if name not in self._cache:
            existing = submesh(self.mesh, name)
            self._cache[name] = existing if existing is not None else flatten(self.mesh[names], name)
        return self._cache[name]


def _flat_name(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else "_".join(names)


def _ranks(mesh: DeviceMesh, names: tuple[str, ...]) -> frozenset[int]:
    """Ranks the dims ``names`` span through this rank (collective-free: slicing only)."""
    if len(names) == 1:
        return mesh_ranks(submesh(mesh, names[0]))
    return mesh_ranks(mesh[names])


def _present(mesh: DeviceMesh, spec: DimSpec) -> tuple[str, ...] | None:
    names = spec if isinstance(spec, tuple) else (spec,)
    found = tuple(n for n in names if n and submesh(mesh, n) is not None)
    return found or None


def _candidates(mesh: DeviceMesh, wanted: RoleDims) -> Iterator[tuple[str, ...]]:
    seen: set[tuple[str, ...]] = set()
    for spec in wanted.candidates:
        found = _present(mesh, spec)
        if found is not None and found not in seen:
            seen.add(found)
            yield found


def resolve_roles(
    mesh: DeviceMesh, wanted: Mapping[str, RoleDims], strategy: str, ep_size: int = 1
) -> MeshRoles:
    """Assign mesh dims to the roles a strategy supports; collective-free and identical on every rank.

    A candidate that would share ranks with a role already resolved is skipped (the shard dim may contain
    ``cp``). Raises :class:`MeshError` when a mesh dim larger than 1 has no role (named, with the options that
    would give it one), and :class:`ExpertParallelError` for a bad ``ep_size``.
    """
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ExpertParallelError(f"ep_size must be a positive integer, got {ep_size!r}.")
    if ep_size != 1 and not mesh.mesh_dim_names:
        raise ExpertParallelError("Expert parallelism needs named mesh dims: init_device_mesh(..., "
                                  "mesh_dim_names=('dp_shard', ...)).")
    if not mesh.mesh_dim_names:
        if mesh.ndim != 1:
            raise MeshError(f"A {mesh.ndim}-D device mesh needs mesh_dim_names so meshplan can tell its roles apart.")
        role = next((r for r in DATA_ROLES if r in wanted), None)
        if role is None:
            raise MeshError(f"Strategy {strategy!r} has no data-parallel role for an unnamed 1-D mesh.")
        return MeshRoles(mesh, {role: ("<whole>",)})
    dims: dict[str, tuple[str, ...]] = {}
    ranks: dict[str, frozenset[int]] = {}
    me = frozenset({mesh.get_rank()})
    shard_includes_cp = False
    for role in (r for r in ROLE_ORDER if r in wanted):
        for names in _candidates(mesh, wanted[role]):
            span = _ranks(mesh, names)
            overlaps = [r for r, s in ranks.items() if s & span != me]
            contains_cp = role == "dp_shard" and overlaps == ["cp"] and ranks["cp"] <= span
            if overlaps and not contains_cp:
                continue  # e.g. a flattened dp = dp_replicate x dp_shard when replicate is its own role
            dims[role], ranks[role] = names, span
            shard_includes_cp = shard_includes_cp or contains_cp
            break
    _check_coverage(mesh, ranks, wanted, strategy)
    return MeshRoles(mesh, dims, shard_includes_cp, ep_size)


def _check_coverage(
    mesh: DeviceMesh, ranks: Mapping[str, frozenset[int]], wanted: Mapping[str, RoleDims], strategy: str
) -> None:
    """Every real dim larger than 1 lies inside some role's ranks."""
    for name, size in zip(dim_names(mesh), mesh.shape):
        if size == 1 or any(mesh_ranks(mesh[name]) <= span for span in ranks.values()):
            continue
        raise MeshError(
            f"Mesh dim {name!r} (size {size}) has no role in strategy {strategy!r}, so its ranks would train as "
            f"unsynchronised copies. The strategy's roles and the dims they look for: {_role_listing(wanted)}. "
            f"Rename the dim{_option_hint(wanted)}, or use a strategy that supports it."
        )


def _role_listing(wanted: Mapping[str, RoleDims]) -> str:
    return "; ".join(f"{role}: {spec.looked_for()}" for role, spec in wanted.items())


def _option_hint(wanted: Mapping[str, RoleDims]) -> str:
    options = [spec.option for spec in wanted.values() if spec.option]
    return f" or name it with one of the options {options}" if options else ""


def role_dims(option: str | None, *candidates: DimSpec) -> RoleDims:
    """``RoleDims(option, candidates)`` without empty or repeated candidates."""
    unique: list[DimSpec] = []
    for c in candidates:
        if c and c not in unique:
            unique.append(c)
    return RoleDims(option, tuple(unique))


def pipeline_role(pp_mesh_name: str = "pp") -> RoleDims:
    """The ``pp`` role of a strategy that declares pipeline parallelism: the ``pp_mesh_name`` option's dim, then
    ``pp``. Its options' :meth:`~meshplan.StrategyOptions.mesh_roles` adds it as ``{"pp": pipeline_role(...)}``."""
    return role_dims("pp_mesh_name", pp_mesh_name, AXIS_DIMS["pp"])


__all__: Sequence[str] = ("AXIS_DIMS", "MeshRoles", "ROLE_ORDER", "RoleDims", "pipeline_role", "resolve_roles",
                          "role_dims")
