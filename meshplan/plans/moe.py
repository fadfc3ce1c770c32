"""Shared construction of TP plans for decoder LMs with mixture-of-experts layers (Mixtral, Qwen3-MoE, DeepSeek).

A family names the styles of its attention and of every other kind of layer it has (dense MLP, shared experts);
:func:`moe_plan` adds the fused experts (``moe_tp_experts`` at ``mlp.experts``), keeps the keys that exist in at
least one layer of this model (a config may make every layer sparse, or some dense) and hands them to
:func:`meshplan.plans.decoder.decoder_plan` (vocab-parallel embedding and ``lm_head``). The router stays replicated:
it sees the full hidden states on every rank and its gradient is complete because the experts' style sums the
routing-weight gradients. With sequence parallel the MoE block gathers the sequence on entry and returns this rank's
slice (:func:`meshplan.plans.decoder.add_sequence_parallel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from ..tensor_parallel.matching import match_key

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

#: Key of the fused experts module inside a decoder layer (transformers' MoE blocks live at ``mlp``).
EXPERTS = "mlp.experts"


def moe_plan(model: nn.Module, layer_styles: Mapping[str, ParallelStyle], sequence_parallel: bool
             ) -> dict[str, ParallelStyle]:
    """The decoder plan with ``layer_styles`` and the fused experts split along their intermediate size, each key
    kept where it matches a module in at least one layer."""
    # loaded on use: keeps start-up light
    from ..experts.tp_styles import ExpertsTensorParallel
    from .decoder import decoder_plan, find_decoder_layout

    layers = find_decoder_layout(model).layers
    styles = {**layer_styles, EXPERTS: ExpertsTensorParallel()}
    present = {key: style for key, style in styles.items() if match_key(model, f"{layers}.*.{key}")}
    return decoder_plan(model, present, sequence_parallel)
