"""Built-in TP plans for Qwen2 and Qwen3 (``*ForCausalLM``).

Qwen3's per-head ``q_norm`` / ``k_norm`` see only this rank's heads: their weights stay replicated and their
gradients are summed across TP ranks (left alone, logits are right but the norm gradients are silently
partial).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl
from .llama import llama_layer_styles, llama_plan

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


def qk_norm_layer_styles() -> dict[str, ParallelStyle]:
    """Llama-style layer styles plus head-sharded q/k norms (Qwen3, Gemma3)."""
    # loaded on use: keeps start-up light
    from ..tensor_parallel.styles.local_parameters import ReplicatedWithGradAllReduce

    return {**llama_layer_styles(), **{key: ReplicatedWithGradAllReduce() for key in QK_NORMS}}


def qwen3_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP (or TP+SP) plan for Qwen3."""
    from .decoder import decoder_plan  # loaded on use: keeps start-up light

    return decoder_plan(model, qk_norm_layer_styles(), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM", llama_plan)
    register("transformers.models.qwen3.modeling_qwen3.Qwen3ForCausalLM", qwen3_plan)
