"""Built-in TP plans for Inkling (``InklingForCausalLM``) and Inkling 2 (``Inkling2ForCausalLM``,
``Inkling2LoopForCausalLM``): the model's own transformers plan (its experts), plus attention split by heads and a
vocab-parallel embedding.

Both embeddings are an ``nn.Embedding`` that normalizes the lookup (``InklingNormedEmbedding``);
``embedding_rowwise`` (:class:`~meshplan.tensor_parallel.styles.embedding.VocabParallelEmbedding`) all-reduces the
lookup before the norm, so the plans make it vocab-parallel (transformers' Inkling 2 plan says ``replicate``). Each
attention block (sliding and full) is split by heads, every rank computing its own query and KV heads.

Inkling 2 blocks (projections wrapped in modules):

* column-wise: ``q_proj.linear``, ``k_proj.linear``, ``v_proj.linear``, ``o_proj.gate_proj`` (the sigmoid gate on
  the attention output, per head feature), ``sink_proj`` (one sink logit per head), ``relative_position_bias.linear``
  (relative states per head), and in the full-attention layers ``{k,v}_proj.sconv.weight_proj`` (convolution taps
  per KV head); row-wise: ``o_proj.linear``;
* per-head parameters sharded with the heads (``LocalShardedParameters``): the learned scales of ``q_proj.norm`` and
  ``relative_position_bias.norm`` (``[heads, width]``), the per-channel short-convolution weights of the KV
  projections (``sconv.conv1d.weight``, read by ``sconv``'s own forward; ``sconv.static_weight`` ``[taps,
  channels]`` in the full-attention layers);
* modules that reshape by their own head count (``relative_position_bias``, the full layers' dynamic convolutions)
  get this rank's count (``LocalHeadCount``);
* ``relative_position_bias.proj``, the bank of bias profiles shared by all heads, stays replicated with its gradient
  summed over the ranks (``ReplicatedWithGradAllReduce``).

Inkling blocks: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``r_proj`` (relative states) column-wise, ``o_proj``
row-wise, the KV short convolutions ``k_sconv`` / ``v_sconv`` sharded per channel, the per-head-dim ``q_norm`` /
``k_norm`` and the shared bias bank ``rel_logits_proj`` replicated with summed gradients, and the block's own
``num_heads`` (its relative states are reshaped by it) this rank's count. Inkling's shared experts (3-D
``gate_proj`` / ``up_proj`` / ``down_proj``, weighted per token by the router's ``gammas``), which the translated plan
leaves replicated, are split along their intermediate size like fused experts (``ExpertsTensorParallel``: the
output and the gradients of the input and of ``gammas`` are summed over the ranks).

Head counts (sliding and full) must divide by the TP size. The router, the residual short convolutions on the
hidden states and the block attention residuals stay replicated. Sequence parallel is refused: those short
convolutions mix neighbouring tokens of the residual stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from ..core.errors import SequenceParallelUnsupportedError
from ..core.log import get_logger, log_rank0
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

    from ..core.registry import Registry

logger = get_logger(__name__)

#: The children of an Inkling 2 attention block.
ATTENTION_CHILDREN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "sink_proj", "relative_position_bias"})
COLWISE = ("q_proj.linear", "k_proj.linear", "v_proj.linear", "o_proj.gate_proj", "sink_proj",
           "relative_position_bias.linear")
ROWWISE = ("o_proj.linear",)
#: Parameters ``[heads, width]`` of the query and relative-state norms, sharded with the heads.
HEAD_SCALED_NORMS = ("q_proj.norm", "relative_position_bias.norm")
KEY_VALUE = ("k_proj", "v_proj")
#: The children of an Inkling (1) attention block, and how its projections, convolutions and shared parts split.
INKLING_ATTENTION_CHILDREN = frozenset({"q_proj", "k_proj", "v_proj", "r_proj", "o_proj", "k_sconv", "v_sconv",
                                        "q_norm", "k_norm", "rel_logits_proj"})
INKLING_COLWISE, INKLING_ROWWISE = ("q_proj", "k_proj", "v_proj", "r_proj"), ("o_proj",)
INKLING_CONVOLUTIONS, INKLING_SHARED = ("k_sconv", "v_sconv"), ("q_norm", "k_norm", "rel_logits_proj")


#: Inkling's shared experts: a module of this name holding 3-D expert parameters.
SHARED_EXPERTS = "shared_experts"


def is_fused_shared_experts(fqn: str, module: nn.Module) -> bool:
    """Whether ``module`` is a shared-experts module with fused 3-D parameters (Inkling's)."""
    gate = getattr(module, "gate_proj", None)
    return fqn.rpartition(".")[2] == SHARED_EXPERTS and isinstance(gate, nn.Parameter) and gate.ndim == 3


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _convolution_styles(sconv: nn.Module) -> dict[str, ParallelStyle]:
    """Styles (relative to ``sconv``) for a KV short convolution: a static one (``conv1d``, read by ``sconv``'s
    forward) or a dynamic one (``static_weight`` and ``weight_proj``, reshaped by ``num_heads``)."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import ColwiseParallel

    from ..tensor_parallel.styles.composition import ChainedStyles
    from ..tensor_parallel.styles.local_parameters import LocalShardedParameters
    from ..tensor_parallel.styles.module_state import LocalHeadCount

    conv = getattr(sconv, "conv1d", None)
    if conv is not None:
        params = {f"conv1d.{name}": 0 for name, param in conv.named_parameters(recurse=False)}
        return {"": LocalShardedParameters(params)}
    return {"": ChainedStyles(LocalHeadCount(), LocalShardedParameters({"static_weight": 1})),
            "weight_proj": ColwiseParallel()}


def inkling_attention_styles(attention: nn.Module) -> dict[str, ParallelStyle]:
    """Styles (keys relative to the block, ``""`` the block itself) splitting an Inkling attention block by heads
    (module docstring)."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ..tensor_parallel.styles.local_parameters import ReplicatedWithGradAllReduce
    from ..tensor_parallel.styles.module_state import LocalHeadCount

    styles: dict[str, ParallelStyle] = {"": LocalHeadCount()}
    styles.update({key: ColwiseParallel() for key in INKLING_COLWISE})
    styles.update({key: RowwiseParallel() for key in INKLING_ROWWISE})
    styles.update({key: ReplicatedWithGradAllReduce() for key in INKLING_SHARED})
    for name in INKLING_CONVOLUTIONS:
        styles.update({f"{name}.{key}" if key else name: style
                       for key, style in _convolution_styles(attention.get_submodule(name)).items()})
    return styles


def inkling2_attention_styles(attention: nn.Module) -> dict[str, ParallelStyle]:
    """Styles (keys relative to the block) splitting an Inkling 2 attention block by heads (module docstring)."""
    # loaded on use: keeps start-up light
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from ..tensor_parallel.styles.composition import ChainedStyles
    from ..tensor_parallel.styles.local_parameters import LocalShardedParameters, ReplicatedWithGradAllReduce
    from ..tensor_parallel.styles.module_state import LocalHeadCount

    styles: dict[str, ParallelStyle] = {key: ColwiseParallel() for key in COLWISE}
    styles.update({key: RowwiseParallel() for key in ROWWISE})
    styles.update({key: LocalShardedParameters({"scale": 0}) for key in HEAD_SCALED_NORMS})
    styles["relative_position_bias"] = ChainedStyles(LocalHeadCount(), ReplicatedWithGradAllReduce())
    for name in KEY_VALUE:
        sconv = attention.get_submodule(f"{name}.sconv")
        styles.update({f"{name}.sconv.{key}" if key else f"{name}.sconv": style
                       for key, style in _convolution_styles(sconv).items()})
    return styles


def attention_styles(module: nn.Module) -> dict[str, ParallelStyle] | None:
    """The head split of an Inkling or Inkling 2 attention block (keys relative to it), ``None`` for other
    modules."""
    children = _children(module)
    if ATTENTION_CHILDREN <= children:
        return inkling2_attention_styles(module)
    if INKLING_ATTENTION_CHILDREN <= children:
        return inkling_attention_styles(module)
    return None


def inkling_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
                 ) -> dict[str, ParallelStyle]:
    """The translated transformers plan, a vocab-parallel embedding, every attention block split by heads and fused
    shared experts split along their intermediate size."""
    # loaded on use: keeps start-up light
    from ..experts.tp_styles import ExpertsTensorParallel
    from ..introspection.embeddings import embedding_modules, module_name
    from ..tensor_parallel.matching import covering_keys
    from ..tensor_parallel.vocabulary import builtin_style, copy_style
    from .hf_translation import hf_tp_plan

    if sequence_parallel:
        raise SequenceParallelUnsupportedError(
            f"Sequence parallel is not supported for {type(model).__qualname__}: the short convolutions on its "
            "residual stream mix neighbouring tokens, which a sequence-sharded residual splits apart. Run without "
            "sequence_parallel.")
    plan = hf_tp_plan(model, registry=registry)
    shared: list[str] = []
    embed = module_name(model, embedding_modules(model)[0])
    if embed is not None:
        plan[embed] = builtin_style("embedding_rowwise")
    entries: dict[str, ParallelStyle] = {}
    for fqn, module in model.named_modules():
        styles = attention_styles(module)
        if styles is not None:
            entries.update({f"{fqn}.{key}" if key else fqn: style for key, style in styles.items()})
        elif is_fused_shared_experts(fqn, module):
            entries[fqn] = ExpertsTensorParallel()
            shared.append(fqn)
    by_style: dict[str, list[str]] = {}
    for fqn, style in entries.items():
        by_style.setdefault(repr(style), []).append(fqn)
    for fqns in by_style.values():  # one ``layers.*`` key per style where it selects exactly these modules
        plan.update({key: copy_style(entries[fqns[0]]) for key in covering_keys(model, fqns)})
    if shared:
        log_rank0(logger, logging.INFO, "TP plan of %s: the shared experts the transformers plan leaves replicated "
                  "are split along their intermediate size: %s.", type(model).__qualname__, ", ".join(shared))
    return plan


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.inkling.modeling_inkling.InklingForCausalLM", inkling_plan)
    register("transformers.models.inkling2.modeling_inkling2.Inkling2ForCausalLM", inkling_plan)
    register("transformers.models.inkling2_loop.modeling_inkling2_loop.Inkling2LoopForCausalLM", inkling_plan)
