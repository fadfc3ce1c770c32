"""Built-in TP plan for the DeepSeek-V2 / V3 family (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``).

Multi-head latent attention is split by heads as vLLM and NeMo AutoModel do: ``q_b_proj`` (or ``q_proj`` without
q-LoRA) and ``kv_b_proj`` column-wise, ``o_proj`` row-wise. The down-projections ``q_a_proj`` and
``kv_a_proj_with_mqa`` and their norms stay replicated: their outputs feed the column-wise up-projections, whose
input gradients DTensor sums, except the rotary slice of ``kv_a_proj_with_mqa``'s output, which goes straight into
this rank's heads and gets its gradient summed (``mla_kv_a_proj``). The first ``first_k_dense_replace`` layers have
a dense MLP (Llama-style); the others split every routed expert along its intermediate size and the shared experts
like a dense MLP, the router staying replicated (see :mod:`meshplan.plans.moe`).

DeepSeek-V4 gets a pipeline split only (its TP plan is transformers'): :data:`DEEPSEEK_V4_PP`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..introspection.config import text_config
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

MLA_COLWISE = ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj")
MLP_COLWISE = ("mlp.gate_proj", "mlp.up_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj", "mlp.shared_experts.down_proj")


#: DeepSeek-V4's pipeline split: transformers' ``base_model_pp_plan`` leaves out ``hc_head``, which collapses the
#: hyper-connection streams after the last block (then the final norm), so it goes to the last stage.
DEEPSEEK_V4_PP = {"pp": ["model.embed_tokens", "model.layers", "model.norm", "model.hc_head", "lm_head"]}


def deepseek_layer_styles(rope_dim: int) -> dict[str, ParallelStyle]:
    """Styles for one DeepSeek layer of any kind, except the routed experts that :func:`~meshplan.plans.moe.moe_plan`
    adds (keys relative to the layer); ``rope_dim`` is ``config.qk_rope_head_dim``."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ..tensor_parallel.styles.module_state import MlaKvAProjParallel

    styles: dict[str, ParallelStyle] = {key: ColwiseParallel() for key in (*MLA_COLWISE, *MLP_COLWISE)}
    styles.update({key: RowwiseParallel() for key in ROWWISE})
    styles["self_attn.kv_a_proj_with_mqa"] = MlaKvAProjParallel(rope_dim=rope_dim)
    return styles


def deepseek_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP plan for DeepSeek-V2 / V3 (with sequence parallel if asked)."""
    from .moe import moe_plan  # loaded on use: keeps start-up light

    rope_dim = text_config(model.config).qk_rope_head_dim
    return moe_plan(model, deepseek_layer_styles(rope_dim), sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2ForCausalLM", deepseek_plan)
    register("transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3ForCausalLM", deepseek_plan)
    register("transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4ForCausalLM", DEEPSEEK_V4_PP)
