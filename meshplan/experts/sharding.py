"""Even FSDP2 shards of expert parameters.

FSDP2 shards every parameter on dim 0 by default. A fused expert parameter is ``[num_experts, ...]``, so with more
data-parallel ranks than experts (Mixtral's 8 experts over 16 ranks) half the ranks would hold whole experts and
the other half nothing. As torchtitan does, such a parameter is sharded on another dim instead: the first dim of
its (TP-local) tensor that divides evenly by the shard count, so every rank holds the same number of elements.
FSDP2 requires even shards on a dim other than 0; a parameter with no such dim keeps dim 0 (padded by FSDP2).

Used by the ``fsdp2`` strategy for the data-parallel mesh, and reusable for the ranks that hold the same experts
under expert parallelism (:func:`even_shard_dim` on the local expert shard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..introspection.experts import expert_parameter_names

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


def expert_shard_placement_fn(model: nn.Module, shard_count: int
                              ) -> Callable[[nn.Parameter], Shard | None] | None:
    """A ``fully_shard(..., shard_placement_fn=...)`` giving every expert parameter of ``model`` an even shard over
    ``shard_count`` ranks (other parameters keep FSDP2's default); ``None`` when the default already is even or
    ``model`` has no fused experts. Call it after tensor parallelism (it looks at the parameters as they are now)."""
    from torch.distributed.tensor import Shard  # loaded on use: keeps start-up light

    named = dict(model.named_parameters())
    dims = {id(named[name]): even_shard_dim(local_shape(named[name]), shard_count)
            for name in expert_parameter_names(model)}
    if shard_count <= 1 or not any(dims.values()):
        return None

    def placement(param: nn.Parameter) -> Shard | None:
        dim = dims.get(id(param), 0)
        return Shard(dim) if dim else None

    return placement
