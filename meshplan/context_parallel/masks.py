"""Attention masks under context parallelism: the model's own mask pattern, evaluated for a block of local
queries against the whole (gathered, original-order) sequence of keys.

transformers builds a model's masks with a *mask function* ``(batch, head, q_idx, kv_idx) -> bool`` (causal,
sliding window, chunked, ...) handed to the mask interface registered for ``config._attn_implementation``. The
CP implementation registers :func:`deferred_mask` there: it keeps the mask function and returns a
:class:`DeferredMask`, which the CP attention evaluates block by block for the original positions of its
queries (:meth:`DeferredMask.block`). Sliding windows and any other index-based pattern of the model stay
exactly those of a single process; the padding mask is the one gathered by the model's input hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeferredMask:
    """A model's mask pattern, turned into tensors by the CP attention for the shapes it really sees."""

    mask_function: Callable[..., torch.Tensor]
    batch_size: int
    use_vmap: bool = False

    def block(self, q_positions: torch.Tensor, kv_length: int, padding: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[batch or 1, 1, len(q_positions), kv_length]`` (True = attend) for queries at the original
        positions ``q_positions`` and keys at positions ``0 .. kv_length - 1``, and the key ``padding``
        ``[batch, kv_length]`` (gathered, original order; ``None`` = none)."""
        from transformers.masking_utils import sdpa_mask

        inner = self.mask_function

        def remapped(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
            return inner(batch_idx, head_idx, q_positions[q_idx], kv_idx)

        return sdpa_mask(batch_size=self.batch_size if padding is not None else 1, q_length=len(q_positions),
                         kv_length=kv_length, mask_function=remapped, attention_mask=padding,
                         allow_is_causal_skip=False, use_vmap=self.use_vmap, device=q_positions.device)


def deferred_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False, **kwargs: Any,
) -> DeferredMask:
    """The mask interface registered for the CP attention: keeps the pattern, defers the tensors.

    ``q_length`` / ``kv_length`` describe the local shard only and the padding mask is local too; both are
    replaced by what the attention sees (its query blocks, the gathered keys, the gathered padding).
    """
    from transformers.masking_utils import causal_mask_function

    return DeferredMask(mask_function or causal_mask_function, batch_size, use_vmap)


def attended_range(mask: torch.Tensor) -> tuple[int, int]:
    """``(first, last + 1)`` of the keys any query of ``mask`` attends; the whole range when none does."""
    attended = mask.any(dim=(0, 1, 2)).nonzero()
    if attended.numel() == 0:
        return 0, mask.shape[-1]
    return int(attended[0]), int(attended[-1]) + 1


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``mask`` is True, the dtype's minimum elsewhere (what eager attention adds; SDPA takes it too,
    without the float copy of a bool mask that torch's CPU SDPA makes on every call)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
