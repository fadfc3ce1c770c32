"""``cp_implementation="ring"``: torch's ring attention (``torch.distributed.tensor.experimental``) for CUDA SDPA.

The local query, key and value shards become DTensors sharded on the sequence dim of the CP mesh and
``scaled_dot_product_attention(..., is_causal=True)`` is dispatched to torch's ring flash / efficient / cuDNN
kernels, which rotate K/V around the ring instead of gathering them. torch's head-tail load balancer uses
the layout of :mod:`meshplan.context_parallel.sequence_layout`, so batches are sharded the same way for both
implementations. Plain causal attention only: no padding mask, no sliding window (checked before any
collective by :func:`meshplan.context_parallel.apply.validate_context_parallel`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.torch_private import enable_ring_attention
from .state import ContextParallelState

_enabled = False


def _enable_dispatcher() -> None:
    """Route DTensor SDPA to ring attention with the head-tail layout (process-wide, once)."""
    global _enabled
    if _enabled:
        return
    enable_ring_attention(load_balance=True)
    _enabled = True


def ring_attention(
    state: ContextParallelState, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of the local shards through torch's ring attention; transformers' output layout."""
    from torch.distributed.tensor import DTensor, Shard  # loaded on use: keeps start-up light

    _enable_dispatcher()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # ring kernels take as many K/V heads as query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (DTensor.from_local(t.contiguous(), state.mesh, [Shard(2)], run_check=False)
               for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                           scale=scaling)
    return out.to_local().transpose(1, 2).contiguous(), None
