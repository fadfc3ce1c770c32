"""Built-in TP plans for Gemma3: ``Gemma3ForCausalLM`` and the language model of
``Gemma3ForConditionalGeneration`` (the vision tower stays replicated).

Gemma3 ties ``lm_head`` to the embedding: both are vocab-sharded (``Shard(0)``) and re-tied after sharding.
Its per-head ``q_norm`` / ``k_norm`` are handled as in Qwen3; its extra pre/post feed-forward norms are found
structurally by the sequence-parallel derivation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl
from .qwen import qk_norm_layer_styles

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle


def gemma3_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP (or TP+SP) plan for Gemma3 text models and Gemma3's VLM (decoder found at ``model.language_model``)."""
    from .decoder import decoder_plan  # loaded on use: keeps start-up light

    return decoder_plan(model, qk_norm_layer_styles(), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.gemma3.modeling_gemma3.Gemma3ForCausalLM", gemma3_plan)
    register("transformers.models.gemma3.modeling_gemma3.Gemma3ForConditionalGeneration", gemma3_plan)
