"""Attention masks under context parallelism: the model's own mask pattern, evaluated for local queries
against the gathered keys.

transformers builds a model's masks with a *mask function* ``(batch, head, q_idx, kv_idx) -> bool`` (causal,
sliding window, chunked, ...) handed to the mask interface registered for ``config._attn_implementation``. The
CP implementation registers :func:`deferred_mask` there: it keeps the mask function and returns a
:class:`DeferredMask`, which the CP attention materializes once per forward for the shapes it really sees (the
local queries, the gathered keys), remapping the indices to original sequence positions. Sliding windows and
any other index-based pattern of the model therefore stay exactly the ones of a single process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .state import ContextParallelState


@dataclass
class DeferredMask:
    """A model mask whose tensor is built on first use by the CP attention (then cached for all layers)."""

    mask_function: Callable[..., torch.Tensor]
    batch_size: int
    use_vmap: bool = False
    _built: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def materialize(self, state: ContextParallelState, local_len: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """The ``[batch or 1, 1, local_len, cp * local_len]`` mask for the wrapped attention: bool (True =
        attend) for SDPA-style attention, additive (0 / dtype min) for eager-style attention."""
        key = (local_len, state.mask_kind, dtype, str(device))
        if key not in self._built:
            self._built[key] = self._build(state, local_len, dtype, device)
        return self._built[key]

    def _build(self, state: ContextParallelState, local_len: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        from transformers.masking_utils import sdpa_mask

        q_positions, kv_positions = state.indices(local_len, device)
        inner = self.mask_function

        def remapped(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
            return inner(batch_idx, head_idx, q_positions[q_idx], kv_positions[kv_idx])

        padding = state.key_padding
        mask = sdpa_mask(batch_size=self.batch_size if padding is not None else 1, q_length=local_len,
                         kv_length=local_len * state.size, mask_function=remapped, attention_mask=padding,
                         allow_is_causal_skip=False, use_vmap=self.use_vmap, device=device)
        if state.mask_kind == "additive":
            mask = torch.where(mask, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
        return mask


def deferred_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False, **kwargs: Any,
) -> DeferredMask:
    """The mask interface registered for the CP attention: keeps the pattern, defers the tensor.

    ``q_length`` / ``kv_length`` describe the local shard only and the padding mask is local too; both are
    replaced when the mask is materialized (shapes from the attention call, padding gathered over CP).
    """
    from transformers.masking_utils import causal_mask_function

    return DeferredMask(mask_function or causal_mask_function, batch_size, use_vmap)
