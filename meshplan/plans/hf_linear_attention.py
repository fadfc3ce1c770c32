"""Completing a Hugging Face TP plan where it leaves the linear-attention blocks of a MoE decoder whole.

Linear attention (gated delta nets, Kimi delta attention) mixes the tokens with a depthwise causal ``conv1d`` over
the query/key/value channels and a recurrence over heads. transformers' own plans for Qwen3-Next, Qwen3.5-MoE and
Qwen4-Exp split such a block one way only: every projection ``colwise_gather_output`` (the weight sharded by
output features, the output gathered), everything else — the convolution, ``A_log`` / ``dt_bias``, the gated
norm, the recurrence — replicated, computed whole on every rank. That split is exact whatever the block computes
between its projections: each output feature is still one whole dot product, every tensor the block sees is the
one-process tensor, and its replicated parameters get whole gradients. BailingHybrid's and Kimi-Linear's plans
name no projection of their linear attention at all, and Lara-Mini's only the output (its ``in_proj_*`` stay whole
in transformers because they are split from a fused checkpoint tensor at load time, which does not concern a model
sharded after loading).

The completion (:func:`uncovered_projections`, applied by :mod:`meshplan.plans.hf_translation`) gives the same
``colwise_gather_output`` to every ``nn.Linear`` inside a linear-attention block of the MoE layer stacks that the
plan leaves whole or splits that way only. A *linear-attention block*
(:func:`~meshplan.introspection.mixers.is_linear_attention`) is a module with a depthwise ``nn.Conv1d`` child
``conv1d`` (as many groups as channels) and query/key/value projections: ``q_proj`` / ``k_proj`` / ``v_proj``, or a
fused ``in_proj_qkv*`` (Mamba mixers convolve x/B/C, not q/k/v, and are left to their own styles). A block is left
alone when a plan entry names it or an ancestor, or splits any of its parts another way (column-wise heads,
row-wise output), since its forward then runs on local heads.

Not split by heads: the forwards read stored widths (BailingHybrid and Kimi-Linear split the convolved channels by
``self.qkv_dim``, BailingHybrid's forget gate views by ``self.num_heads``), the depthwise convolution runs over the
concatenated ``[q; k; v]`` channels (its weight would need a three-part packed shard), and ``A_log`` /
``dt_bias`` are per head. A head split needs those attributes made local on the module, which a style for that
module family must own; the completion here relies only on ``nn.Linear`` calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from ..introspection.experts import find_expert_modules
from ..introspection.mixers import is_linear_attention
from ..tensor_parallel.matching import match_key, within
from .hf_completion import is_completed, layer_stacks

#: The transformers style the completion gives every projection of a linear-attention block.
REPLICATED_OUTPUT = "colwise_gather_output"
def is_replicated_output(style: ParallelStyle) -> bool:
    """Whether ``style`` is column-wise with a replicated input and a gathered (replicated) output."""
    return isinstance(style, ColwiseParallel) and style.input_layouts == (Replicate(),) \
        and style.output_layouts == (Replicate(),)


def uncovered_projections(model: nn.Module, styles: Mapping[str, ParallelStyle], left_replicated: Iterable[str],
                          ) -> set[str]:
    """The ``nn.Linear`` modules (fully qualified names) of the linear-attention blocks in the model's MoE layer
    stacks that get :data:`REPLICATED_OUTPUT`: those no plan key (``styles``, ``left_replicated``) selects, in
    blocks whose planned parts are all split that way (see the module docstring). Empty for the model types in
    :data:`~meshplan.plans.hf_completion.NOT_COMPLETED`."""
    if not is_completed(model):
        return set()
    planned = {fqn: style for key, style in styles.items() for fqn in match_key(model, key)}
    planned.update({fqn: None for key in left_replicated for fqn in match_key(model, key)})
    stacks = layer_stacks(fqn for fqn, _ in find_expert_modules(model))
    found: set[str] = set()
    for block, module in model.named_modules():
        if not any(block.startswith(f"{stack}.") if stack else block[:1].isdigit() for stack in stacks) \
                or not is_linear_attention(module):
            continue
        inside = {fqn: style for fqn, style in planned.items() if fqn.startswith(f"{block}.")}
        whole = not within(block, planned)
        if whole and all(style is not None and is_replicated_output(style) for style in inside.values()):
            found.update(f"{block}.{name}" for name, child in module.named_modules()
                         if type(child) is nn.Linear and f"{block}.{name}" not in inside)
    return found
