"""Built-in TP plan for ZAYA (``ZayaForCausalLM``), whose transformers classes declare no TP plan.

Split: the fused experts (every expert along its intermediate size, one all-reduce of their output; ZAYA's skip
expert computes nothing and needs no style), the tied embedding / ``lm_head`` pair, vocab-parallel (see
:mod:`meshplan.plans.moe`), and the router: its ``down_proj`` column-wise with the output gathered (ZAYA carries
that output to the next layer's router and normalizes it, so every rank needs all of it; each feature is still
computed whole on one rank), and its MLP like any MLP: ``router_mlp.fc1`` column-wise, ``router_mlp.fc2`` row-wise
(the GELU between them acts on each feature alone; the one after ``fc2`` sees its all-reduced output). The router's
norm and its ``out_proj`` onto the expert classes (experts + 1 skip class, rarely divisible) stay replicated.

The compressed convolutional attention (CCA) stays replicated: it cannot be split by heads with column-wise
projections. Its value heads are cut from the concatenation ``[v_proj_current; v_proj_delayed]`` (with two KV heads,
one head is all "current" and the other all "delayed"), so a rank's heads are not a column slice of each
projection; and its grouped q/k convolution (``groups = heads + KV heads``) would need its group count changed per
rank. At ZAYA1-8B's size the attention is about 2.5 % of the parameters; the experts and the embedding hold the rest.
Sequence parallel is refused for the same reason. The EP plan is the model's own (``config.base_model_ep_plan``,
through the Hugging Face fallback).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..core.errors import SequenceParallelUnsupportedError
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle


#: The router's down-projection (column-wise, output gathered), relative to a decoder layer.
ROUTER_DOWN = "mlp.gate.down_proj"
#: The router MLP's input (column-wise) and output (row-wise) projections, relative to a decoder layer.
ROUTER_MLP_IN, ROUTER_MLP_OUT = "mlp.gate.router_mlp.fc1", "mlp.gate.router_mlp.fc2"


def zaya_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP plan for ZAYA: split experts and router, vocab-parallel embedding and ``lm_head`` (sequence parallel
    is refused: the attention stays whole)."""
    # loaded on use: keeps start-up light
    from ..tensor_parallel.vocabulary import builtin_style
    from .moe import moe_plan

    if sequence_parallel:
        raise SequenceParallelUnsupportedError(
            f"Sequence parallel is not supported for {type(model).__qualname__}: its CCA attention stays whole (see "
            "meshplan.plans.zaya), so no row-wise projection returns its output to a sequence-sharded residual "
            "stream. Run without sequence_parallel.")
    styles = {ROUTER_DOWN: builtin_style("colwise_gather_output"), ROUTER_MLP_IN: builtin_style("colwise"),
              ROUTER_MLP_OUT: builtin_style("rowwise")}
    return moe_plan(model, styles, sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.zaya.modeling_zaya.ZayaForCausalLM", zaya_plan)
