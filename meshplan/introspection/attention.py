"""Attention modules, by transformers' naming convention (a class named ``*Attention*``) and structure."""

from __future__ import annotations

from torch import nn

#: Attributes that mark an attention module whose key/value heads tensor parallelism splits (and replicates when
#: they are fewer than the TP ranks): separate key projections, a head width or a KV head count.
HEAD_MARKS = ("k_proj", "head_dim", "num_key_value_heads")


def is_attention_class(cls: type) -> bool:
    """Whether ``cls`` is named as an attention module (``attention`` in its name, any case)."""
    return "attention" in cls.__name__.lower()


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{fqn: module}`` of the model's attention modules: modules of a class named ``*Attention*`` that hold no
    other such module. A decoder layer (Jamba's ``JambaAttentionDecoderLayer``), a wrapper (BERT's
    ``BertAttention`` around ``BertSelfAttention``, DBRX's ``DbrxNormAttentionNorm``) or a pooling head around
    ``nn.MultiheadAttention`` is not one; the modules they hold are. Linear-attention blocks named so (Kimi's
    ``KimiLinearDeltaAttention``) are included: :func:`~meshplan.introspection.mixers.sequence_mixers` tells them
    apart."""
    named = {fqn: module for fqn, module in model.named_modules() if is_attention_class(type(module))}
    return {fqn: module for fqn, module in named.items()
            if not any(other.startswith(f"{fqn}.") or (fqn == "" and other) for other in named)}


def head_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The :func:`attention_modules` that carry their heads' layout (an attribute of :data:`HEAD_MARKS`): those
    whose heads a tensor-parallel plan splits. Multi-head latent attention (DeepSeek's ``q_b_proj`` /
    ``kv_b_proj``) and fused ``query_key_value`` projections carry none."""
    return {fqn: module for fqn, module in attention_modules(model).items()
            if any(hasattr(module, mark) for mark in HEAD_MARKS)}
