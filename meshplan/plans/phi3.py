"""Built-in TP plan for Phi3 (``Phi3ForCausalLM``), whose projections are fused.

``qkv_proj`` packs ``[q; k; v]`` and ``gate_up_proj`` packs ``[gate; up]``: plain column-wise sharding would
give rank 0 all of q and rank 1 k and v (no error, wrong logits). Packed styles give every rank its slice of
each part. ``Phi3Attention`` also slices the fused output with the *global* head count read from its config,
so each attention module gets a private config with per-rank head counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..introspection.config import text_config
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle


def phi3_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """TP (or TP+SP) plan for Phi3: packed q/k/v and gate/up, row-wise o/down."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import RowwiseParallel

    from ..tensor_parallel.styles.packed import PackedColwiseParallel
    from .decoder import decoder_plan
    from .phi3_attention import Phi3LocalHeads

    config = text_config(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer_styles: dict[str, ParallelStyle] = {
        "self_attn": Phi3LocalHeads(),
        "self_attn.qkv_proj": PackedColwiseParallel((q, kv, kv)),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_up_proj": PackedColwiseParallel(parts=2),
        "mlp.down_proj": RowwiseParallel(),
    }
    return decoder_plan(model, layer_styles, sequence_parallel)


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.phi3.modeling_phi3.Phi3ForCausalLM", phi3_plan)
