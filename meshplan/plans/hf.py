"""The Hugging Face fallback: a model's own transformers TP plan, translated to torch DTensor styles.

Registered for ``transformers.modeling_utils.PreTrainedModel``, so the MRO walk reaches it only when no
provider is registered for a more specific class. The plan is merged from (lowest precedence first)
``config.base_model_tp_plan`` / ``text_config.base_model_tp_plan`` (prefixed by the base model they describe),
every inner model's ``_tp_plan`` (prefixed by its attribute path, e.g. ``model.`` or
``model.language_model.``), the class ``_tp_plan`` and the instance ``_tp_plan``.

Translation follows transformers' meaning of each style string (see :mod:`meshplan.core.styles`).
Entries torch styles cannot express are never dropped silently: the MoE / local-parameter styles, whose
modules are correct when simply left replicated, are listed in a warning (rank 0); any other (e.g.
``mla_kv_a_proj``, whose omission would leave gradients partial) raises :class:`UntranslatableStyleError`.

Embeddings: an untied input embedding missing from the plan is made vocab-parallel; a tied ``lm_head`` is
never sharded apart from its embedding (whichever of the two the plan names, the other gets the matching
vocab-parallel style, so both are ``Shard(0)`` and are re-tied after sharding).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle

from ..core.errors import PlanError, PlanNotFoundError, SequenceParallelUnsupportedError, UntranslatableStyleError
from ..core.log import get_logger, log_rank0
from ..core.matching import match_parameter_key
from ..core.styles import BUILTIN_STYLES
from ..plugins.hookspecs import hookimpl
from .decoder import add_sequence_parallel, are_tied, embedding_modules, find_decoder_layout, module_name

logger = get_logger(__name__)

#: transformers styles whose module is still correct when left replicated (experts computed in full).
REPLICABLE_STYLES = frozenset({"moe_tp_experts", "moe_identity_expert", "local_params"})
VOCAB_EMBEDDING, VOCAB_HEAD = "embedding_rowwise", "colwise_rep"


@dataclass
class HFPlan:
    """A translated Hugging Face plan: torch styles, plus the entries left out and why."""

    styles: dict[str, ParallelStyle] = field(default_factory=dict)
    left_replicated: dict[str, str] = field(default_factory=dict)
    untranslatable: dict[str, str] = field(default_factory=dict)


def _prefixed(prefix: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{key}" if prefix else key: style for key, style in plan.items()}


def _base_model_name(model: nn.Module, config: Any) -> str | None:
    """The shallowest base model (``m.base_model is m``) configured by ``config``."""
    return next((name for name, module in model.named_modules()
                 if getattr(module, "config", None) is config and getattr(module, "base_model", None) is module),
                None)


def merged_hf_plan(model: nn.Module) -> dict[str, Any]:
    """The model's transformers TP plan with fully qualified keys (style strings, untranslated)."""
    plan: dict[str, Any] = {}
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        declared = getattr(cfg, "base_model_tp_plan", None)
        prefix = _base_model_name(model, cfg) if declared else None
        if prefix is not None:
            plan.update(_prefixed(prefix, declared))
    inner = [(name, module) for name, module in model.named_modules() if name]
    for name, module in sorted(inner, key=lambda item: -item[0].count(".")):  # deepest first: outer plans win
        if isinstance(getattr(module, "_tp_plan", None), Mapping):
            plan.update(_prefixed(name, module._tp_plan))
    for source in (getattr(type(model), "_tp_plan", None), getattr(model, "_tp_plan", None)):
        if isinstance(source, Mapping):
            plan.update(source)
    return plan


def _complete_embeddings(model: nn.Module, plan: dict[str, Any]) -> None:
    """Vocab-parallel untied embedding; a tied pair is sharded together or not at all."""
    embedding, head = embedding_modules(model)
    embed, lm_head = module_name(model, embedding), module_name(model, head)
    if embed is None:
        return
    if not are_tied(embedding, head):
        plan.setdefault(embed, VOCAB_EMBEDDING)
    elif lm_head is not None and (embed in plan) != (lm_head in plan):
        plan.setdefault(embed, VOCAB_EMBEDDING)
        plan.setdefault(lm_head, VOCAB_HEAD)


def translate_hf_plan(model: nn.Module) -> HFPlan:
    """Merge and translate the model's transformers plan (see the module docstring); no errors raised."""
    merged = merged_hf_plan(model)
    if not merged:
        return HFPlan()
    _complete_embeddings(model, merged)
    result = HFPlan()
    for key, style in merged.items():
        if isinstance(style, ParallelStyle):
            result.styles[key] = style
        elif style in REPLICABLE_STYLES:
            result.left_replicated[key] = f"{style} (module left replicated)"
        elif match_parameter_key(model, key):
            result.left_replicated[key] = f"{style} (names a parameter; torch styles shard modules)"
        elif isinstance(style, str) and style in BUILTIN_STYLES:
            result.styles[key] = BUILTIN_STYLES[style]()
        else:
            result.untranslatable[key] = str(style)
    return result


def _checked(model: nn.Module, plan: HFPlan) -> dict[str, ParallelStyle]:
    """The styles, after raising for unsafe gaps and warning (rank 0) about entries left replicated."""
    name = type(model).__qualname__
    if not plan.styles and not plan.untranslatable:
        raise PlanNotFoundError(
            f"Hugging Face TP plan is not supported for {name}: it declares no `_tp_plan` or "
            "`config.base_model_tp_plan`. Pass tp_plan=..., register one with meshplan.register_tp_plan(...), "
            "or run without tensor parallelism."
        )
    if plan.untranslatable:
        listing = ", ".join(f"{key!r}: {style!r}" for key, style in plan.untranslatable.items())
        raise UntranslatableStyleError(
            f"The Hugging Face TP plan of {name} uses styles torch DTensor styles cannot express: {listing}. "
            "Leaving them out could give wrong gradients; register a plan for this class with "
            "meshplan.register_tp_plan(...) or pass tp_plan=..."
        )
    if plan.left_replicated:
        listing = ", ".join(f"{key!r}: {why}" for key, why in plan.left_replicated.items())
        log_rank0(logger, logging.WARNING, "Hugging Face TP plan of %s: %d entries have no torch equivalent and "
                  "stay replicated (correct, but not sharded): %s.", name, len(plan.left_replicated), listing)
    return plan.styles


def hf_tp_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The fallback provider: the translated transformers plan, with a derived sequence-parallel variant for
    standard decoders (:class:`SequenceParallelUnsupportedError` otherwise)."""
    styles = _checked(model, translate_hf_plan(model))
    if not sequence_parallel:
        return styles
    try:
        return add_sequence_parallel(styles, find_decoder_layout(model))
    except PlanError as exc:
        raise SequenceParallelUnsupportedError(
            f"Cannot derive sequence parallel from the Hugging Face TP plan of {type(model).__qualname__}: {exc} "
            "Register a sequence-parallel plan for this class with meshplan.register_tp_plan(...), pass "
            "tp_plan=..., or run without sequence_parallel."
        ) from exc


def get_hf_tp_shard_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """NeMo AutoModel's ``get_hf_tp_shard_plan`` semantics on top of :func:`translate_hf_plan`.

    Same merge and translation (untied embedding missing from the plan -> ``rowwise_rep``, i.e. vocab-parallel;
    tied embeddings kept together), plus NeMo's speed-up: an untied ``lm_head`` declared ``colwise_rep`` (spelled
    ``colwise_gather_output`` by transformers 5.x) keeps
    vocab-sharded logits, ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` (train with
    ``torch.distributed.tensor.parallel.loss_parallel``). No plan -> :class:`PlanNotFoundError`
    (an ``AssertionError``, as in NeMo).
    """
    merged = merged_hf_plan(model)
    styles = _checked(model, translate_hf_plan(model))
    embedding, head = embedding_modules(model)
    lm_head = module_name(model, head)
    gathered = merged.get(lm_head) in ("colwise_rep", "colwise_gather_output")
    if lm_head in styles and gathered and not are_tied(embedding, head):
        styles[lm_head] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return styles


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.modeling_utils.PreTrainedModel", hf_tp_plan)
