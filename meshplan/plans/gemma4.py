"""Built-in TP plans for Gemma 4 (``Gemma4ForCausalLM`` and the language model of
``Gemma4ForConditionalGeneration``): the model's own transformers plan, plus its per-layer embeddings (PLE).

The transformers plan splits attention, MLPs and experts; these plans also split, when the config has per-layer
inputs (``hidden_size_per_layer_input``):

* ``embed_tokens_per_layer`` (vocab x (layers x per-layer width), about 40 % of the default model), vocab-parallel
  like the main embedding: each rank looks up its vocab rows and the lookup is all-reduced;
* in every decoder layer, the per-layer input path ``per_layer_projection(act(per_layer_input_gate(h)) *
  per_layer_input)``: ``per_layer_input_gate`` column-wise, ``per_layer_projection`` row-wise, and the layer's
  ``per_layer_input`` argument (replicated) cut to this rank's slice of the per-layer width, whose gradient is
  all-gathered back. The activation and product act on each per-layer feature alone, so this is exact.

``per_layer_model_projection`` (hidden -> layers x per-layer width, 0.3 %) stays replicated: its output is reshaped
to ``[layers, per-layer width]`` with the full layer count and normalized over the per-layer width.

``Gemma4ForConditionalGeneration`` keeps the main embedding and its tied ``lm_head`` replicated when per-layer inputs
are on: its forward reads the pad-token row of ``embed_tokens.weight`` outside the embedding module and mixes it
with plain tensors (``torch.where``); a vocab-sharded weight would make that a DTensor (refused next to plain
tensors) and, even where allowed, indexing a row of it all-gathers the whole table on every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..core.errors import PlanError, SequenceParallelUnsupportedError
from ..introspection.config import text_config
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

    from ..core.registry import Registry

PER_LAYER_EMBEDDING = "embed_tokens_per_layer"
PER_LAYER_GATE, PER_LAYER_PROJECTION = "per_layer_input_gate", "per_layer_projection"
#: The decoder layer's per-layer input: its name and position in ``Gemma4TextDecoderLayer.forward``.
PER_LAYER_INPUT, PER_LAYER_INPUT_POSITION = "per_layer_input", 1


def text_model_name(model: nn.Module) -> str:
    """The fully qualified name of the Gemma 4 text model (the parent of the input embedding)."""
    from ..introspection.embeddings import embedding_modules, module_name  # loaded on use: keeps start-up light

    embed = module_name(model, embedding_modules(model)[0])
    if embed is None:
        raise PlanError(f"{type(model).__name__} has no get_input_embeddings() module inside the model.")
    return embed.rpartition(".")[0]


def has_per_layer_inputs(model: nn.Module) -> bool:
    """Whether the config gives every decoder layer a per-layer input (Gemma 4's PLE)."""
    return bool(getattr(text_config(model.config), "hidden_size_per_layer_input", 0))


def per_layer_input_styles(text: str) -> dict[str, ParallelStyle]:
    """Vocab-parallel ``embed_tokens_per_layer`` and the split per-layer input path of every layer (module
    docstring); ``text`` is the text model's name."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor import Replicate, Shard

    from ..tensor_parallel.styles.hidden_states import PrepareHiddenStates
    from ..tensor_parallel.vocabulary import builtin_style

    prefix = f"{text}." if text else ""
    return {
        f"{prefix}{PER_LAYER_EMBEDDING}": builtin_style("embedding_rowwise"),
        f"{prefix}layers.*": PrepareHiddenStates(Replicate(), Shard(-1), argument=PER_LAYER_INPUT,
                                                 position=PER_LAYER_INPUT_POSITION, use_local_output=True),
        f"{prefix}layers.*.{PER_LAYER_GATE}": builtin_style("colwise"),
        f"{prefix}layers.*.{PER_LAYER_PROJECTION}": builtin_style("rowwise"),
    }


def _plan(model: nn.Module, sequence_parallel: bool, registry: Registry | None, replicate_embeddings: bool,
          ) -> dict[str, ParallelStyle]:
    # loaded on use: keeps start-up light
    from ..introspection.embeddings import embedding_modules, module_name
    from .hf_translation import hf_tp_plan

    if not has_per_layer_inputs(model):
        return hf_tp_plan(model, sequence_parallel, registry=registry)
    if sequence_parallel:
        raise SequenceParallelUnsupportedError(
            f"Sequence parallel is not supported for {type(model).__qualname__} with per-layer inputs "
            "(hidden_size_per_layer_input): they are computed from the full sequence before the layers and feed "
            "each layer's per-layer projections. Run without sequence_parallel.")
    plan = hf_tp_plan(model, registry=registry)
    if replicate_embeddings:
        for embedding in embedding_modules(model):
            plan.pop(module_name(model, embedding) or "", None)
    plan.update(per_layer_input_styles(text_model_name(model)))
    return plan


def gemma4_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
                ) -> dict[str, ParallelStyle]:
    """``Gemma4ForCausalLM``: the translated transformers plan plus the per-layer inputs (module docstring)."""
    return _plan(model, sequence_parallel, registry, replicate_embeddings=False)


def gemma4_multimodal_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
                           ) -> dict[str, ParallelStyle]:
    """``Gemma4ForConditionalGeneration``: as :func:`gemma4_plan`, with the main embedding and its tied ``lm_head``
    replicated when per-layer inputs are on (module docstring)."""
    return _plan(model, sequence_parallel, registry, replicate_embeddings=True)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.gemma4.modeling_gemma4.Gemma4ForCausalLM", gemma4_plan)
    register("transformers.models.gemma4.modeling_gemma4.Gemma4ForConditionalGeneration", gemma4_multimodal_plan)
