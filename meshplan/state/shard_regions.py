"""Which elements of a parameter, in the unparallelized model's order, this rank holds, from its DTensor
placements and mesh alone (plus the rank-major layout of packed parameters).

Every dim gets the global indices this rank's local tensor holds along it, in local order: a ``Shard`` /
``_StridedShard`` placement keeps the mesh coordinate's chunk of the indices (the placement's own split, so uneven
FSDP2 shards and strided TP x FSDP shards come out as torch lays them out), ``Replicate`` keeps all. A packed
dim's rank-major positions are then mapped to the model's order. The indices become rectangular blocks of
contiguous runs, each read from the checkpoint with one slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .packing import contiguous_runs, model_positions

#: (global start, global stop, local start) along one dim
Run = tuple[int, int, int]


def _one_dim(placement: Shard | _StridedShard) -> Shard | _StridedShard:
    """The same kind of placement along dim 0 (to split a 1-D index vector)."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor)
    return Shard(0)


def owned_indices(tensor: torch.Tensor, packed: tuple[Sequence[int], int, int] | None = None) -> list[torch.Tensor]:
    """Per dim, the indices into the unparallelized tensor that this rank's local tensor holds, in local order.
    ``packed``: ``(part sizes, TP size, dim)`` of a parameter stored rank-major."""
    indices = [torch.arange(size) for size in tensor.shape]
    if isinstance(tensor, DTensor):
        mesh = tensor.device_mesh
        coordinate = mesh.get_coordinate()
        for mesh_dim, placement in enumerate(tensor.placements):
            if isinstance(placement, (Shard, _StridedShard)):
                chunks, _ = _one_dim(placement)._split_tensor(indices[placement.dim], mesh.size(mesh_dim),
                                                              with_padding=False)
                indices[placement.dim] = chunks[coordinate[mesh_dim]] if coordinate[mesh_dim] < len(chunks) \
                    else indices[placement.dim][:0]
    if packed is not None:
        indices[packed[2]] = model_positions(packed, indices[packed[2]])
    return indices


def runs(indices: torch.Tensor) -> list[Run]:
    """Contiguous ascending runs of ``indices``: ``[(global start, global stop, local start), ...]``."""
    return [(position, position + length, index) for index, position, length in contiguous_runs(indices)]


def blocks(indices: Sequence[torch.Tensor]) -> Iterator[tuple[list[tuple[int, int]], tuple[slice, ...]]]:
    """``(global region, local slices)`` of each rectangular block this rank holds (none when it holds nothing)."""
    return blocks_of_runs([runs(dim_indices) for dim_indices in indices])


def blocks_of_runs(dim_runs: Sequence[Sequence[Run]]) -> Iterator[tuple[list[tuple[int, int]], tuple[slice, ...]]]:
    """:func:`blocks` from each dim's :func:`runs` (which describe a rank's shard compactly, e.g. to send it)."""
    for combination in itertools.product(*dim_runs):
        region = [(start, stop) for start, stop, _ in combination]
        local = tuple(slice(local, local + stop - start) for start, stop, local in combination)
        yield region, local
