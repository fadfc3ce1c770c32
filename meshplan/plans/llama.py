"""Built-in TP plans for Llama and Mistral (``*ForCausalLM``): column-wise q/k/v and gate/up, row-wise o/down,
vocab-parallel embedding and ``lm_head``; sequence parallel on request (see :mod:`meshplan.plans.decoder`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

ATTENTION_COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_COLWISE = ("mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def llama_layer_styles() -> dict[str, ParallelStyle]:
    """Styles for one Llama-style layer (keys relative to the layer)."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles: dict[str, ParallelStyle] = {key: ColwiseParallel() for key in (*ATTENTION_COLWISE, *MLP_COLWISE)}
    styles.update({key: RowwiseParallel() for key in ROWWISE})
    return styles


def llama_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP (or TP+SP) plan for Llama-style decoders: Llama, Mistral, Qwen2."""
    from .decoder import decoder_plan  # loaded on use: keeps start-up light

    return decoder_plan(model, llama_layer_styles(), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.llama.modeling_llama.LlamaForCausalLM", llama_plan)
    register("transformers.models.mistral.modeling_mistral.MistralForCausalLM", llama_plan)
