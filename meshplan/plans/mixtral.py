"""Built-in TP plan for Mixtral (``MixtralForCausalLM``): Llama-style attention, every expert split along its
intermediate size (packed ``gate_up_proj``, ``down_proj``, one all-reduce of the experts' output), replicated
router, vocab-parallel embedding and ``lm_head`` (see :mod:`meshplan.plans.moe`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl
from .llama import llama_layer_styles

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle


def mixtral_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP plan for Mixtral (with sequence parallel if asked)."""
    from .moe import moe_plan  # loaded on use: keeps start-up light

    return moe_plan(model, llama_layer_styles(), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.mixtral.modeling_mixtral.MixtralForCausalLM", mixtral_plan)
