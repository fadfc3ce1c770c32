"""Sequence mixers other than attention: modules that combine the tokens of a sequence through a convolution
along it or a recurrence over it.

Found by structure inside the language model's layer stacks (:func:`language_model_stacks`: the ``ModuleList``
beside the input embedding, so a vision or audio tower is not searched), outermost first (a mixer's own parts are
not mixers again):

* ``mamba2`` — a state-space mixer with per-head ``A_log`` / ``dt_bias`` / ``D`` and a depthwise ``conv1d``
  (Bamba, GraniteMoeHybrid, Nemotron-H, Zamba2, Falcon-H1);
* ``mamba`` — a Mamba1 mixer: ``A_log`` / ``D``, ``x_proj`` and ``dt_proj`` (Mamba, Jamba, FalconMamba);
* ``linear_attention`` — a depthwise ``conv1d`` over query/key/value channels (``q_proj`` / ``k_proj`` /
  ``v_proj`` or a fused ``in_proj_qkv*``): gated delta nets (Qwen3-Next, Qwen3.5, OLMo-Hybrid), Kimi delta
  attention, BailingHybrid;
* ``short_conv`` — an ``in_proj`` / depthwise ``conv`` / ``out_proj`` short convolution (LFM2, LFM2-MoE);
* ``convolution`` — any other module holding a depthwise ``nn.Conv1d`` (RecurrentGemma's recurrent block,
  Inkling's short convolutions, Zaya's convolutional attention projection);
* ``state_space`` — any other module with an ``A_log`` decay parameter.

A layer the config declares a recurrent kind (transformers' ``layer_types``: :data:`MIXER_LAYER_TYPES`, e.g.
MiniMax's ``linear_attention`` lightning attention) and in which no mixer was found by structure is reported as
that layer, with the layer type as its kind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .blocks import find_block_containers
from .config import text_config
from .embeddings import embedding_modules, module_name

#: Values of a config's ``layer_types`` (transformers 5.24 lists the allowed ones in ``configuration_utils``) whose
#: layers mix tokens by a recurrence or a convolution: state-space and linear-attention layers, short convolutions
#: and the hybrids of attention with a recurrent state.
MIXER_LAYER_TYPES = ("linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding", "recurrent")
#: The depthwise convolution child of a linear-attention block.
CONVOLUTION = "conv1d"
#: Separate query/key/value projections of a linear-attention block.
QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
#: Name prefix of a fused query/key/value(/z) projection (Qwen3.5's ``in_proj_qkv``, Qwen3-Next's ``in_proj_qkvz``).
FUSED_QKV_PREFIX = "in_proj_qkv"


@dataclass(frozen=True)
class SequenceMixer:
    """One sequence mixer: its fully qualified name, its kind (see the module docstring) and its class name."""

    fqn: str
    kind: str
    type_name: str

    def __str__(self) -> str:
        return f"{self.fqn} ({self.type_name}, {self.kind})"


def is_depthwise_conv(module: nn.Module | None) -> bool:
    """Whether ``module`` is an ``nn.Conv1d`` with one group per channel (a convolution along the sequence)."""
    return type(module) is nn.Conv1d and module.in_channels == module.out_channels == module.groups


def is_linear_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a linear-attention block: a depthwise ``conv1d`` child and query/key/value
    projections (separate or a fused ``in_proj_qkv*``); Mamba mixers convolve x/B/C, not q/k/v."""
    if not is_depthwise_conv(getattr(module, CONVOLUTION, None)):
        return False
    children = dict(module.named_children())
    separate = all(type(children.get(name)) is nn.Linear for name in QKV_PROJECTIONS)
    fused = any(name.startswith(FUSED_QKV_PREFIX) and type(child) is nn.Linear for name, child in children.items())
    return separate or fused


def mixer_kind(module: nn.Module) -> str | None:
    """The kind of sequence mixer ``module`` is (see the module docstring), else ``None``."""
    own = {name for name, _ in module.named_parameters(recurse=False)}
    children = dict(module.named_children())
    convolutions = any(is_depthwise_conv(child) for child in children.values())
    if {"A_log", "dt_bias", "D"} <= own and convolutions:
        return "mamba2"
    if {"A_log", "D"} <= own and {"x_proj", "dt_proj"} <= children.keys():
        return "mamba"
    if is_linear_attention(module):
        return "linear_attention"
    if not own and is_depthwise_conv(children.get("conv")) and {"in_proj", "out_proj"} <= children.keys():
        return "short_conv"
    if convolutions:
        return "convolution"
    return "state_space" if "A_log" in own else None


def language_model_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, stack)`` of the language model's layer stacks: the non-empty ``nn.ModuleList`` / ``nn.Sequential``
    children of the input embedding's parent (hybrids mix layer classes in them; a vision or audio tower inside a
    sibling module is not one); without an input embedding, every repeated-block container of the model
    (:func:`~meshplan.introspection.blocks.find_block_containers`)."""
    embedding = module_name(model, embedding_modules(model)[0])
    if embedding is None:
        return find_block_containers(model)
    parent = embedding.rpartition(".")[0]
    return [(f"{parent}.{name}" if parent else name, child)
            for name, child in model.get_submodule(parent).named_children()
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child)]


def _mixers_in(fqn: str, module: nn.Module) -> Iterator[SequenceMixer]:
    """``module`` (named ``fqn``) if it is a mixer, else the outermost mixers inside it."""
    kind = mixer_kind(module)
    if kind is not None:
        yield SequenceMixer(fqn, kind, type(module).__name__)
        return
    for name, child in module.named_children():
        yield from _mixers_in(f"{fqn}.{name}" if fqn else name, child)


def sequence_mixers(model: nn.Module) -> list[SequenceMixer]:
    """Every sequence mixer of the model's language model, in module order (see the module docstring)."""
    stacks = language_model_stacks(model)
    if not stacks:
        return list(_mixers_in("", model))
    found: list[SequenceMixer] = []
    layer_types = getattr(text_config(getattr(model, "config", None)), "layer_types", None) or ()
    for stack_name, stack in stacks:
        declared = layer_types if len(layer_types) == len(stack) else ()  # the config's layers are this stack's
        for index, (name, block) in enumerate(stack.named_children()):
            fqn = f"{stack_name}.{name}" if stack_name else name
            in_block = list(_mixers_in(fqn, block))
            if not in_block and index < len(declared) and declared[index] in MIXER_LAYER_TYPES:
                in_block = [SequenceMixer(fqn, f"layer type {declared[index]!r}", type(block).__name__)]
            found.extend(in_block)
    return found
