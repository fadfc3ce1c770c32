"""The context-parallel attention function registered in transformers' ``AttentionInterface``.

Each CP rank keeps its queries; keys and values are all-gathered over the CP group (their gradients are
reduce-scattered back), and the attention the model used before CP (``eager``, ``sdpa``, or any function
registered with an SDPA- or eager-style mask) runs on them with the model's own mask evaluated for the
local query positions (:mod:`meshplan.context_parallel.masks`). With ``cp_implementation="ring"`` the call
goes to torch's ring attention instead (:mod:`meshplan.context_parallel.ring`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import ContextParallelError, UnsupportedAttentionError
from .collectives import all_gather_key_value
from .masks import DeferredMask, block_inputs, deferred_mask
from .ring import ring_attention
from .state import ContextParallelState, state_of

#: The name the model's ``config._attn_implementation`` is switched to.
ATTENTION_NAME = "meshplan_context_parallel"
SEQ_DIM = 2  # transformers attention functions take [batch, heads, seq, head_dim]


def register() -> None:
    """Register the CP attention and its mask function with transformers (idempotent)."""
    # loaded on use: keeps start-up light
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, deferred_mask)


def inner_function(module: nn.Module, inner: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function ``module`` would call for implementation ``inner`` without CP.

    For ``"eager"`` that is the ``eager_attention_forward`` of the module's own modeling file (what
    transformers passes as the default); other names come from the global ``AttentionInterface``.
    """
    if inner == "eager":
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if function is None:
            raise UnsupportedAttentionError(
                f"{type(module).__qualname__} (in {type(module).__module__}) has no module-level "
                "eager_attention_forward for context parallelism to wrap; use attn_implementation='sdpa'.")
        return function
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # loaded on use: keeps start-up light

    return ALL_ATTENTION_FUNCTIONS[inner]


def context_parallel_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: Any, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of the local queries over the whole (gathered) sequence; same signature as transformers'.

    Queries go in the blocks of the forward's context (at most :data:`~.forward.QUERY_BLOCK` within one chunk,
    cut at document starts of packed rows); each block sees only the keys its mask lets it attend (a causal head
    chunk skips the future, a sliding window the distant past, a document every other document), which is exact
    and saves the masked work. The whole gather-and-attend step is recomputed in backward instead of keeping the
    gathered keys, values and masks of every layer alive (one more all-gather per layer). Attention weights are
    not returned.
    """
    state = state_of(module)
    if state.implementation == "ring":
        return ring_attention(state, module, query, key, value, **kwargs)
    if not isinstance(attention_mask, DeferredMask):
        raise ContextParallelError(
            f"{type(module).__qualname__} received a {type(attention_mask).__name__} attention mask, not the mask "
            "the context-parallel mask interface builds; pass a 2-D padding mask (or none) to the model, not a "
            "prepared 4-D mask.")
    inner = inner_function(module, state.inner)
    boolean = takes_bool_mask(state.inner)
    context = attention_mask.context  # this forward's, also when backward recomputes after other forwards

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        key, value = all_gather_key_value(key, value, SEQ_DIM, state.group)
        key, value = key.index_select(SEQ_DIM, context.restore), value.index_select(SEQ_DIM, context.restore)
        outputs = []
        for start, stop in context.blocks:
            first, last, mask = block_inputs(*attention_mask.block(start, stop), context.seq_len, query.dtype,
                                             boolean)
            out, _ = inner(module, query[:, :, start:stop], key[:, :, first:last], value[:, :, first:last], mask,
                           **kwargs)
            outputs.append(out)
        return torch.cat(outputs, dim=1)  # transformers' layout: [batch, tokens, heads, head_dim]

    if not torch.is_grad_enabled():
        return attend(query, key, value), None
    return checkpoint(attend, query, key, value, use_reentrant=False), None


def takes_bool_mask(inner: str) -> bool:
    """Whether attention implementation ``inner`` gets a boolean mask in one process (SDPA's mask interface);
    eager-style ones get an additive mask."""
    # loaded on use: keeps start-up light
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner) is sdpa_mask


def takes_dense_mask(inner: str) -> bool:
    """Whether attention implementation ``inner`` takes a dense 4-D mask (eager, SDPA, or any function registered
    with their mask interfaces), which the CP attention needs to hand it the mask of its query blocks. Flash,
    flex and paged attention do not."""
    # loaded on use: keeps start-up light
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    return inner == "eager" or ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner) in (sdpa_mask, eager_mask)


def describe(state: ContextParallelState) -> str:
    """One line for logs: ``allgather over cp=2 wrapping 'sdpa'``."""
    return f"{state.implementation} over cp={state.size} wrapping {state.inner!r}"
