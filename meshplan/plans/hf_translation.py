"""The Hugging Face fallback: a model's own transformers TP plan, translated to torch DTensor styles.

Registered for ``transformers.modeling_utils.PreTrainedModel``, so the MRO walk reaches it only when no
provider is registered for a more specific class. The plan is merged from (lowest precedence first)
``config.base_model_tp_plan`` / ``text_config.base_model_tp_plan`` (prefixed by the base model they describe),
every inner model's ``_tp_plan`` (prefixed by its attribute path, e.g. ``model.`` or
``model.language_model.``), the class ``_tp_plan`` and the instance ``_tp_plan``.

Translation follows transformers' meaning of each style string (see :mod:`meshplan.tensor_parallel.vocabulary`);
names are made through the style registry like those of explicit plans, so a plugin's style name works in a
``_tp_plan`` and ``register_style(..., override=True)`` reaches the fallback too. Model-dependent cases:

* Keys that match neither a module nor a parameter are dropped and named in a warning (rank 0), as transformers
  itself only warns: its plans list keys for every variant of an architecture (dense MLP next to MoE experts,
  ``q_proj`` of the no-q-LoRA variant, ...) and one config builds one variant. Strict matching still applies
  to explicit and registered plans; :attr:`HFPlan.unmatched` keeps the dropped keys.
* ``mla_kv_a_proj`` becomes :class:`MlaKvAProjParallel` with the rotary width ``qk_rope_head_dim`` of the
  config of the module or its nearest configured ancestor.
* A ``local_params`` module whose parameters have their own ``colwise`` entries (attention sinks, per-head
  biases) becomes :class:`LocalShardedParameters`: those parameters are sharded on dim 0 like the heads.
* A ``moe_tp_experts`` module becomes :class:`ExpertsTensorParallel` with the layouts its parameters'
  ``packed_colwise`` / ``colwise`` / ``rowwise`` entries declare (the others read off the module), except that a
  gate/up parameter is packed as the module's forward reads it (Inkling's plans say ``colwise`` for a
  concatenated ``[gate; up]``; :attr:`HFPlan.corrected`, logged at INFO on rank 0); a module it
  cannot split (a parameter of unknown layout, a norm on each expert's output) stays replicated, as does a
  ``moe_identity_expert`` inside it, and both are named in the warning.
* An ``all_reduce`` module whose own parameter entries stay replicated (parameters named in the plan, not
  sharded) stays replicated too: its output is already complete on every rank (Inkling's shared experts).
* Shard-local children (:data:`SHARD_LOCAL_CHILDREN`): a parameterized per-head QK norm or activation module
  that the plan does not name, directly under a block whose projections are column-wise, runs on this rank's
  column shard, so its replicated parameters get partial gradients; it gets ``replicated_with_grad_allreduce``
  (:attr:`HFPlan.derived`).
* MoE parts the plan does not name (:mod:`meshplan.plans.hf_completion`): fused experts whose layout is read off
  the module with certainty get :class:`ExpertsTensorParallel`; MLPs (shared experts, dense MLP layers) and
  standard attention blocks in the MoE layer stacks get ``colwise`` inputs and a ``rowwise`` output (attention
  sinks sharded per head); all in :attr:`HFPlan.derived`, logged at INFO.
* Linear-attention blocks of the MoE layer stacks that the plan leaves whole
  (:mod:`meshplan.plans.hf_linear_attention`): their projections get ``colwise_gather_output``, as transformers'
  Qwen3-Next plan splits its gated delta net (:attr:`HFPlan.derived`).
* Sequence mixers the plan does not name (Mamba2, Mamba1, LFM2 short convolutions; in MoE and dense hybrids) get
  their :mod:`meshplan.tensor_parallel.mixers` style, which leaves a mixer whose heads or groups do not divide by
  the TP size whole (with a warning); in :attr:`HFPlan.derived`.

Entries torch styles cannot express are never dropped silently: the local-parameter and MoE styles left out,
whose modules are correct when simply left replicated, are listed in a warning (rank 0); any other (whose
omission could leave gradients partial) raises :class:`UntranslatableStyleError`.

Embeddings: an untied input embedding missing from the plan is made vocab-parallel, and so is an untied
``nn.Linear`` ``lm_head`` (column-wise, logits gathered: Nemotron-H's causal LM declares no ``lm_head`` entry);
a tied ``lm_head`` is never sharded apart from its embedding (whichever of the two the plan names, the other
gets the matching vocab-parallel style, so both are ``Shard(0)`` and are re-tied after sharding).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from ..core.errors import PlanError, PlanNotFoundError, SequenceParallelUnsupportedError, UntranslatableStyleError
from ..core.log import get_logger, log_rank0
from ..experts.modules import hf_layout_corrections, layouts_from_hf
from ..experts.tp_styles import ExpertsTensorParallel, IdentityExpertParallel
from ..introspection.config import model_configs
from ..introspection.embeddings import are_tied, embedding_modules, module_name
from ..plugins.manager import get_registry
from ..tensor_parallel.matching import covering_keys, match_key, match_parameter_key
from ..tensor_parallel.styles.local_parameters import LocalShardedParameters, ReplicatedWithGradAllReduce
from ..tensor_parallel.styles.module_state import MlaKvAProjParallel
from ..tensor_parallel.vocabulary import make_style
from .decoder import add_sequence_parallel, find_decoder_layout
from .hf_completion import (
    HEAD_NORMS,
    BlockSplit,
    uncovered_blocks,
    uncovered_experts,
    uncovered_lm_head,
    uncovered_mixers,
)
from .hf_expert_plan import hf_ep_plan
from .hf_linear_attention import REPLICATED_OUTPUT, uncovered_projections

if TYPE_CHECKING:
    from ..core.registry import Registry

logger = get_logger(__name__)

#: transformers styles whose module is still correct when left replicated.
REPLICABLE_STYLES = frozenset({"local_params"})
EXPERTS, IDENTITY_EXPERT = "moe_tp_experts", "moe_identity_expert"
VOCAB_EMBEDDING, VOCAB_HEAD = "embedding_rowwise", "colwise_rep"
LOCAL_PARAMS, MLA_KV_A_PROJ, ALL_REDUCE = "local_params", "mla_kv_a_proj", "all_reduce"
#: Style of a parameter entry under a ``local_params`` module -> the parameter dim it shards (per head).
LOCAL_PARAMETER_DIMS = {"colwise": 0}
#: Child names that, directly under a block with column-wise projections and absent from the plan, run on this
#: rank's column shard: per-head QK norms (after column-wise q/k projections, named as in
#: :data:`~meshplan.plans.hf_completion.HEAD_NORMS`) and activation modules (after
#: column-wise gate/up projections). Names, not structure, decide: a norm on a replicated activation (MLA's
#: ``kv_a_layernorm``, an indexer's ``k_norm``) or an MoE router sits in the same blocks and must not be summed.
SHARD_LOCAL_CHILDREN = frozenset({*HEAD_NORMS, "act_fn", "act", "activation_fn"})


@dataclass
class HFPlan:
    """A translated Hugging Face plan: torch styles, plus the entries left out and why.

    ``unmatched``: keys (and their styles) that match no module or parameter of this model, dropped;
    ``derived``: keys the translation added (shard-local children), with the reason;
    ``corrected``: entries translated otherwise than their style says, with the reason (a ``colwise`` on a
    concatenated ``[gate; up]`` expert parameter is split in two packed parts).
    """

    styles: dict[str, ParallelStyle] = field(default_factory=dict)
    left_replicated: dict[str, str] = field(default_factory=dict)
    untranslatable: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    corrected: dict[str, str] = field(default_factory=dict)


def _prefixed(prefix: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{key}" if prefix else key: style for key, style in plan.items()}


def _base_model_name(model: nn.Module, config: Any) -> str | None:
    """The shallowest base model (``m.base_model is m``) configured by ``config``."""
    return next((name for name, module in model.named_modules()
                 if getattr(module, "config", None) is config and getattr(module, "base_model", None) is module),
                None)


def merged_hf_plan(model: nn.Module, axis: str = "tp") -> dict[str, Any]:
    """The model's transformers TP plan (``axis="ep"``: its EP plan, from ``base_model_ep_plan`` and ``_ep_plan``)
    with fully qualified keys (style strings, untranslated)."""
    plan: dict[str, Any] = {}
    for cfg in model_configs(model):
        declared = getattr(cfg, f"base_model_{axis}_plan", None)
        prefix = _base_model_name(model, cfg) if declared else None
        if prefix is not None:
            plan.update(_prefixed(prefix, declared))
    inner = [(name, module) for name, module in model.named_modules() if name]
    for name, module in sorted(inner, key=lambda item: -item[0].count(".")):  # deepest first: outer plans win
        if isinstance(getattr(module, f"_{axis}_plan", None), Mapping):
            plan.update(_prefixed(name, getattr(module, f"_{axis}_plan")))
    for source in (getattr(type(model), f"_{axis}_plan", None), getattr(model, f"_{axis}_plan", None)):
        if isinstance(source, Mapping):
            plan.update(source)
    return plan


def complete_embeddings(plan: dict[str, Any], embed: str, lm_head: str | None, tied: bool) -> None:
    """Vocab-parallel untied input embedding ``embed`` when the plan lacks it; a tied pair is sharded together
    or not at all (whichever of the two the plan names, the other gets the matching vocab-parallel style)."""
    if not tied:
        plan.setdefault(embed, VOCAB_EMBEDDING)
    elif lm_head is not None and (embed in plan) != (lm_head in plan):
        plan.setdefault(embed, VOCAB_EMBEDDING)
        plan.setdefault(lm_head, VOCAB_HEAD)


def _complete_embeddings(model: nn.Module, plan: dict[str, Any]) -> str | None:
    """:func:`complete_embeddings` for the model's own input and output embedding modules, and a vocab-parallel
    untied ``lm_head`` the plan lacks (:func:`~meshplan.plans.hf_completion.uncovered_lm_head`), whose key is
    returned."""
    embedding, head = embedding_modules(model)
    embed = module_name(model, embedding)
    if embed is not None:
        complete_embeddings(plan, embed, module_name(model, head), are_tied(embedding, head))
    lm_head = uncovered_lm_head(model, plan)
    if lm_head is not None:
        plan[lm_head] = VOCAB_HEAD
    return lm_head


def _config_value(model: nn.Module, fqn: str, attribute: str) -> Any:
    """``config.<attribute>`` of the module ``fqn`` or of its nearest ancestor whose config has it."""
    parts = fqn.split(".") if fqn else []
    for depth in range(len(parts), -1, -1):
        config = getattr(model.get_submodule(".".join(parts[:depth])), "config", None)
        value = getattr(config, attribute, None)
        if value is not None:
            return value
    return None


def _mla_kv_a_proj(model: nn.Module, key: str) -> MlaKvAProjParallel | str:
    """The style for an ``mla_kv_a_proj`` entry, or why it cannot be built."""
    widths = {_config_value(model, fqn, "qk_rope_head_dim") for fqn in match_key(model, key)}
    if len(widths) != 1 or not isinstance(next(iter(widths)), int):
        found = sorted(map(str, widths))
        return f"{MLA_KV_A_PROJ} (needs one integer config.qk_rope_head_dim for its modules, found {found})"
    return MlaKvAProjParallel(rope_dim=next(iter(widths)))


def _planned_modules(model: nn.Module, result: HFPlan) -> set[str]:
    """Modules an entry of ``result`` already selects, split or left replicated."""
    return {fqn for key in (*result.styles, *result.left_replicated) for fqn in match_key(model, key)}


def _shard_local_children(model: nn.Module, result: HFPlan) -> dict[str, ParallelStyle]:
    """``replicated_with_grad_allreduce`` for the :data:`SHARD_LOCAL_CHILDREN` the plan misses (see the module
    docstring); keys are generalized (``layers.*``) where the pattern selects exactly the qualifying modules."""
    planned = _planned_modules(model, result)
    blocks = {
        fqn.rpartition(".")[0]
        for key, style in result.styles.items()
        if isinstance(style, ColwiseParallel) and style.output_layouts == (Shard(-1),)
        for fqn in match_key(model, key) if isinstance(model.get_submodule(fqn), nn.Linear)
    }
    found: set[str] = set()
    for block in blocks:
        for name, child in model.get_submodule(block).named_children():
            fqn = f"{block}.{name}" if block else name
            has_parameters = next(child.parameters(recurse=False), None) is not None
            if name in SHARD_LOCAL_CHILDREN and fqn not in planned and has_parameters:
                found.add(fqn)
    return {key: ReplicatedWithGradAllReduce() for key in covering_keys(model, found)}


def _local_parameter_styles(model: nn.Module, local: dict[str, dict[str, int]]) -> dict[str, ParallelStyle]:
    """:class:`LocalShardedParameters` for each owner module (``{owner fqn: {parameter: dim}}``)."""
    by_parameters: dict[tuple[tuple[str, int], ...], set[str]] = {}
    for owner, params in local.items():
        by_parameters.setdefault(tuple(sorted(params.items())), set()).add(owner)
    return {key: LocalShardedParameters(dict(params))
            for params, owners in by_parameters.items() for key in covering_keys(model, owners)}


def _experts_style(model: nn.Module, key: str, entries: dict[str, str], result: HFPlan,
                   ) -> ExpertsTensorParallel | str:
    """The style for a ``moe_tp_experts`` entry and its parameters' ``entries`` (corrections recorded in
    ``result``), or why it stays replicated."""
    layouts, corrected = [], {}
    for fqn in match_key(model, key):
        try:
            module = model.get_submodule(fqn)
            layouts.append(layouts_from_hf(module, entries))
        except PlanError as exc:
            return f"{EXPERTS} (module left replicated: {exc})"
        corrected.update({f"{key}.{name}": why for name, why in hf_layout_corrections(module, entries).items()})
    if any(layout != layouts[0] for layout in layouts):
        return f"{EXPERTS} (module left replicated: the modules {key!r} selects have different parameters)"
    result.corrected.update(corrected)
    return ExpertsTensorParallel(params=layouts[0])


def _add_experts_styles(model: nn.Module, merged: Mapping[str, Any], entries: dict[str, dict[str, str]],
                        result: HFPlan) -> None:
    """``moe_tp_experts`` modules (with their parameter ``entries``), then the identity experts inside them."""
    for key, style in merged.items():
        if style == EXPERTS and match_key(model, key):
            translated = _experts_style(model, key, entries.get(key, {}), result)
            if isinstance(translated, str):
                result.left_replicated[key] = translated
            else:
                result.styles[key] = translated
    for key, style in merged.items():
        if style == IDENTITY_EXPERT and match_key(model, key):
            if isinstance(result.styles.get(key.rpartition(".")[0]), ExpertsTensorParallel):
                result.styles[key] = IdentityExpertParallel()
            else:
                result.left_replicated[key] = f"{IDENTITY_EXPERT} (its experts module is not split by TP)"


def _replicate_partial_sums_of_replicated_parameters(merged: Mapping[str, Any], result: HFPlan) -> None:
    """An ``all_reduce`` module whose own parameter entries stay replicated (Inkling's shared experts: 3-D
    ``gate_proj`` / ``up_proj`` / ``down_proj`` named as parameters) computes the full output on every rank; its
    all-reduce would multiply that by the TP size, so the module is left replicated too."""
    owners = {key.rpartition(".")[0] for key, why in result.left_replicated.items() if "names a parameter" in why}
    for key in owners:
        if merged.get(key) == ALL_REDUCE and key in result.styles:
            del result.styles[key]
            result.left_replicated[key] = (f"{ALL_REDUCE} (module left replicated: its parameter entries are not "
                                           "sharded, so its output is already the full sum on every rank)")


def _complete_moe(model: nn.Module, result: HFPlan, registry: Registry) -> None:
    """Fused experts, MLPs and attention blocks of the MoE layer stacks that no entry covers, split where the math
    is certain (:mod:`meshplan.plans.hf_completion`); recorded in :attr:`HFPlan.derived` (experts it cannot split:
    in :attr:`HFPlan.left_replicated`)."""
    planned = _planned_modules(model, result)
    experts, unsplittable = uncovered_experts(model, planned)
    by_layouts: dict[tuple, set[str]] = {}
    for fqn, layouts in experts.items():
        by_layouts.setdefault(tuple(sorted(layouts.items(), key=lambda item: item[0])), set()).add(fqn)
    for layouts, fqns in by_layouts.items():
        for key in covering_keys(model, fqns):
            result.styles[key] = ExpertsTensorParallel(params=dict(layouts))
            result.derived[key] = f"{EXPERTS} (fused experts the plan does not name; layouts read off the module)"
    for fqn, why in unsplittable.items():
        result.left_replicated[fqn] = f"{EXPERTS} (fused experts the plan does not name, left replicated: {why})"
    by_split: dict[BlockSplit, set[str]] = {}
    for fqn, split in uncovered_blocks(model, planned).items():
        by_split.setdefault(split, set()).add(fqn)
    for split, fqns in by_split.items():
        for key in covering_keys(model, fqns):
            others = {f"{key}.{name}": _mla_kv_a_proj(model, f"{key}.{name}") if style == MLA_KV_A_PROJ else style
                      for name, style in split.others}
            if any(isinstance(style, str) for style in others.values()):
                continue  # a style it cannot build (e.g. no rotary width in the config): the block stays whole
            result.styles.update(others)
            for name in split.inputs:
                result.styles[f"{key}.{name}"] = make_style("colwise", registry)
            result.styles[f"{key}.{split.output}"] = make_style("rowwise", registry)
            if split.local_params:
                result.styles[key] = LocalShardedParameters(dict(split.local_params))
            result.derived[key] = (f"colwise {'/'.join(split.inputs)}, rowwise {split.output}"
                                   f"{''.join(f', {n} per head' for n, _ in split.local_params)} ({split.kind} "
                                   "block of the MoE layers the plan does not name)")


def _complete_linear_attention(model: nn.Module, result: HFPlan, registry: Registry) -> None:
    """``colwise_gather_output`` for the projections of linear-attention blocks the plan leaves whole
    (:mod:`meshplan.plans.hf_linear_attention`); recorded in :attr:`HFPlan.derived`."""
    fqns = uncovered_projections(model, result.styles, result.left_replicated)
    for key in covering_keys(model, fqns):
        result.styles[key] = make_style(REPLICATED_OUTPUT, registry)
        result.derived[key] = f"{REPLICATED_OUTPUT} (a projection of a linear-attention block the plan leaves whole)"


def _complete_mixers(model: nn.Module, result: HFPlan) -> None:
    """Sequence mixers no entry covers get their mixer style (:func:`~meshplan.plans.hf_completion.uncovered_mixers`),
    left whole when their sizes do not divide by the TP size; recorded in :attr:`HFPlan.derived`."""
    from ..tensor_parallel.mixers import MIXER_STYLES  # loaded on use: keeps start-up light

    by_name: dict[str, set[str]] = {}
    for fqn, name in uncovered_mixers(model, _planned_modules(model, result)).items():
        by_name.setdefault(name, set()).add(fqn)
    for name, fqns in by_name.items():
        for key in covering_keys(model, fqns):
            result.styles[key] = MIXER_STYLES[name](replicate_if_indivisible=True)
            result.derived[key] = f"{name} (a sequence mixer the plan does not name; split by its channels)"


def _style_registry(registry: Registry | None) -> Registry:
    """``registry``, else the loaded one (plugins and ``meshplan.register_style`` included)."""
    if registry is not None:
        return registry
    return get_registry()


def translate_hf_plan(model: nn.Module, registry: Registry | None = None) -> HFPlan:
    """Merge and translate the model's transformers plan (see the module docstring); style names are made
    through the style registry (default: the loaded one), so plugin styles and overrides apply."""
    registry = _style_registry(registry)
    merged = merged_hf_plan(model)
    if not merged:
        return HFPlan()
    lm_head = _complete_embeddings(model, merged)
    result = HFPlan()
    if lm_head is not None:
        result.derived[lm_head] = f"{VOCAB_HEAD} (an untied lm_head the plan does not name: vocab-parallel)"
    local_owners = {key for key, style in merged.items() if style == LOCAL_PARAMS}
    local_params: dict[str, dict[str, int]] = {}  # owner module fqn -> {parameter: sharded dim}
    experts_owners = {key for key, style in merged.items() if style == EXPERTS}
    experts_entries: dict[str, dict[str, str]] = {}  # owner key -> {parameter: style}
    for key, style in merged.items():
        if not match_key(model, key):
            owner, _, name = key.rpartition(".")
            if not match_parameter_key(model, key):
                result.unmatched[key] = str(style)
            elif owner in experts_owners:
                experts_entries.setdefault(owner, {})[name] = str(style)
            elif owner in local_owners and style in LOCAL_PARAMETER_DIMS:
                for fqn in match_parameter_key(model, key):
                    local_params.setdefault(fqn.rpartition(".")[0], {})[name] = LOCAL_PARAMETER_DIMS[style]
            elif owner in local_owners:
                result.untranslatable[key] = f"{style} (a parameter of a {LOCAL_PARAMS} module)"
            else:
                result.left_replicated[key] = f"{style} (names a parameter; torch styles shard modules)"
        elif isinstance(style, ParallelStyle):
            result.styles[key] = style
        elif style == MLA_KV_A_PROJ:
            translated = _mla_kv_a_proj(model, key)
            if isinstance(translated, str):
                result.untranslatable[key] = translated
            else:
                result.styles[key] = translated
        elif style in (EXPERTS, IDENTITY_EXPERT):
            continue  # after the loop, once every parameter entry is known
        elif style in REPLICABLE_STYLES:
            result.left_replicated[key] = f"{style} (module left replicated)"
        elif isinstance(style, str) and registry.styles.find(style) is not None:
            result.styles[key] = make_style(style, registry)
        else:
            result.untranslatable[key] = str(style)
    for owner in local_owners:
        if set(match_key(model, owner)) <= local_params.keys():
            result.left_replicated.pop(owner, None)
    result.styles.update(_local_parameter_styles(model, local_params))
    _add_experts_styles(model, merged, experts_entries, result)
    _replicate_partial_sums_of_replicated_parameters(merged, result)
    _complete_moe(model, result, registry)
    _complete_linear_attention(model, result, registry)
    _complete_mixers(model, result)
    derived = _shard_local_children(model, result)
    result.styles.update(derived)
    result.derived.update({key: "replicated_with_grad_allreduce (runs on this rank's column shard)"
                           for key in derived})
    return result


def _checked(model: nn.Module, plan: HFPlan) -> dict[str, ParallelStyle]:
    """The styles, after raising for unsafe gaps and warning (rank 0) about skipped keys and entries left
    replicated."""
    name = type(model).__qualname__
    if not plan.styles and not plan.untranslatable:
        why = (f"none of its keys match a module or parameter ({', '.join(map(repr, plan.unmatched))})"
               if plan.unmatched else "it declares no `_tp_plan` or `config.base_model_tp_plan`")
        raise PlanNotFoundError(
            f"Hugging Face TP plan is not supported for {name}: {why}. Pass tp_plan=..., register one with "
            "meshplan.register_tp_plan(...), or run without tensor parallelism."
        )
    if plan.untranslatable:
        listing = ", ".join(f"{key!r}: {style!r}" for key, style in plan.untranslatable.items())
        raise UntranslatableStyleError(
            f"The Hugging Face TP plan of {name} uses styles torch DTensor styles cannot express: {listing}. "
            "Leaving them out could give wrong gradients; register a plan for this class with "
            "meshplan.register_tp_plan(...) or pass tp_plan=..."
        )
    if plan.unmatched:
        listing = ", ".join(f"{key!r}: {style!r}" for key, style in plan.unmatched.items())
        log_rank0(logger, logging.WARNING, "Hugging Face TP plan of %s: %d keys match no module or parameter of this "
                  "model (transformers plans cover every variant of an architecture) and are skipped: %s.",
                  name, len(plan.unmatched), listing)
    if plan.derived:
        log_rank0(logger, logging.INFO, "Hugging Face TP plan of %s: added %s.", name,
                  ", ".join(f"{key!r}: {why}" for key, why in plan.derived.items()))
    if plan.corrected:
        log_rank0(logger, logging.INFO, "Hugging Face TP plan of %s: translated as the modules compute: %s.", name,
                  ", ".join(f"{key!r}: {why}" for key, why in plan.corrected.items()))
    if plan.left_replicated:
        listing = ", ".join(f"{key!r}: {why}" for key, why in plan.left_replicated.items())
        log_rank0(logger, logging.WARNING, "Hugging Face TP plan of %s: %d entries have no torch equivalent and "
                  "stay replicated (correct, but not sharded): %s.", name, len(plan.left_replicated), listing)
    return plan.styles


def hf_tp_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
               ) -> dict[str, ParallelStyle]:
    """The fallback provider: the translated transformers plan, with a derived sequence-parallel variant for
    standard decoders (:class:`SequenceParallelUnsupportedError` otherwise)."""
    styles = _checked(model, translate_hf_plan(model, registry))
    if not sequence_parallel:
        return styles
    try:
        return add_sequence_parallel(model, styles, find_decoder_layout(model))
    except PlanError as exc:
        raise SequenceParallelUnsupportedError(
            f"Cannot derive sequence parallel from the Hugging Face TP plan of {type(model).__qualname__}: {exc} "
            "Register a sequence-parallel plan for this class with meshplan.register_tp_plan(...), pass "
            "tp_plan=..., or run without sequence_parallel."
        ) from exc


def hf_plans(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None) -> dict[str, Any]:
    """The fallback provider: the translated TP plan (styles made through ``registry``) and, when the model
    declares one, its EP plan (:func:`meshplan.plans.hf_expert_plan.hf_ep_plan`), each built only when its axis
    is used."""
    plans: dict[str, Any] = {"tp": functools.partial(hf_tp_plan, model, sequence_parallel, registry=registry)}
    declared = merged_hf_plan(model, "ep")
    if declared:
        plans["ep"] = functools.partial(hf_ep_plan, model, declared)  # merged once, here
    return plans
