"""Attention masks under context parallelism: the model's own mask pattern, evaluated for a block of local
queries against the whole (gathered, original-order) sequence of keys.

transformers builds a model's masks with a *mask function* ``(batch, head, q_idx, kv_idx) -> bool`` (causal,
sliding window, chunked, ...) handed to the mask interface registered for ``config._attn_implementation``. The
CP implementation registers :func:`deferred_mask` there: it keeps the mask function and returns a
:class:`DeferredMask`, which the CP attention evaluates block by block for the original positions of its
queries (:meth:`DeferredMask.block`). Sliding windows and any other index-based pattern of the model stay
exactly those of a single process; padding and the documents of packed rows come from the forward's
:class:`~meshplan.context_parallel.forward.ForwardContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .forward import ForwardContext, current


@dataclass(frozen=True)
class DeferredMask:
    """A model's mask pattern and the forward it belongs to, turned into tensors by the CP attention for the
    query blocks it really computes."""

    mask_function: Callable[..., torch.Tensor]
    batch_size: int
    context: ForwardContext
    use_vmap: bool = False

    def block(self, start: int, stop: int) -> tuple[int, torch.Tensor]:
        """``(first, mask)``: bool ``[batch or 1, 1, stop - start, keys]`` (True = attend) for the local queries
        ``start:stop`` against the keys ``first, first + 1, ...`` of the span their documents cover (every key of
        rows of one document), as one process masks them: the pattern on the original positions (on the position
        ids inside each document of packed rows, as transformers remaps them), keys of other documents and
        padding keys masked; keys outside the span are those of other documents."""
        from transformers.masking_utils import sdpa_mask  # loaded on use: keeps start-up light

        context, inner = self.context, self.mask_function
        queries = context.query_positions[start:stop]
        documents, positions = context.documents, context.positions

        def remapped(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
            q_idx = queries[q_idx]
            if documents is None:
                return inner(batch_idx, head_idx, q_idx, kv_idx)
            return (inner(batch_idx, head_idx, positions[batch_idx, q_idx], positions[batch_idx, kv_idx])
                    & (documents[batch_idx, q_idx] == documents[batch_idx, kv_idx]))

        per_row = context.key_padding is not None or documents is not None
        first, last = context.key_span(start, stop)
        return first, sdpa_mask(batch_size=self.batch_size if per_row else 1, q_length=stop - start,
                                kv_length=last - first, kv_offset=first, mask_function=remapped,
                                attention_mask=context.key_padding, allow_is_causal_skip=False,
                                use_vmap=self.use_vmap, device=queries.device)


def deferred_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable[..., torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False, **kwargs: Any,
) -> DeferredMask:
    """The mask interface registered for the CP attention: keeps the pattern and the running forward's context,
    defers the tensors.

    ``q_length`` / ``kv_length`` and the padding mask describe the local shard only; the attention replaces them
    by what it sees (its query blocks, the gathered keys, the whole sequence's padding and documents).
    """
    from transformers.masking_utils import causal_mask_function  # loaded on use: keeps start-up light

    return DeferredMask(mask_function or causal_mask_function, batch_size, current(), use_vmap)


def attended_range(mask: torch.Tensor) -> tuple[int, int]:
    """``(first, last + 1)`` of the keys any query of ``mask`` attends; the whole range when none does."""
    attended = mask.any(dim=(0, 1, 2)).nonzero()
    if attended.numel() == 0:
        return 0, mask.shape[-1]
    return int(attended[0]), int(attended[-1]) + 1


def block_inputs(first: int, mask: torch.Tensor, seq_len: int, dtype: torch.dtype, boolean: bool
                 ) -> tuple[int, int, torch.Tensor]:
    """``(first key, last key + 1, mask)`` for one call of the wrapped attention on a block's ``mask`` of the keys
    ``first, first + 1, ...`` (:meth:`DeferredMask.block`; the others are masked) of a ``seq_len`` sequence.

    Keys no query of the block attends are skipped. A query row that attends nothing (a left-padded position,
    a padded one past a sliding window) gets what one process computes there: SDPA given a ``boolean`` mask
    returns zeros (whatever keys it sees); eager attention, given an additive mask, the mean of the values of
    every key of the sequence, so such a block keeps all keys. Otherwise the mask is additive, which SDPA takes too.
    """
    every_row_attends = bool(mask.any(dim=-1).all())
    if every_row_attends or boolean:
        start, stop = attended_range(mask)
        mask = mask[..., start:stop]
        return first + start, first + stop, additive(mask, dtype) if every_row_attends else mask
    whole = torch.nn.functional.pad(mask, (first, seq_len - first - mask.shape[-1]), value=False)
    return 0, seq_len, additive(whole, dtype)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``mask`` is True, the dtype's minimum elsewhere (what eager attention adds; SDPA takes it too,
    without the float copy of a bool mask that torch's CPU SDPA makes on every call)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
