"""Parameter elements on every rank of the world, computed from DTensor placements without building the ranks.

``meshplan explain`` builds the model for one rank only. What the other ranks hold follows from each
parameter's global shape, its placements and its mesh:

* **The chunk rule.** torch (``torch.chunk``, DTensor's ``Shard`` and FSDP2's ``_chunk_with_empty``) splits a
  dim of ``n`` elements over ``k`` ranks into chunks of ``ceil(n / k)``; the last non-empty chunk is smaller
  and ranks past it get nothing. Rank ``r`` holds ``max(0, min(c, n - r * c))`` with ``c = ceil(n / k)``.
* **Several mesh dims on one tensor dim** apply one after another, left to right (DTensor's order), each to
  what the previous left; a ``_StridedShard(d, split_factor=f)`` first splits into ``f`` pieces and chunks
  each over its mesh dim, as ``distribute_tensor`` does. FSDP2 writes ``_StridedShard`` on its data-parallel
  dim when tensor parallelism (mesh dims to the right, sizes multiplying to ``f``) already shards dim ``d``,
  but it stores a chunk of the TP-local tensor: for parameters FSDP2 manages, those right-hand dims apply
  first and the data-parallel dim chunks what they leave (the two differ when the sizes are uneven).
* **Coordinates.** Every mesh dim of every parameter's mesh (including flattened and sliced meshes) is mapped
  to each global rank's coordinate through the mesh's layout, the same bookkeeping ``DeviceMesh`` uses to
  build its process groups.

Parameters are grouped by (mesh, placements, shape): a group's local size is a table over the coordinates of
the mesh dims that shard it (``dp_shard x tp`` entries at most), and the per-rank total is one gather of that
table per group over the world. 16,384 ranks cost milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..core.errors import MeshplanError
from ..core.torch_private import TorchPrivateAPIError, dim_rank_groups
from ..state.fsdp_state import param_groups


class RankLayoutUnknown(MeshplanError):
    """A parameter's layout cannot be worked out for every rank (an unknown placement or mesh internals)."""


def rank_groups(mesh: Any, world_size: int) -> list[np.ndarray]:
    """Per mesh dim, its process groups as rows of global ranks (column = coordinate along the dim)."""
    try:
        groups = dim_rank_groups(mesh)
    except (TorchPrivateAPIError, TypeError) as exc:
        full = mesh.mesh
        if full.numel() != world_size:
            raise RankLayoutUnknown(f"Cannot map the ranks of mesh {mesh} onto the world ({exc}).") from exc
        groups = [full.movedim(i, -1).reshape(-1, full.shape[i]) for i in range(full.ndim)]
    return [g.numpy().astype(np.int64) for g in groups]


def mesh_coordinates(mesh: Any, world_size: int) -> list[np.ndarray]:
    """Per mesh dim, every global rank's coordinate along it (``-1`` for ranks outside the mesh)."""
    coordinates = []
    for ranks in rank_groups(mesh, world_size):
        coordinate = np.full(world_size, -1, dtype=np.int64)
        coordinate[ranks] = np.arange(ranks.shape[-1])  # broadcast over the rows (one per process group)
        coordinates.append(coordinate)
    return coordinates


def chunk_sizes(size: Any, chunks: int, index: Any) -> np.ndarray:
    """Elements chunk ``index`` gets when ``torch.chunk`` splits ``size`` elements into ``chunks`` (0 if none)."""
    per_chunk = (size + chunks - 1) // chunks
    return np.maximum(np.minimum(per_chunk, size - index * per_chunk), 0)


@dataclass(frozen=True)
class _Cut:
    """One mesh dim sharding one tensor dim: the table axis, the mesh dim's size and a strided split factor."""

    axis: int
    ranks: int
    split_factor: int = 1


def _order(cuts: list[_Cut], fsdp: bool) -> list[_Cut]:
    """The order the cuts of one tensor dim are applied (FSDP2's strided dim after the dims it interleaves)."""
    strided = [i for i, cut in enumerate(cuts) if cut.split_factor > 1]
    if fsdp and len(strided) == 1:
        i = strided[0]
        after = cuts[i + 1:]
        if after and math.prod(c.ranks for c in after) == cuts[i].split_factor:
            return cuts[:i] + after + [_Cut(cuts[i].axis, cuts[i].ranks)]  # a plain chunk of what is left
    return cuts


def _apply(size: Any, cut: _Cut, index: np.ndarray) -> np.ndarray:
    if cut.split_factor == 1:
        return chunk_sizes(size, cut.ranks, index)
    # DTensor's _StridedShard: split_factor pieces, each chunked over the mesh dim, rank r keeps the r-th of each
    return sum(chunk_sizes(chunk_sizes(size, cut.split_factor, j), cut.ranks, index) for j in range(cut.split_factor))


def local_numel_table(shape: Sequence[int], placements: Sequence[Any], mesh_shape: Sequence[int], fsdp: bool = False
                      ) -> tuple[tuple[int, ...], np.ndarray]:
    """(mesh dims that shard the tensor, local elements indexed by the coordinates along those dims).

    ``fsdp``: the tensor is an FSDP2 sharded parameter (its ``_StridedShard`` chunks the TP-local tensor).
    """
    # loaded on use: keeps start-up light
    from torch.distributed.tensor import Partial, Replicate, Shard

    from ..core.torch_private import StridedShard as _StridedShard

    axes = tuple(i for i, p in enumerate(placements) if isinstance(p, (Shard, _StridedShard)))
    grid = [mesh_shape[i] for i in axes]
    cuts: dict[int, list[_Cut]] = {}
    for axis, mesh_dim in enumerate(axes):
        placement = placements[mesh_dim]
        factor = placement.split_factor if isinstance(placement, _StridedShard) else 1
        dim = placement.dim % len(shape) if shape else placement.dim
        cuts.setdefault(dim, []).append(_Cut(axis, mesh_shape[mesh_dim], int(factor)))
    for placement in placements:
        if not isinstance(placement, (Shard, _StridedShard, Replicate, Partial)):
            raise RankLayoutUnknown(f"Unknown placement {placement!r}.")
    table = np.ones(grid, dtype=np.int64)
    for dim, size in enumerate(shape):
        local: Any = np.int64(size)
        for cut in _order(cuts.get(dim, []), fsdp):
            view = [1] * len(grid)
            view[cut.axis] = grid[cut.axis]
            local = _apply(local, cut, np.arange(grid[cut.axis], dtype=np.int64).reshape(view))
        table = table * local
    return axes, table


@dataclass
class ParamGroup:
    """Parameters with the same mesh, placements and shape: one local-size table serves them all."""

    names: list[str]
    shape: tuple[int, ...]
    numel: int
    element_size: int
    trainable: bool
    table: np.ndarray  # flattened local elements per piece (one per coordinate of the sharding mesh dims)
    piece_of_rank: np.ndarray  # per global rank, the index into ``table`` (-1: the rank holds none)

    def local_at(self, rank: int) -> int:
        piece = int(self.piece_of_rank[rank])
        return int(self.table[piece]) if piece >= 0 else 0

    def per_rank(self) -> np.ndarray:
        return np.where(self.piece_of_rank >= 0, self.table[np.maximum(self.piece_of_rank, 0)], 0)


@dataclass
class AllRanks:
    """Parameter elements on every rank of the world."""

    world_size: int
    groups: list[ParamGroup]
    per_rank: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.per_rank = np.zeros(self.world_size, dtype=np.int64)
        for group in self.groups:
            self.per_rank += len(group.names) * group.per_rank()

    @property
    def max_local(self) -> int:
        return int(self.per_rank.max())

    @property
    def max_local_rank(self) -> int:
        """The lowest rank holding :attr:`max_local` elements."""
        return int(np.argmax(self.per_rank))  # the first maximum

    def local_by_name(self, rank: int) -> dict[str, int]:
        return {name: group.local_at(rank) for group in self.groups for name in group.names}


def _flat_piece_index(coordinates: list[np.ndarray], axes: tuple[int, ...], grid: Sequence[int]) -> np.ndarray:
    """Per global rank, the row-major index of its coordinates along ``axes`` (-1 outside the mesh)."""
    index = np.zeros_like(coordinates[0])
    outside = coordinates[0] < 0  # every dim of a mesh spans the same ranks
    for axis, size in zip(axes, grid):
        index = index * size + coordinates[axis]
    return np.where(outside, -1, index)


def fsdp_sharded_parameters(model: nn.Module) -> set[int]:
    """``id``s of the parameters FSDP2 manages in ``model`` (every parameter of an FSDP unit if torch hides it)."""
    from torch.distributed.fsdp import FSDPModule  # loaded on use: keeps start-up light

    found: set[int] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        managed = [getattr(p, "sharded_param", None)
                   for group in param_groups(module) for p in getattr(group, "fsdp_params", ())]
        if managed and all(p is not None for p in managed):
            found |= {id(p) for p in managed}
        else:  # torch internals moved (or a unit without parameters): count the unit's parameters as FSDP's
            found |= {id(p) for p in module.parameters()}
    return found


def all_ranks(named_parameters: Iterable[tuple[str, nn.Parameter]], world_size: int,
              fsdp_sharded: set[int] | frozenset[int] = frozenset()) -> AllRanks:
    """Group the parameters and work out each group's local elements on every global rank.

    ``fsdp_sharded``: ``id``s of parameters FSDP2 manages (see :func:`fsdp_sharded_parameters`).
    """
    from torch.distributed.tensor import DTensor  # loaded on use: keeps start-up light

    grouped: dict[tuple[Any, ...], list[tuple[str, Any]]] = {}
    for name, param in named_parameters:
        if isinstance(param, DTensor):
            key: tuple[Any, ...] = (param.device_mesh, tuple(param.placements), tuple(param.shape),
                                    id(param) in fsdp_sharded)
        else:
            key = (None, (), tuple(param.shape), False)
        grouped.setdefault(key + (param.dtype, param.requires_grad), []).append((name, param))
    coordinates: dict[Any, list[np.ndarray]] = {}
    groups = []
    for (mesh, placements, shape, fsdp, dtype, trainable), members in grouped.items():
        if mesh is None:
            table, piece = np.array([math.prod(shape)], dtype=np.int64), np.zeros(world_size, dtype=np.int64)
        else:
            if mesh not in coordinates:
                coordinates[mesh] = mesh_coordinates(mesh, world_size)
            axes, grid_table = local_numel_table(shape, placements, tuple(mesh.shape), fsdp)
            table = grid_table.reshape(-1)
            piece = _flat_piece_index(coordinates[mesh], axes, grid_table.shape)
        groups.append(ParamGroup([n for n, _ in members], shape, math.prod(shape), dtype.itemsize, trainable,
                                 table, piece))
    return AllRanks(world_size, groups)


def varies_along(group: ParamGroup, rank_groups: np.ndarray) -> bool:
    """Whether ranks of one group (rows of ``rank_groups``, e.g. every TP group) hold different pieces."""
    pieces = group.piece_of_rank[rank_groups]
    return bool((pieces != pieces[:, :1]).any())
