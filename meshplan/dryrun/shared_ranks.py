"""One list of the world's ranks for every ``DeviceMesh`` of a dry run, instead of one per mesh.

torch's ``DeviceMesh.__init__`` keeps ``tuple(rank_map.tolist())`` (every global rank as a Python int, for its
hash and equality) on each mesh object, and FSDP2 creates two or three meshes per parameter (the shard mesh, the
data-parallel x tensor-parallel mesh, ...). At 131,072 ranks that is about 5 MB and a few milliseconds per mesh,
~85 KB of memory per rank for a 405B model: what limited ``meshplan explain`` at frontier scale.

Every mesh sliced, flattened or concatenated from a root mesh takes the root's ``_rank_map`` tensor, so giving
the root a rank map whose ``tolist()`` returns one precomputed tuple makes all of them share it (``tuple(t)`` of a
tuple is ``t`` itself). The meshes are otherwise unchanged: same ranks, same hash, same equality. Only the dry run
does this (its meshes live in a fake world); if torch's internals move, the mesh is left as it is, which is only
slower.
"""

from __future__ import annotations

from typing import Any

import torch


class _SharedRankMap(torch.Tensor):
    """A rank-map tensor whose ``tolist()`` is one tuple computed once (operations on it give plain tensors)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    ranks: tuple[int, ...]

    def tolist(self) -> Any:  # a tuple: DeviceMesh only iterates, hashes and compares it
        return self.ranks


def share_rank_list(mesh: Any) -> None:
    """Make every ``DeviceMesh`` later derived from the root ``mesh`` share one tuple of its ranks."""
    rank_map = getattr(mesh, "_rank_map", None)
    if not isinstance(rank_map, torch.Tensor) or not hasattr(mesh, "_flatten_rank_map"):
        return  # torch's DeviceMesh changed: nothing to share
    shared = torch.Tensor._make_subclass(_SharedRankMap, rank_map)
    shared.ranks = tuple(rank_map.tolist())
    if shared.ranks != mesh._flatten_rank_map:
        return  # not the layout this module knows
    mesh._rank_map = shared
    mesh._flatten_rank_map = shared.ranks
