"""FSDP2 shard dims: even shards of expert parameters, and packed parameters sharded off their packed dim.

FSDP2 shards every parameter on dim 0 by default. A fused expert parameter is ``[num_experts, ...]``, so with more
data-parallel ranks than experts (Mixtral's 8 experts over 16 ranks) half the ranks would hold whole experts and
the other half nothing. As torchtitan does, such a parameter is sharded on another dim instead: the first dim of
its (TP-local) tensor that divides evenly by the shard count, so every rank holds the same number of elements.
FSDP2 requires even shards on a dim other than 0; a parameter with no such dim keeps dim 0 (padded by FSDP2).

A parameter that TP holds as ``_StridedShard`` (equal packed parts, :mod:`meshplan.state.packing`) cannot also be
sharded by FSDP2 along its packed dim: FSDP2's placement on top would not describe its shards. It is sharded on
another dim that divides evenly; with none (a 1-D packed bias), it is re-expressed rank-major first
(:func:`~meshplan.state.packing.to_rank_major`, recorded, so checkpoints still convert it).

Used by the ``fsdp2`` strategy for the data-parallel mesh and for the ranks that hold the same experts under expert
parallelism (:func:`even_shard_dim` on the local expert shard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..introspection.experts import expert_parameter_names
from ..state.packing import strided_packed_dim, to_rank_major

if TYPE_CHECKING:
    from torch.distributed.tensor import Shard


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape FSDP2 shards: a DTensor's local tensor (e.g. after TP), else the tensor itself."""
    from torch.distributed.tensor import DTensor  # loaded on use: keeps start-up light

    return tuple((param.to_local() if isinstance(param, DTensor) else param).shape)


def even_shard_dim(shape: Sequence[int], shard_count: int) -> int:
    """Dim 0 if it splits evenly in ``shard_count`` parts, else the first dim that does, else 0 (uneven)."""
    if not shape or shape[0] % shard_count == 0:
        return 0
    return next((dim for dim, size in enumerate(shape) if size % shard_count == 0), 0)


def _off_packed_dim(shape: Sequence[int], dim: int, packed: int | None, shard_count: int) -> int | None:
    """``dim``, or when it is the packed dim the first other dim dividing evenly (``None``: there is none)."""
    if packed is None or dim != packed:
        return dim
    return next((d for d, size in enumerate(shape) if d != packed and size % shard_count == 0), None)


def shard_placement_fn(model: nn.Module, shard_count: int, expert_shard_count: int | None = None
                       ) -> Callable[[nn.Parameter], Shard | None] | None:
    """A ``fully_shard(..., shard_placement_fn=...)`` for every unit of ``model`` (see the module docstring):
    expert parameters get an even shard over ``expert_shard_count`` ranks (default ``shard_count``), ``_StridedShard``
    packed parameters a dim other than their packed one; the others keep FSDP2's default. ``None`` when the default
    holds for all. Call it after tensor parallelism and before ``fully_shard`` (it may re-express parameters)."""
    from torch.distributed.tensor import Shard  # loaded on use: keeps start-up light

    experts = set(expert_parameter_names(model))
    dims: dict[int, int] = {}
    for fqn, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            full_name = f"{fqn}.{name}" if fqn else name
            count = (expert_shard_count or shard_count) if full_name in experts else shard_count
            if param is None or count <= 1:
                continue
            shape = local_shape(param)
            dim = _off_packed_dim(shape, even_shard_dim(shape, count) if full_name in experts else 0,
                                  strided_packed_dim(param), count)
            if dim is None:
                to_rank_major(module, name)
                param, dim = module._parameters[name], even_shard_dim(shape, count) if full_name in experts else 0
            dims[id(param)] = dim
    if not any(dims.values()):
        return None

    def placement(param: nn.Parameter) -> Shard | None:
        dim = dims.get(id(param), 0)
        return Shard(dim) if dim else None

    return placement
