"""Built-in TP plan for Llama 4 (``Llama4ForCausalLM`` and the language model of
``Llama4ForConditionalGeneration``): the model's own transformers plan, with the shared expert's output copied.

Llama 4's MoE block adds the routed experts' output *in place* to the shared expert's output. That output comes
from a row-wise ``down_proj``, i.e. a view made inside DTensor's ``to_local``, which autograd does not let a caller
modify in place; :class:`~meshplan.tensor_parallel.styles.hidden_states.OwnedOutput` returns a copy (one ``[tokens,
hidden]`` copy per MoE layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

    from ..core.registry import Registry

#: The projection whose output the MoE block updates in place, relative to a decoder layer.
SHARED_EXPERT_OUTPUT = "feed_forward.shared_expert.down_proj"


def llama4_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
                ) -> dict[str, ParallelStyle]:
    """The translated transformers plan; the shared expert's ``down_proj`` also returns a copy of its output."""
    # loaded on use: keeps start-up light
    from ..tensor_parallel.styles.composition import ChainedStyles
    from ..tensor_parallel.styles.hidden_states import OwnedOutput
    from .hf_translation import hf_tp_plan

    plan = hf_tp_plan(model, sequence_parallel, registry=registry)
    return {key: ChainedStyles(style, OwnedOutput()) if key.endswith(f".{SHARED_EXPERT_OUTPUT}") else style
            for key, style in plan.items()}


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.llama4.modeling_llama4.Llama4ForCausalLM", llama4_plan)
    register("transformers.models.llama4.modeling_llama4.Llama4ForConditionalGeneration", llama4_plan)
