"""Rank-major packing: how TP stores packed parameters, and the conversions to and from the model's order.

A packed parameter (fused ``[gate; up]`` of experts, ``[q; k; v]``, a Mamba2 mixer's ``in_proj``
``[z, x, B, C, dt]``) is split by TP so that every rank keeps its slice of *each* part. meshplan stores it
*rank-major*: the parts' rank-``r`` slices are contiguous (``[a_0; b_0; a_1; b_1]`` for parts ``a``, ``b`` on two
ranks) and shards it with a plain ``Shard(dim)``, so each rank's local tensor is exactly what its module computes
with, and gradients, optimizers and FSDP2 (any dim, HSDP) work unchanged. The styles that pack a parameter record
its layout on the owning module (:func:`record_packed`); the state code reads it (:func:`packed_parameters`) to
convert a gathered full tensor or state dict (:func:`unpack_full_state_dict`, :func:`pack_full_state_dict`) and to
place each slice at its model-order offset in a distributed checkpoint (:func:`contiguous_runs` on the positions
:func:`model_positions` / :func:`stored_positions` give; :mod:`meshplan.state.distributed_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import PlanError
from ..core.naming import unwrapped_name

#: ``(part sizes along dim, TP size, dim)`` of a parameter stored rank-major
PackedLayout = tuple[tuple[int, ...], int, int]

PACKED_ATTRIBUTE = "_meshplan_packed"


def pack_rank_major(full: torch.Tensor, sizes: Sequence[int], world: int, dim: int = 0) -> torch.Tensor:
    """``[a; b]`` -> ``[a_0; b_0; a_1; b_1; ...]``: each part split in ``world`` chunks, grouped by rank."""
    chunks = [part.chunk(world, dim) for part in full.split(list(sizes), dim)]
    return torch.cat([chunks[i][r] for r in range(world) for i in range(len(sizes))], dim)


def unpack_rank_major(packed: torch.Tensor, sizes: Sequence[int], world: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_rank_major` (e.g. on the ``full_tensor()`` of a packed parameter)."""
    per_rank = [block.split([s // world for s in sizes], dim) for block in packed.chunk(world, dim)]
    return torch.cat([per_rank[r][i] for i in range(len(sizes)) for r in range(world)], dim)


def record_packed(module: nn.Module, name: str, sizes: Sequence[int], world: int, dim: int) -> None:
    """Mark ``module``'s parameter ``name`` as stored rank-major (read by :func:`packed_parameters`)."""
    packed = getattr(module, PACKED_ATTRIBUTE, {})
    packed[name] = (tuple(sizes), world, dim)
    setattr(module, PACKED_ATTRIBUTE, packed)


def packed_parameters(model: nn.Module) -> dict[str, PackedLayout]:
    """``{parameter name: (part sizes, TP size, dim)}`` of the model's parameters stored rank-major (names as
    ``named_parameters`` gives them)."""
    return {f"{fqn}.{name}" if fqn else name: (tuple(sizes), world, dim)
            for fqn, module in model.named_modules()
            for name, (sizes, world, dim) in getattr(module, PACKED_ATTRIBUTE, {}).items()}


def packed_state_keys(model: nn.Module) -> dict[str, PackedLayout]:
    """:func:`packed_parameters` keyed by state-dict names (without wrapper components), as torch's distributed
    state-dict helpers and distributed checkpoints name them."""
    return {unwrapped_name(name): layout for name, layout in packed_parameters(model).items()}


def _packed_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool
                 ) -> Iterator[tuple[str, PackedLayout]]:
    """``(key in state_dict, layout)`` of each packed parameter: its name, or its name without wrapper components
    (as torch's distributed state-dict helpers write it). ``strict``: :class:`PlanError` for one that is missing."""
    for name, layout in packed_parameters(model).items():
        key = next((k for k in (name, unwrapped_name(name)) if k in state_dict), None)
        if key is not None:
            yield key, layout
        elif strict:
            raise PlanError(f"The state dict has no key for the packed parameter {name!r} (nor "
                            f"{unwrapped_name(name)!r}), so its rank-major order cannot be converted.")


def unpack_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = False
                           ) -> dict[str, torch.Tensor]:
    """Restore the original order of packed parameters in a *full* (gathered) state dict, in place.

    Keys may be the model's parameter names or those names without wrapper components (activation checkpointing),
    as torch's distributed state-dict helpers give them; keys not in ``state_dict`` are skipped, or raise with
    ``strict``.
    """
    for key, (sizes, world, dim) in _packed_keys(model, state_dict, strict):
        state_dict[key] = unpack_rank_major(state_dict[key], sizes, world, dim)
    return state_dict


def pack_full_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = False
                         ) -> dict[str, torch.Tensor]:
    """A copy of a *full* state dict (the original layout) with the model's packed parameters stored rank-major,
    as their DTensors hold them, so that loading it gives each rank its own parts; the inverse of
    :func:`unpack_full_state_dict`."""
    packed = dict(state_dict)
    for key, (sizes, world, dim) in _packed_keys(model, packed, strict):
        packed[key] = pack_rank_major(packed[key], sizes, world, dim)
    return packed


# --- positions along the packed dim ----------------------------------------------------------------------
def model_positions(layout: PackedLayout, positions: torch.Tensor) -> torch.Tensor:
    """The model-order indices of the elements a tensor stored in ``layout`` holds at the rank-major
    ``positions`` (indices along the packed dim)."""
    sizes, world, _ = layout
    return pack_rank_major(torch.arange(sum(sizes)), sizes, world)[positions]


def stored_positions(layout: PackedLayout, indices: torch.Tensor) -> torch.Tensor:
    """Where a tensor stored in ``layout`` holds the elements of model-order ``indices`` (the inverse of
    :func:`model_positions`)."""
    sizes, world, _ = layout
    return unpack_rank_major(torch.arange(sum(sizes)), sizes, world)[indices]


def contiguous_runs(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(index, position, length)`` of each maximal run of consecutive ``positions`` (a 1-d integer tensor): the
    elements ``index .. index + length`` sit at ``position .. position + length``."""
    if positions.numel() == 0:
        return []
    breaks = (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, positions.numel()]
    return [(start, int(positions[start]), end - start) for start, end in zip(starts, ends)]
