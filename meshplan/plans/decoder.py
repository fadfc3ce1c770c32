"""Shared construction of TP and TP+SP plans for Hugging Face style decoder-only language models.

A family provider only names the projections of one decoder layer (:func:`decoder_plan`); everything else —
locating the decoder stack, vocab-parallel embedding / ``lm_head``, and the sequence-parallel variant —
is derived here from the model's structure, for the built-in providers and the Hugging Face fallback alike.

Sequence parallel (:func:`add_sequence_parallel`) shards the residual stream along the sequence *at the
input of layer 0*, not at the embedding: transformers 5.x derives position ids, rotary embeddings and
attention masks from ``inputs_embeds`` before the layers, so they must see the full sequence. Inside each
layer the norms run sequence-sharded, each block (attention, MLP) all-gathers its input and its row-wise
output projection reduce-scatters back to ``Shard(1)``; the final norm stays sharded and ``lm_head``
gathers the sequence again, so logits are ordinary full tensors.

A mixture-of-experts block (one that holds a fused experts module in some layer) routes flattened tokens and its
experts all-reduce their output, so it gets the full sequence as a plain tensor, keeps its row-wise projections
(shared experts, the MLP of dense layers) all-reducing, and returns this rank's slice of the sequence: an
all-gather in and a free slice out, instead of a reduce-scatter.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from ..core.errors import PlanError
from ..introspection.embeddings import embedding_modules, module_name
from ..introspection.experts import find_expert_modules
from ..tensor_parallel.matching import match_key, within
from ..tensor_parallel.styles.composition import ChainedStyles
from ..tensor_parallel.styles.embedding import VocabParallelEmbedding
from ..tensor_parallel.styles.hidden_states import PrepareHiddenStates, PrepareHiddenStatesOutput

SEQUENCE = Shard(1)


@dataclass(frozen=True)
class DecoderLayout:
    """Where the parts of a decoder-only LM live (fully qualified names; block and norm names are
    relative to one layer)."""

    embed: str
    layers: str
    blocks: tuple[str, ...]
    layer_norms: tuple[str, ...]
    final_norms: tuple[str, ...]
    lm_head: str | None
    #: blocks that hold a fused experts module in at least one layer
    moe_blocks: tuple[str, ...] = ()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """The decoder structure of ``model``; :class:`PlanError` naming what is missing if it is not standard.

    Standard: the input embedding's parent holds exactly one ``ModuleList`` of layers and otherwise only
    parameter-free modules and norms (the final norm); every parameterized child of a layer is either a norm
    on the residual stream or a block (attention, MLP) called with the hidden states.
    """
    embedding, head = embedding_modules(model)
    embed = module_name(model, embedding)
    if embed is None:
        raise PlanError(f"{type(model).__name__} has no get_input_embeddings() module inside the model.")
    base_name = embed.rpartition(".")[0]
    base = model.get_submodule(base_name)
    stacks = [name for name, child in base.named_children() if isinstance(child, nn.ModuleList)]
    if len(stacks) != 1:
        raise PlanError(f"{base_name or type(model).__name__} holds {len(stacks)} ModuleLists, not one layer stack.")
    layers = f"{base_name}.{stacks[0]}" if base_name else stacks[0]
    stack = model.get_submodule(layers)
    if len(stack) == 0 or len({type(layer) for layer in stack}) != 1:
        raise PlanError(f"{layers} is empty or mixes layer classes.")
    children = [(name, child) for name, child in stack[0].named_children() if _has_params(child)]
    layer_norms = tuple(name for name, child in children if _is_norm(child))
    blocks = tuple(name for name, child in children if not _is_norm(child))
    extra = [name for name, child in base.named_children()
             if name not in (stacks[0], embed.rpartition(".")[2]) and _has_params(child) and not _is_norm(child)]
    if extra:
        raise PlanError(f"{base_name or type(model).__name__} has parameterized modules besides the embedding, "
                        f"layers and norms: {extra}.")
    final_norms = tuple(f"{base_name}.{name}" if base_name else name for name, child in base.named_children()
                        if _is_norm(child) and _has_params(child))
    moe_blocks = _blocks_holding_experts(model, layers, blocks)
    return DecoderLayout(embed, layers, blocks, layer_norms, final_norms, module_name(model, head), moe_blocks)


def _blocks_holding_experts(model: nn.Module, layers: str, blocks: tuple[str, ...]) -> tuple[str, ...]:
    """The names of ``blocks`` that hold a fused experts module in at least one layer of ``layers``."""
    prefix = f"{layers}."
    parts = [fqn[len(prefix):].split(".") for fqn, _ in find_expert_modules(model) if fqn.startswith(prefix)]
    found = {names[1] for names in parts if len(names) > 1}
    return tuple(block for block in blocks if block in found)


def vocab_parallel_entries(layout: DecoderLayout) -> dict[str, ParallelStyle]:
    """Vocab-parallel embedding and ``lm_head`` (both weights ``Shard(0)``, so a tie survives); logits are
    gathered into ordinary full tensors for the model's own loss. The embedding is ``embedding_rowwise``, whose lookup
    whole-model ``torch.compile`` traces under FSDP2 (torch's own ``RowwiseParallel`` lookup fails there)."""
    entries: dict[str, ParallelStyle] = {layout.embed: VocabParallelEmbedding()}
    if layout.lm_head is not None:
        entries[layout.lm_head] = ColwiseParallel(output_layouts=Replicate())
    return entries


def decoder_plan(
    model: nn.Module, layer_styles: Mapping[str, ParallelStyle], sequence_parallel: bool,
    vocab_parallel: bool = True,
) -> dict[str, ParallelStyle]:
    """The plan for a decoder LM: ``layer_styles`` (keys relative to one layer, e.g. ``"mlp.up_proj"``)
    applied to every layer, plus vocab-parallel embedding / ``lm_head``, plus sequence parallel if asked."""
    layout = find_decoder_layout(model)
    plan = {f"{layout.layers}.*.{key}": style for key, style in layer_styles.items()}
    if vocab_parallel:
        plan.update(vocab_parallel_entries(layout))
    return add_sequence_parallel(model, plan, layout) if sequence_parallel else plan


def _with(style: ParallelStyle, **attributes: object) -> ParallelStyle:
    fresh = copy.deepcopy(style)
    for name, value in attributes.items():
        setattr(fresh, name, value)
    return fresh


def _blocks_with_unplanned_parameters(model: nn.Module, plan: Mapping[str, ParallelStyle], layout: DecoderLayout,
                                      ) -> set[str]:
    """The blocks in which some module with parameters is named by no plan key (nor is an ancestor): such a module
    computes with plain tensors, so its block must get the sequence as a plain tensor, as it would without SP."""
    planned = {fqn for key in plan for fqn in match_key(model, key)}
    found = set()
    for block in layout.blocks:
        for fqn in match_key(model, f"{layout.layers}.*.{block}"):
            for name, module in model.get_submodule(fqn).named_modules(prefix=fqn):
                if next(module.parameters(recurse=False), None) is not None and not within(name, planned):
                    found.add(block)
    return found


def add_sequence_parallel(model: nn.Module, plan: Mapping[str, ParallelStyle], layout: DecoderLayout,
                          ) -> dict[str, ParallelStyle]:
    """Turn a TP plan for ``layout`` (of ``model``) into its sequence-parallel variant (see the module docstring).

    Every block but a mixture-of-experts block must end in a row-wise projection under the block (its output
    becomes the sequence-sharded residual); otherwise :class:`PlanError` says which block does not.
    """
    layer = f"{layout.layers}.*"
    moe_prefixes = tuple(f"{layer}.{block}." for block in layout.moe_blocks)
    result: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        if key.startswith(f"{layer}.") and not key.startswith(moe_prefixes) and isinstance(style, RowwiseParallel):
            style = _with(style, output_layouts=(SEQUENCE,), use_local_output=False)
        elif key == layout.lm_head and isinstance(style, ColwiseParallel):
            style = _with(style, input_layouts=(SEQUENCE,))
        result[key] = style
    plain_input = _blocks_with_unplanned_parameters(model, plan, layout)
    for block in layout.blocks:
        if block in layout.moe_blocks:
            prepare = ChainedStyles(PrepareHiddenStates(SEQUENCE, Replicate(), use_local_output=True),
                                    PrepareHiddenStatesOutput(Replicate(), SEQUENCE))
        elif any(key.startswith(f"{layer}.{block}.") and isinstance(style, RowwiseParallel)
                 for key, style in plan.items()):
            prepare = PrepareHiddenStates(SEQUENCE, Replicate(), use_local_output=block in plain_input)
        else:
            raise PlanError(f"block {layer}.{block} has no row-wise output projection in the plan, so its output "
                            "cannot return to the sequence-sharded residual stream.")
        key = f"{layer}.{block}"
        result[key] = ChainedStyles(result[key], prepare) if key in result else prepare
    for norm in (*(f"{layer}.{n}" for n in layout.layer_norms), *layout.final_norms):
        if norm in result:
            raise PlanError(f"{norm} already has style {result[norm]!r}; sequence parallel needs SequenceParallel.")
        result[norm] = SequenceParallel()
    result[f"{layout.layers}.0"] = PrepareHiddenStates(Replicate(), SEQUENCE)
    if layout.lm_head is None:
        for norm in layout.final_norms:
            result[norm] = ChainedStyles(SequenceParallel(), PrepareModuleOutput(
                output_layouts=SEQUENCE, desired_output_layouts=Replicate(), use_local_output=True))
    elif layout.lm_head not in result:
        result[layout.lm_head] = PrepareHiddenStates(SEQUENCE, Replicate(), use_local_output=True)
    return result
