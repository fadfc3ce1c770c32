"""Put context parallelism on a transformers model: checks first, then the attention switch and an input hook.

:func:`validate_context_parallel` runs before any collective and depends only on the model, the CP size and
the options, so every rank raises the same error. :func:`apply_context_parallel` then

1. registers the CP attention (:mod:`meshplan.context_parallel.attention`) and switches the model's
   ``config._attn_implementation`` to it, remembering the implementation it wraps;
2. hooks the model's forward: the batch must carry the :class:`~meshplan.context_parallel.batch.SequenceShard`
   of :func:`~meshplan.context_parallel.shard_batch` (:func:`check_shard`, no collective); position ids default to
   the global positions of the local tokens (so rotary embeddings are those of one process); the whole
   sequence's padding and documents go to the attention in a per-forward context (:mod:`.forward`).
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..core.errors import (
    ContextParallelError,
    OptionsError,
    UnshardedInputError,
    UnsupportedAttentionError,
    UnsupportedSequenceMixerError,
)
from ..core.log import get_logger, log_rank0
from ..introspection.attention import attention_modules
from ..introspection.mixers import sequence_mixers
from . import sequence_layout as layout
from .attention import ATTENTION_NAME, describe, register, takes_dense_mask
from .batch import SHARD_KEY, SequenceShard
from .documents import document_spans
from .forward import ForwardContext, query_blocks, set_current
from .state import IMPLEMENTATIONS, ContextParallelState, bind

logger = get_logger(__name__)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedAttentionError(
            f"{type(model).__qualname__} is not a transformers model with an attention implementation "
            "(config._attn_implementation): context parallelism wraps the attention a model dispatches through "
            "transformers' AttentionInterface and cannot reach attention computed inside the model's own code.")
    return config


def attention_classes(model: nn.Module) -> dict[type, bool]:
    """The classes of the model's attention modules (:func:`~meshplan.introspection.attention.attention_modules`)
    -> whether their modeling file dispatches through transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``)."""
    classes = dict.fromkeys(type(module) for module in attention_modules(model).values())
    return {cls: hasattr(sys.modules.get(cls.__module__), "ALL_ATTENTION_FUNCTIONS") for cls in classes}


def check_sequence_mixers(model: nn.Module) -> None:
    """:class:`UnsupportedSequenceMixerError` naming every sequence mixer of ``model`` other than attention
    (:func:`~meshplan.introspection.mixers.sequence_mixers`): context parallelism splits the sequence and wraps only
    the attention, so a convolution or recurrence along the sequence would see only this rank's chunks."""
    mixers = sequence_mixers(model)
    if not mixers:
        return
    shown = ", ".join(str(mixer) for mixer in mixers[:4]) + (f", and {len(mixers) - 4} more" if len(mixers) > 4 else "")
    raise UnsupportedSequenceMixerError(
        f"{type(model).__qualname__} mixes tokens with {len(mixers)} module(s) that context parallelism cannot split "
        f"along the sequence: {shown}. CP wraps only the attention; a convolution or recurrence over the sequence "
        "would see only this rank's chunks and compute wrong outputs and gradients. Use cp=1 for this model "
        "(tensor and data parallelism still apply).")


def _uses_sliding_window(config: Any) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def held_configs(model: nn.Module, implementation: str) -> list[Any]:
    """``model.config`` and every other config object a module of ``model`` holds with the same attention
    ``implementation`` (a pipeline stage's base model holds a copy cut to its blocks): transformers reads the
    attention implementation from the config of the module that builds the masks or runs the attention."""
    configs = {id(_config(model)): _config(model)}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == implementation:
            configs.setdefault(id(config), config)
    return list(configs.values())


def wrapped_implementation(model: nn.Module) -> str:
    """The attention implementation CP will wrap: the model's own, or the one recorded when CP was applied."""
    config = _config(model)
    current = config._attn_implementation
    return getattr(model, "_meshplan_cp_inner", current) if current == ATTENTION_NAME else current


def validate_context_parallel(model: nn.Module, implementation: str, device_type: str) -> None:
    """Raise a typed error if CP with ``implementation`` on a ``device_type`` mesh cannot run on ``model``.

    Collective-free and deterministic (identical on every rank).
    """
    if implementation not in IMPLEMENTATIONS:
        raise OptionsError(f"cp_implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}.")
    check_sequence_mixers(model)  # conv / recurrent mixers are wrong on a sequence slice whoever runs CP
    if implementation == "external":
        return
    config = _config(model)
    name = type(model).__qualname__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedAttentionError(
            f"{name} does not declare _supports_attention_backend: its attention does not go through "
            "transformers' AttentionInterface, so context parallelism cannot wrap it.")
    classes = attention_classes(model)
    if not classes:
        raise UnsupportedAttentionError(f"{name} has no attention module (no class named '*Attention*') to wrap.")
    inline = sorted(cls.__qualname__ for cls, dispatches in classes.items() if not dispatches)
    if inline:
        raise UnsupportedAttentionError(
            f"{', '.join(inline)} in {name} compute(s) attention without transformers' AttentionInterface, so "
            "context parallelism cannot wrap it.")
    inner = wrapped_implementation(model)
    if implementation == "ring":
        if device_type != "cuda":
            raise UnsupportedAttentionError(
                f"cp_implementation='ring' (torch's ring attention) runs only on CUDA SDPA kernels; this mesh is "
                f"{device_type!r}. Use cp_implementation='allgather', which works on every device.")
        if inner != "sdpa":
            raise UnsupportedAttentionError(
                f"cp_implementation='ring' needs attn_implementation='sdpa'; {name} uses {inner!r}.")
        if _uses_sliding_window(config):
            raise UnsupportedAttentionError(
                f"{name} uses a sliding window (sliding_window={config.sliding_window}), which torch's ring "
                "attention cannot mask; use cp_implementation='allgather'.")
        return
    if not takes_dense_mask(inner):
        raise UnsupportedAttentionError(
            f"{name} uses attn_implementation={inner!r}, which takes no dense attention mask, so the all-gather "
            "context parallelism cannot give it the mask of its local queries. Use 'sdpa' or 'eager' (or "
            "cp_implementation='ring' on CUDA with 'sdpa').")


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, implementation: str = "allgather", *,
                           validate: bool = True) -> nn.Module:
    """Make ``model`` run context parallel over the 1-D ``cp_mesh`` (validated first unless the caller already ran
    :func:`validate_context_parallel`, as a strategy's ``validate`` does); returns it.

    Batches must then be sharded with :func:`meshplan.context_parallel.shard_batch` (a batch without its
    :class:`~meshplan.context_parallel.batch.SequenceShard` raises :class:`UnshardedInputError`); a CP size of 1
    changes nothing.
    """
    if cp_mesh.ndim != 1:
        raise ContextParallelError(f"The CP mesh must be 1-D, got dims {cp_mesh.mesh_dim_names}.")
    if validate:
        validate_context_parallel(model, implementation, cp_mesh.device_type)
    if cp_mesh.size() == 1 or implementation == "external":
        return model
    inner = wrapped_implementation(model)
    register()
    state = ContextParallelState(cp_mesh, implementation, inner)
    bind(model, state)
    for config in held_configs(model, inner):
        config._attn_implementation = ATTENTION_NAME
    model._meshplan_cp_inner = inner
    model.register_forward_pre_hook(functools.partial(_enter_forward, state=state), with_kwargs=True, prepend=True)
    model.register_forward_hook(_leave_forward, with_kwargs=True, always_call=True)
    log_rank0(logger, logging.INFO, "context parallel: %s", describe(state))
    return model


def check_shard(shard: SequenceShard | None, local_len: int, cp_size: int, implementation: str) -> None:
    """Raise a typed error unless ``shard`` describes a batch that :func:`shard_batch` cut for this CP group into
    shards of ``local_len`` tokens. Collective-free: the same on every rank of a group that runs the same code."""
    layout.check_local_length(local_len, cp_size)
    how = ("Shard every batch with meshplan.context_parallel.shard_batch(batch, mesh['cp']) and call "
           "model(**shard), which passes its description of the whole sequence (the model keyword "
           f"{SHARD_KEY!r}).")
    if shard is None:
        raise UnshardedInputError(
            f"This model runs context parallel over cp={cp_size}, but its input ({local_len} tokens per sequence) "
            f"was not sharded for it: every rank would attend over a different sequence. {how}")
    if not isinstance(shard, SequenceShard) or shard.cp_size != cp_size or shard.seq_len != local_len * cp_size:
        raise UnshardedInputError(
            f"The batch was sharded for {getattr(shard, 'cp_size', '?')} CP ranks and sequences of "
            f"{getattr(shard, 'seq_len', '?')} tokens, but this model runs over cp={cp_size} and got {local_len} "
            f"tokens per rank. {how}")
    if implementation == "ring" and (shard.key_padding is not None or shard.documents is not None):
        raise ContextParallelError(
            "cp_implementation='ring' is plain causal attention: it takes no attention_mask and no packed rows "
            "(position_ids that restart, seq_idx, cu_seq_lens_q); use cp_implementation='allgather'.")


def _enter_forward(module: nn.Module, args: tuple, kwargs: dict, state: ContextParallelState) -> tuple[tuple, dict]:
    """Forward pre-hook of the model: checks the shard, then global position ids, no cache, and this forward's
    :class:`~meshplan.context_parallel.forward.ForwardContext` made current for the mask interface."""
    shard = kwargs.pop(SHARD_KEY, None)
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ContextParallelError("Context parallelism needs input_ids or inputs_embeds to find the sequence length.")
    batch, local_len = tokens.shape[0], tokens.shape[1]
    check_shard(shard, local_len, state.size, state.implementation)
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ContextParallelError("Context parallelism is for training: a KV cache is not supported.")
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.ndim != 2:
        raise ContextParallelError(
            f"Context parallelism takes a 2-D padding mask [batch, local tokens]; got a {mask.ndim}-D mask.")
    kwargs["use_cache"] = False
    positions, restore = state.indices(local_len, tokens.device)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = positions.unsqueeze(0).expand(batch, -1)
    # The padding and the documents reach the attention through the context; transformers gets an all-ones
    # mask, as it would otherwise take the non-contiguous global position ids for packed sequences.
    kwargs["attention_mask"] = torch.ones((batch, local_len), dtype=torch.bool, device=tokens.device)
    set_current(forward_context(shard, positions, restore, tokens.device))
    return args, kwargs


def forward_context(shard: SequenceShard, positions: torch.Tensor, restore: torch.Tensor,
                    device: torch.device) -> ForwardContext:
    """The context of one forward: the shard's whole-sequence tensors on ``device`` and the query blocks, cut at
    the documents that start among the local tokens (original ``positions``)."""
    padding, documents, mask_positions = (None if t is None else t.to(device)
                                          for t in (shard.key_padding, shard.documents, shard.positions))
    starts = None
    if documents is not None:
        local = documents.index_select(1, positions)
        starts = (local[:, 1:] != local[:, :-1]).any(dim=0).nonzero().flatten() + 1
    return ForwardContext(positions, restore, query_blocks(len(positions), starts), padding, documents,
                          mask_positions, None if documents is None else document_spans(documents))


def _leave_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    set_current(None)
