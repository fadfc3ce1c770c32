"""Completing a Hugging Face TP plan where it leaves the MoE parts of a decoder whole.

Many transformers 5.24 plans name only some of a MoE model's parts: GPT-OSS's names no experts at all, Qwen2-MoE's
and Cohere2-MoE's no shared expert, AFMoE's no dense MLP of its first layers. The fallback
(:mod:`meshplan.plans.hf_translation`) completes such a plan with parts whose tensor-parallel split is
self-contained — replicated input, one all-reduce of the output — so it is correct whatever the rest of the plan
does, and adds them only where the structure leaves no doubt about the math:

* a fused experts module (:func:`~meshplan.introspection.experts.find_expert_modules`) that no plan entry covers gets
  :class:`~meshplan.experts.tp_styles.ExpertsTensorParallel` when every parameter's layout is known
  (:func:`~meshplan.experts.modules.infer_param_layouts`; not for a norm on each expert's output);
* an *MLP* that no plan entry covers, inside the same layer stack as fused experts (shared experts, dense MLP
  layers): a module without parameters of its own whose parameterized children are exactly bias-free ``nn.Linear``
  input projections (``gate_proj`` and ``up_proj``, or ``up_proj`` alone; ``w1`` / ``w3``) and one output projection
  (``down_proj``; ``w2``) of matching widths, the other children parameter-free (the activation). The inputs become
  ``colwise``, the output ``rowwise``: the activation and product act on each intermediate feature alone;
* an *attention block* that no plan entry covers, in those layer stacks: ``nn.Linear`` ``q_proj`` / ``k_proj`` /
  ``v_proj`` (``colwise``, whole heads of its ``head_dim``) and one output projection (``rowwise``; a name of
  :data:`ATTENTION_OUTPUTS`: ``o_proj``, LFM2's ``out_proj``), optional per-head query/key norms over ``head_dim``
  (names in :data:`HEAD_NORMS`: ``q_norm``, LFM2's ``q_layernorm``, HunYuan's ``query_layernorm``, ...; the
  fallback gives them ``replicated_with_grad_allreduce``), an optional output gate (:data:`ATTENTION_GATES`:
  AFMoE's ``gate_proj``, as wide as the heads' output; ``colwise`` like them, so each rank gates its own heads)
  or a ``q_proj`` twice as wide as the heads (each head's ``[query; gate]``, Qwen3-Next's layout, in Qwen4-Exp), an
  optional per-head ``sinks`` parameter (sharded with the heads), an optional sparse-attention indexer
  (:data:`ATTENTION_INDEXERS`, left as the plan has it) and nothing else; as transformers' own attention plans do,
  this relies on the forward reshaping by ``head_dim`` (``view(..., -1, head_dim)``) and, for the gates, on their
  naming conventions (every transformers attention ``gate_proj``, and the gate half of every double-width
  ``q_proj``, scales the attention output elementwise by its sigmoid before the output projection). The head
  counts must divide by the TP size (checked before any collective);
* a *multi-head latent attention* block that no plan entry covers, in those layer stacks, made exactly of
  DeepSeek-V2/V3's parts (``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa`` /
  ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``): split by heads as the built-in DeepSeek plan
  (:mod:`meshplan.plans.deepseek`) and transformers' DeepSeek-V2 plan do (``kv_a_proj_with_mqa``:
  ``mla_kv_a_proj``, which needs the config's ``qk_rope_head_dim``; without it the block stays whole), optionally
  with a per-head output gate (:data:`MLA_HEAD_GATES`, ``colwise`` with the heads);
* an untied ``nn.Linear`` output embedding that no plan key covers (:func:`uncovered_lm_head`): vocab-parallel,
  as transformers plans ``lm_head`` elsewhere (Nemotron-H's causal LM declares none).

A module is covered when a plan entry (translated or left replicated) names it, an ancestor or a descendant
outside its indexer.
Model types in :data:`NOT_COMPLETED` keep their plan as transformers wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..core.errors import PlanError
from ..experts.modules import ExpertParamLayout, infer_param_layouts
from ..introspection.embeddings import are_tied, embedding_modules, module_name
from ..introspection.experts import find_expert_modules
from ..tensor_parallel.matching import within

#: Model types whose plan is not completed, and why. DeepSeek-V4, measured at the conformance sweep's tiny widths
#: with the float32 casts inside its norms and hyper-connections lifted: with its shared experts split as MLPs, TP=2
#: matches one process to 1.7e-14 in float64, and to 1.4e-14 with its attention also split by heads (a prototype:
#: ``q_b_proj`` column-wise, the grouped ``o_a_proj`` by whole groups, ``o_b_proj`` row-wise, ``sinks`` per head, the
#: single KV head and the compressor replicated with their output gradients summed, the local head count set on the
#: module). In float32 the one-process gradient of ``hc_head.hc_scale`` is itself 8.3e-6 off the float64 one, the
#: TP=2 one under 3e-6: the 1.05e-5 between the two float32 runs is float32 rounding of the reference.
NOT_COMPLETED = {
    "deepseek_v4": "its split shared experts are exact in float64 (1.7e-14 relative), but in float32 the gradient "
                   "of the hyper-connection head's hc_scale then differs by 1.05e-5 relative from one process (whose "
                   "own float32 gradient is 8.3e-6 off the float64 one), above the conformance sweep's 1e-5 "
                   "tolerance",
}
#: Query, key and value projections (column-wise) of the attention blocks completed.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
#: Accepted names of their output projection (row-wise); a block has exactly one.
ATTENTION_OUTPUTS = ("o_proj", "out_proj")
#: Accepted names of their output gates: a projection of the hidden states, as wide as the attention output, whose
#: sigmoid scales that output feature by feature before the output projection (column-wise with the heads).
ATTENTION_GATES = ("gate_proj",)
#: Accepted names of the per-head norms an attention block may apply to its query and key heads (weights of
#: ``head_dim`` elements); shard-local children of the block (see :mod:`meshplan.plans.hf_translation`).
HEAD_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")
#: Accepted names of a sparse-attention indexer an attention block may hold: it only selects the keys each query
#: attends to (indices or a boolean mask, without gradient), from replicated inputs, so the split leaves it as the
#: plan has it (Qwen4-Exp's ``indexer``, whose projection the plan names) and it does not make the block covered.
ATTENTION_INDEXERS = ("indexer",)
#: Accepted names of a multi-head latent attention's output gate: one output per head, whose sigmoid scales that
#: head's attention output (BailingHybrid's ``g_proj``; column-wise with the heads).
MLA_HEAD_GATES = ("g_proj",)
#: Input projections (column-wise) and output projection (row-wise) of the MLPs completed, by naming convention.
MLP_NAMINGS = ((("gate_proj", "up_proj"), "down_proj"), (("up_proj",), "down_proj"), (("w1", "w3"), "w2"))


def is_covered(fqn: str, planned: Iterable[str]) -> bool:
    """Whether a planned module is ``fqn``, one of its ancestors or one of its descendants."""
    planned = set(planned)
    return within(fqn, planned) or any(p.startswith(f"{fqn}.") for p in planned)


def is_completed(model: nn.Module) -> bool:
    """Whether the fallback completes this model's plan (its model type is not in :data:`NOT_COMPLETED`)."""
    return getattr(getattr(model, "config", None), "model_type", None) not in NOT_COMPLETED


def uncovered_experts(model: nn.Module, planned: set[str]) -> tuple[dict[str, dict[str, ExpertParamLayout]],
                                                                     dict[str, str]]:
    """``({fqn: layouts}, {fqn: why not split})`` for the fused experts modules no plan entry covers."""
    split: dict[str, dict[str, ExpertParamLayout]] = {}
    left: dict[str, str] = {}
    if not is_completed(model):
        return split, left
    for fqn, module in find_expert_modules(model):
        if is_covered(fqn, planned):
            continue
        try:
            split[fqn] = infer_param_layouts(module)
        except PlanError as exc:
            left[fqn] = str(exc)
    return split, left


def uncovered_lm_head(model: nn.Module, plan: Iterable[str]) -> str | None:
    """The name of the model's output embedding when the plan (keys ``plan``) lacks it and it can be split
    vocab-parallel on its own: an ``nn.Linear`` not tied to the input embedding (a tied pair is completed
    together, by :func:`~meshplan.plans.hf_translation.complete_embeddings`). It gets the style transformers gives
    ``lm_head`` elsewhere, column-wise with its logits gathered, which is exact whatever the rest of the plan does.
    ``None`` otherwise, and for the model types in :data:`NOT_COMPLETED`."""
    embedding, head = embedding_modules(model)
    name = module_name(model, head)
    if name is None or type(head) is not nn.Linear or are_tied(embedding, head) or not is_completed(model) \
            or is_covered(name, plan):
        return None
    return name


def layer_stacks(fqns: Iterable[str]) -> set[str]:
    """The layer stacks (``model.layers``) holding modules ``fqns`` (``model.layers.3.mlp.experts``)."""
    found: set[str] = set()
    for fqn in fqns:
        parts = fqn.split(".")
        for depth in range(len(parts), 0, -1):
            if parts[depth - 1].isdigit():
                found.add(".".join(parts[:depth - 1]))
                break
    return found


@dataclass(frozen=True)
class BlockSplit:
    """How a block the plan does not name is split: ``inputs`` column-wise, ``output`` row-wise (child names),
    ``local_params`` (own parameter, dim) sharded per head like the column-wise outputs, ``others`` by their
    transformers style; ``kind`` for messages."""

    kind: str
    inputs: tuple[str, ...]
    output: str
    local_params: tuple[tuple[str, int], ...] = ()
    #: (child, transformers style name) entries translated like the plan's own (``mla_kv_a_proj``)
    others: tuple[tuple[str, str], ...] = ()


def _parameterized_children(module: nn.Module) -> set[str]:
    return {name for name, child in module.named_children() if next(child.parameters(), None) is not None}


def mlp_split(module: nn.Module) -> BlockSplit | None:
    """The split of ``module`` if it is an MLP (see the module docstring), else ``None``."""
    if next(module.parameters(recurse=False), None) is not None:
        return None
    parameterized = _parameterized_children(module)
    for inputs, output in MLP_NAMINGS:
        if parameterized != {*inputs, output}:
            continue
        linears = [getattr(module, name) for name in (*inputs, output)]
        if not all(type(linear) is nn.Linear and linear.bias is None for linear in linears):
            return None
        *ins, out = linears
        widths = {(linear.in_features, linear.out_features) for linear in ins}
        return BlockSplit("an MLP", inputs, output) if widths == {(out.out_features, out.in_features)} else None
    return None


def attention_split(module: nn.Module) -> BlockSplit | None:
    """The split of ``module`` if it is a standard attention block, optionally gated (see the module docstring),
    else ``None``."""
    head_dim = getattr(module, "head_dim", None)
    parameterized = _parameterized_children(module) - set(ATTENTION_INDEXERS)
    outputs = [name for name in ATTENTION_OUTPUTS if name in parameterized]
    gates = tuple(name for name in ATTENTION_GATES if name in parameterized)
    norms = parameterized - {*ATTENTION_INPUTS, *outputs, *gates}
    if not isinstance(head_dim, int) or head_dim < 1 or len(outputs) != 1 \
            or not set(ATTENTION_INPUTS) <= parameterized or not norms <= set(HEAD_NORMS):
        return None
    q, k, v, o, *gate_linears = (getattr(module, name) for name in (*ATTENTION_INPUTS, *outputs, *gates))
    if not all(type(linear) is nn.Linear for linear in (q, k, v, o, *gate_linears)):
        return None
    hidden, heads_width = o.out_features, o.in_features
    packed_gate = q.out_features == 2 * heads_width  # each head's [query; gate], as the forward chunks it
    if {q.in_features, k.in_features, v.in_features} != {hidden} \
            or q.out_features not in {heads_width, 2 * heads_width} or k.out_features != v.out_features \
            or heads_width % head_dim or k.out_features % head_dim:
        return None
    if any((gate.in_features, gate.out_features) != (hidden, heads_width) for gate in gate_linears):
        return None
    if any(p.numel() != head_dim for name in norms for p in getattr(module, name).parameters()):
        return None
    own = dict(module.named_parameters(recurse=False))
    if own and (own.keys() != {"sinks"} or tuple(own["sinks"].shape) != (heads_width // head_dim,)):
        return None
    kind = "a gated attention" if gates or packed_gate else "an attention"
    return BlockSplit(kind, (*ATTENTION_INPUTS, *gates), outputs[0], (("sinks", 0),) if own else ())


def latent_attention_split(module: nn.Module) -> BlockSplit | None:
    """The split of ``module`` if it is multi-head latent attention as DeepSeek-V2/V3 write it, optionally with a
    per-head output gate (see the module docstring), else ``None``."""
    query = "q_b_proj" if getattr(module, "q_a_proj", None) is not None else "q_proj"  # Kimi: q_a_proj = None
    linears = (query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    norms = {"q_a_layernorm", "kv_a_layernorm"} if query == "q_b_proj" else {"kv_a_layernorm"}
    expected = {*linears, *norms, *(("q_a_proj",) if query == "q_b_proj" else ())}
    gates = tuple(name for name in MLA_HEAD_GATES if name in _parameterized_children(module))
    if _parameterized_children(module) != {*expected, *gates} \
            or next(module.parameters(recurse=False), None) is not None:
        return None
    q, kv_a, kv_b, o, *gate_linears = (getattr(module, name) for name in (*linears, *gates))
    rank = getattr(module.kv_a_layernorm, "weight", None)
    if not all(type(linear) is nn.Linear for linear in (q, kv_a, kv_b, o, *gate_linears)) or rank is None \
            or kv_b.in_features != rank.numel() or kv_a.out_features <= rank.numel():
        return None
    if any(gate.in_features != o.out_features or q.out_features % gate.out_features
           or kv_b.out_features % gate.out_features or o.in_features % gate.out_features for gate in gate_linears):
        return None
    return BlockSplit("a multi-head latent attention", (query, "kv_b_proj", *gates), "o_proj",
                      others=(("kv_a_proj_with_mqa", "mla_kv_a_proj"),))


def _outside_indexers(fqn: str, planned: set[str]) -> set[str]:
    """``planned`` without the modules inside the indexer of the block ``fqn`` (:data:`ATTENTION_INDEXERS`)."""
    indexers = tuple(f"{fqn}.{name}" for name in ATTENTION_INDEXERS)
    return {p for p in planned if not any(p == indexer or p.startswith(f"{indexer}.") for indexer in indexers)}


def uncovered_blocks(model: nn.Module, planned: set[str]) -> dict[str, BlockSplit]:
    """``{fqn: split}`` of the MLPs and attention blocks no plan entry covers, in the layer stacks of the model's
    fused experts."""
    if not is_completed(model):
        return {}
    stacks = layer_stacks(fqn for fqn, _ in find_expert_modules(model))
    found = {}
    for fqn, module in model.named_modules():
        inside = any(fqn.startswith(f"{stack}.") if stack else fqn[:1].isdigit() for stack in stacks)
        if inside and not is_covered(fqn, _outside_indexers(fqn, planned)):
            split = mlp_split(module) or attention_split(module) or latent_attention_split(module)
            if split is not None:
                found[fqn] = split
    return found


# --- sequence mixers (meshplan.tensor_parallel.mixers) -----------------------------------------------------------
def uncovered_mixers(model: nn.Module, planned: set[str]) -> dict[str, str]:
    """``{fqn: style name}`` of the sequence mixers no plan entry covers (Mamba2, Mamba1, LFM2 short convolutions,
    recognized by structure: :func:`~meshplan.tensor_parallel.mixers.mixer_style_name`). Their styles take a
    replicated input and all-reduce their output, so they are safe anywhere: in MoE and dense hybrids alike."""
    from ..tensor_parallel.mixers import mixer_style_name  # DTensor styles: imported once a plan is built

    if not is_completed(model):
        return {}
    return {fqn: name for fqn, module in model.named_modules()
            if not is_covered(fqn, planned) and (name := mixer_style_name(module)) is not None}
