"""The parallel-style vocabulary: names -> factories of fresh torch ``ParallelStyle`` objects.

Meanings follow NeMo AutoModel for its five names and transformers 5.x for the rest:

==============================  =====================================================================
``colwise``                     ``ColwiseParallel()``: shard output features, local sharded output
``rowwise``                     ``RowwiseParallel()``: shard input features, all-reduced output
``colwise_rep``                 ``ColwiseParallel(output_layouts=Replicate())``: gather the output
``colwise_gather_output``       same as ``colwise_rep`` (transformers' name)
``rowwise_rep``                 ``RowwiseParallel(input_layouts=Replicate())``: split a replicated input
``rowwise_split_input``         same as ``rowwise_rep`` (transformers' name)
``sequence_parallel``           ``SequenceParallel()``: norms/dropout sharded along the sequence
``embedding_rowwise``           vocab-parallel embedding (``VocabParallelEmbedding``: torch's
                                ``RowwiseParallel(input_layouts=Replicate())`` with a lookup in the local rows that
                                whole-model ``torch.compile`` traces under FSDP2; also takes an embedding whose
                                forward applies child modules, e.g. a norm, to the all-reduced lookup)
``embedding_colwise``           embedding dim sharded, output gathered
``packed_colwise``              column-wise for a fused ``[a; b]`` projection: each rank keeps its slice of
                                both halves (``PackedColwiseParallel(parts=2)``; pass ``sizes=`` for
                                unequal parts such as ``[q; k; v]``)
``packed_rowwise``              row-wise counterpart: input features packed as two equal parts
``replicate``                   the module stays replicated (``KeepReplicated``: no change, but reported)
``replicated_with_grad_allreduce``  parameters replicated, gradients summed across TP ranks (per-head norms
                                such as Qwen3 / Gemma3 ``q_norm`` that only see this rank's heads)
``all_reduce``                  the module's output is a partial sum: all-reduce it
``mla_kv_a_proj``               multi-head latent attention's ``kv_a_proj_with_mqa``: the gradient of its
                                rotary output slice is summed across TP ranks (``MlaKvAProjParallel``; the
                                rotary width is needed: pass ``MlaKvAProjParallel(rope_dim=...)``, the Hugging
                                Face fallback fills it in from ``config.qk_rope_head_dim``)
``moe_tp_experts``              a fused experts module (parameters ``[num_experts, ...]``): every expert split along
                                its intermediate size (packed ``gate_up_proj``, ``down_proj``), its output
                                all-reduced once (``meshplan.experts.tp_styles.ExpertsTensorParallel``; layouts
                                read off the module or passed as ``params=``)
``moe_identity_expert``         an identity ("zero") expert inside such a module: input divided by the TP size
                                (``IdentityExpertParallel``)
``ep_dispatch_experts``         expert parallel (the ``ep`` axis of a plan): the fused experts module keeps
                                its own experts and gets its tokens by all-to-all (``ExpertParallel``; its
                                ``grouped_gemm`` parameter entries name the parameters split by expert)
``mamba2_mixer``                a Mamba2 mixer split by heads and groups (packed ``in_proj`` / ``conv1d``,
                                per-head ``dt_bias`` / ``A_log`` / ``D``, group norm, row-wise ``out_proj``;
                                ``meshplan.tensor_parallel.mixers.Mamba2MixerParallel``)
``mamba_mixer``                 a Mamba1 mixer split by channels (``MambaMixerParallel``; Jamba)
``short_conv_mixer``            an LFM2 short convolution split by channels (``ShortConvParallel``)
==============================  =====================================================================

Not in the vocabulary: ``grouped_gemm`` (parameter entries of an ``ep_dispatch_experts`` module, folded into its
``ExpertParallel``), and ``local_params``, whose meaning depends on the plan entries of
the module's parameters; the Hugging Face fallback (``meshplan.plans.hf``) translates ``local_params`` with those
entries into ``LocalShardedParameters``, and the ``packed_colwise`` / ``rowwise`` entries of a ``moe_tp_experts``
module's parameters into the layouts of its ``ExpertsTensorParallel``. Nor are the styles of replicated key/value
heads (:mod:`meshplan.tensor_parallel.kv_replication`: ``ReplicatedKeyValueProjection`` on ``k_proj`` / ``v_proj``,
``ReplicatedKeyValueAttention`` on their attention module), which need the block's head counts: fitting a plan to
a TP size larger than the KV head count puts them in place of the column-wise ``k_proj`` / ``v_proj`` styles.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ..core.errors import UnknownStyleError
from ..core.imports import import_class_from_path
from ..core.naming import did_you_mean
from ..core.registry import Registry

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

_TORCH = "meshplan.tensor_parallel.torch_styles"
_STYLES = "meshplan.tensor_parallel.styles"
_MIXERS = "meshplan.tensor_parallel.mixers"

#: style name -> dotted path of its factory (imported on first use, so plugin discovery stays light)
BUILTIN_STYLES: dict[str, str] = {
    "colwise": f"{_TORCH}:colwise",
    "rowwise": f"{_TORCH}:rowwise",
    "colwise_rep": f"{_TORCH}:colwise_gather_output",
    "colwise_gather_output": f"{_TORCH}:colwise_gather_output",
    "rowwise_rep": f"{_TORCH}:rowwise_split_input",
    "rowwise_split_input": f"{_TORCH}:rowwise_split_input",
    "sequence_parallel": f"{_TORCH}:sequence_parallel",
    "embedding_rowwise": f"{_STYLES}.embedding:VocabParallelEmbedding",
    "embedding_colwise": f"{_TORCH}:embedding_colwise",
    "packed_colwise": f"{_STYLES}.packed:PackedColwiseParallel",
    "packed_rowwise": f"{_STYLES}.packed:PackedRowwiseParallel",
    "replicate": f"{_STYLES}.composition:KeepReplicated",
    "replicated_with_grad_allreduce": f"{_STYLES}.local_parameters:ReplicatedWithGradAllReduce",
    "all_reduce": f"{_TORCH}:all_reduce",
    "mla_kv_a_proj": f"{_STYLES}.module_state:MlaKvAProjParallel",
    "moe_tp_experts": "meshplan.experts.tp_styles:ExpertsTensorParallel",
    "moe_identity_expert": "meshplan.experts.tp_styles:IdentityExpertParallel",
    "ep_dispatch_experts": "meshplan.experts.expert_parallel:ExpertParallel",
    "mamba2_mixer": f"{_MIXERS}:Mamba2MixerParallel",
    "mamba_mixer": f"{_MIXERS}:MambaMixerParallel",
    "short_conv_mixer": f"{_MIXERS}:ShortConvParallel",
}


def builtin_style(name: str) -> ParallelStyle:
    """A new style object for one of :data:`BUILTIN_STYLES` (no registry involved)."""
    return import_class_from_path(BUILTIN_STYLES[name])()


def make_style(name: str, registry: Registry) -> ParallelStyle:
    """A new style object for ``name`` (never shared between calls)."""
    if not isinstance(name, str):
        raise UnknownStyleError(f"Unknown parallel style {name!r}: a style name must be a string.")
    registration = registry.styles.find(name)
    if registration is None:
        raise UnknownStyleError(
            f"Unknown parallel style {name!r}. Known styles: {', '.join(sorted(registry.styles.keys()))}."
            + did_you_mean(name, registry.styles.keys())
        )
    from torch.distributed.tensor.parallel import ParallelStyle  # loaded on use: keeps start-up light

    factory = registration.load()
    style = factory()
    if not isinstance(style, ParallelStyle):
        raise UnknownStyleError(
            f"Style factory for {name!r} from {registration.provenance.describe()} returned "
            f"{type(style).__name__}, not a torch ParallelStyle."
        )
    return style


def copy_style(style: ParallelStyle) -> ParallelStyle:
    """An independent copy of a user-supplied style object (plans never share or mutate inputs)."""
    return copy.deepcopy(style)

