"""Packed parameters: how TP stores them, and the conversions to and from the model's order.

A packed parameter (fused ``[gate; up]`` of experts, ``[q; k; v]``, a Mamba2 mixer's ``in_proj``
``[z, x, B, C, dt]``) is split by TP so that every rank keeps its slice of *each* part: rank ``r`` holds
``[a_r; b_r]`` for parts ``a``, ``b``, exactly what its module computes with.

* **Equal parts** (``[gate; up]``, MHA ``[q; k; v]``): the DTensor placement is torch's
  ``_StridedShard(dim, split_factor=parts)``, which describes that layout, so ``full_tensor()``, ``redistribute``,
  ``distribute_tensor``, torch's state-dict helpers and the optimizers all see the model's order
  (:func:`packed_placement`). A forward that computes with DTensors reads the parameter through
  :func:`rank_major_view`.
* **Unequal parts** (GQA ``[q; k; v]``, Mamba2 ``in_proj``): no torch placement describes them (``_StridedShard``
  splits in equal pieces; a subclass of it with part sizes is rebuilt as a plain one by ``distribute_tensor`` and
  refused by DTensor's sharding rules, measured on torch 2.13). They are stored *rank-major* (the parts' rank-``r``
  slices contiguous, ``[a_0; b_0; a_1; b_1]``) with a plain ``Shard(dim)`` and their layout is recorded on the
  owning module (:func:`record_packed`, read by :func:`packed_parameters`): their ``full_tensor()`` is rank-major;
  :func:`full_tensor`, ``gather_full_state_dict``, ``save_pretrained`` and distributed checkpoints convert them.
  So is an equal-parts parameter that FSDP must shard along its packed dim (:func:`to_rank_major`): FSDP's
  placement on top of a ``_StridedShard`` of the same dim would not describe its shards.

Positions along a rank-major dim (:func:`model_positions` / :func:`stored_positions`, :func:`contiguous_runs`) place
each slice at its model-order offset in a distributed checkpoint (:mod:`meshplan.state.distributed_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Shard

from ..core.errors import PlanError
from ..core.naming import unwrapped_name
from ..core.torch_private import resolve

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


def equal_parts(sizes: Sequence[int]) -> bool:
    """Whether packed parts of ``sizes`` are described by torch's ``_StridedShard`` (all of one size)."""
    return len(set(sizes)) == 1


def packed_placement(sizes: Sequence[int], dim: int) -> Placement:
    """The TP placement of a parameter packed from parts ``sizes`` along ``dim``: ``_StridedShard(dim,
    split_factor=len(sizes))`` for equal parts (a full tensor in the model's order), else ``Shard(dim)`` (stored
    rank-major: pack it with :func:`pack_rank_major` and :func:`record_packed` it)."""
    return resolve("StridedShard")(dim, split_factor=len(sizes)) if equal_parts(sizes) else Shard(dim)


def _strided(placement: Placement) -> bool:
    return isinstance(placement, resolve("StridedShard"))


def _packed_strided(tensor: torch.Tensor) -> tuple[int, Placement] | None:
    """``(mesh dim, placement)`` of ``tensor``'s TP-packed ``_StridedShard``: the last placement sharding its dim
    (FSDP2's own ``_StridedShard`` over a TP ``Shard`` of the same dim is followed by it)."""
    placements = tensor.placements if isinstance(tensor, DTensor) else ()
    for mesh_dim, placement in enumerate(placements):
        later = placements[mesh_dim + 1:]
        if _strided(placement) and not any(not (p.is_replicate() or p.is_partial()) and p.dim == placement.dim
                                           for p in later):
            return mesh_dim, placement
    return None


def rank_major_view(param: torch.Tensor) -> torch.Tensor:
    """A DTensor of TP-packed ``param`` whose packed ``_StridedShard`` reads as ``Shard``: the same local tensor
    (``[a_r; b_r]``), seen rank-major, as torch's column- and row-wise styles compute with. Gradients reach
    ``param`` unchanged. Other tensors are returned as they are."""
    found = _packed_strided(param)
    if found is None:
        return param
    placements = list(param.placements)
    placements[found[0]] = Shard(found[1].dim)
    return DTensor.from_local(param.to_local(), param.device_mesh, placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def strided_packed_dim(param: torch.Tensor) -> int | None:
    """The packed dim of a parameter TP holds as ``_StridedShard`` (:func:`packed_placement`), else ``None``."""
    found = _packed_strided(param)
    return found[1].dim if found is not None else None


def strided_layout(param: torch.Tensor) -> PackedLayout | None:
    """The rank-major layout (:data:`PackedLayout`) holding the same local tensors as a ``_StridedShard``-packed
    ``param``; ``None`` for other tensors."""
    found = _packed_strided(param)
    if found is None:
        return None
    mesh_dim, placement = found
    parts = placement.split_factor
    return (param.shape[placement.dim] // parts,) * parts, param.device_mesh.size(mesh_dim), placement.dim


def as_rank_major(model: nn.Module) -> dict[str, PackedLayout]:
    """:func:`packed_state_keys` plus the layout each ``_StridedShard``-packed parameter would have rank-major (as
    meshplan stored every packed parameter before), by state-dict name."""
    strided = {unwrapped_name(name): strided_layout(param) for name, param in model.named_parameters()}
    return {name: layout for name, layout in strided.items() if layout is not None} | packed_state_keys(model)


def to_rank_major(module: nn.Module, name: str) -> None:
    """Re-express ``module``'s ``_StridedShard``-packed parameter ``name`` as rank-major ``Shard`` and record it:
    no data moves (the local tensor is the same). For a data-parallel wrapper that must shard the packed dim."""
    param = module._parameters[name]
    record_packed(module, name, *strided_layout(param))
    module.register_parameter(name, nn.Parameter(rank_major_view(param.detach()), requires_grad=param.requires_grad))


def all_to_rank_major(model: nn.Module) -> None:
    """:func:`to_rank_major` for every ``_StridedShard``-packed parameter of ``model`` (a data-parallel wrapper
    that does not know ``_StridedShard`` placements, such as Megatron-FSDP)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and strided_packed_dim(param) is not None:
                to_rank_major(module, name)


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


def full_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The full tensor of ``model``'s parameter or buffer ``name`` in the unparallelized model's order, whatever
    its layout: ``DTensor.full_tensor()`` (which is already in that order for every parameter but the rank-major
    ones, see the module docstring) followed by the recorded rank-major unpacking. Collective for a DTensor:
    call it on every rank. ``name`` as ``named_parameters`` gives it, or without wrapper components."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    found = tensors[name] if name in tensors else {unwrapped_name(n): t for n, t in tensors.items()}.get(name)
    if found is None:
        raise PlanError(f"The model has no parameter or buffer {name!r}.")
    full = found.full_tensor() if isinstance(found, DTensor) else found.detach()
    layout = packed_state_keys(model).get(unwrapped_name(name))
    return unpack_rank_major(full, *layout) if layout is not None else full


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
