"""Built-in TP plan for Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (column-wise q/k/v with per-head
``q_norm`` / ``k_norm`` whose gradients are summed, row-wise o), every expert split along its intermediate size,
the dense MLP of ``mlp_only_layers`` like Llama's, replicated router (see :mod:`meshplan.plans.moe`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl
from .qwen import qk_norm_layer_styles

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle


def qwen3_moe_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP plan for Qwen3-MoE (with sequence parallel if asked)."""
    from .moe import moe_plan  # loaded on use: keeps start-up light

    return moe_plan(model, qk_norm_layer_styles(), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeForCausalLM", qwen3_moe_plan)
