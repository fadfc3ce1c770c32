"""Keep FSDP2's per-parameter set-up in a dry run from scaling with the world size.

On the meta device, ``fully_shard`` spends nearly all its time at frontier scale (Llama-3-405B on 131,072 ranks)
in two places that repeat for every parameter but depend only on the world:

* every ``DeviceMesh`` it creates (a shard mesh and a data-parallel x tensor-parallel mesh per parameter) remaps
  the root's rank map through its layout and searches the result for the current rank (``DeviceMesh.mesh``,
  ``_compute_coordinate_on_dim``): O(world) each, about 2,000 meshes for that model;
* ``_chunk_with_empty`` splits each parameter into one chunk per data-parallel rank (``torch.chunk`` plus an
  empty tensor per missing chunk: 2,048 tensors for ``dp_shard=2048``), of which FSDP2 reads two.

Inside :func:`large_world_shortcuts`, a mesh's tensor and the rank's coordinate are computed once per (layout,
rank map, rank), and the chunks are a list that builds only the ones read, as the same views ``torch.chunk``
returns. Same meshes, same shards, same numbers; only the dry run (meta tensors, a fake world) uses this. A torch
that moved these APIs raises :class:`~meshplan.core.torch_private.TorchPrivateAPIError`, and the dry run then
runs without the shortcuts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.torch_private import TorchPrivateAPIError, mesh_identity, replaced, resolve


class LazyChunks(Sequence[torch.Tensor]):
    """FSDP2's ``_chunk_with_empty(tensor, count, dim)`` built on access: item ``i`` is ``torch.chunk``'s ``i``-th
    view (``narrow``), or an empty tensor past the last chunk ``torch.chunk`` makes."""

    def __init__(self, tensor: torch.Tensor, count: int, dim: int) -> None:
        length = tensor.size(dim)
        self._tensor, self._count, self._dim, self._length = tensor, count, dim, length
        self._chunk = -(-length // count)  # torch.chunk's chunk length
        self._made = -(-length // self._chunk)  # how many chunks torch.chunk returns

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(f"chunk {index} of {self._count}")
        if position >= self._made:
            return self[0].new_empty(0)
        start = position * self._chunk
        return self._tensor.narrow(self._dim, start, min(self._chunk, self._length - start))


def _chunk_on_access(original: Callable[..., list[torch.Tensor]]) -> Callable[..., Sequence[torch.Tensor]]:
    def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> Sequence[torch.Tensor]:
        if not tensor.is_meta or tensor.size(dim) == 0:
            return original(tensor, num_chunks, dim)
        return LazyChunks(tensor, num_chunks, dim)

    return chunk_with_empty


class _PerLayout:
    """Results of a ``DeviceMesh`` method that depend only on (layout, rank map, rank), computed once each."""

    def __init__(self, compute: Callable[[Any], Any], rank: Callable[[Any], int | None]) -> None:
        self._compute, self._rank = compute, rank
        self._results: dict[tuple[Any, int, int | None], Any] = {}
        self._rank_maps: list[torch.Tensor] = []  # kept alive: their ids are in the keys

    def __call__(self, mesh: Any) -> Any:
        layout, rank_map, _ = mesh_identity(mesh)
        key = (layout, id(rank_map), self._rank(mesh))
        if key not in self._results:
            self._rank_maps.append(rank_map)
            self._results[key] = self._compute(mesh)
        return self._results[key]


@contextlib.contextmanager
def large_world_shortcuts() -> Iterator[None]:
    """Within the block, meshes and FSDP2's chunks cost the same for any world size (see the module docstring)."""
    try:
        tensor_of, coordinate_of = resolve("mesh_tensor"), resolve("mesh_coordinate")
        chunk_with_empty = resolve("fsdp_chunk_with_empty")
    except TorchPrivateAPIError:
        yield  # torch moved them: the dry run is only slower
        return
    tensors = _PerLayout(tensor_of.fget, lambda mesh: torch.distributed.get_rank())
    coordinates = _PerLayout(coordinate_of, lambda mesh: mesh_identity(mesh)[2])
    with (replaced("mesh_tensor", property(lambda mesh: tensors(mesh).clone(), doc=tensor_of.__doc__)),
          replaced("mesh_coordinate", lambda mesh: coordinates(mesh)),
          replaced("fsdp_chunk_with_empty", _chunk_on_access(chunk_with_empty))):
        yield
