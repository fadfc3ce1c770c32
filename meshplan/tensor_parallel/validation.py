"""Checks that run before any collective and give the same answer on every rank."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from torch import nn

from ..core.errors import TensorParallelSizeError, UnmatchedPlanKeyError
from ..core.log import get_logger, log_rank0
from ..core.plans import FittedPlan, MatchedPlan, ResolvedPlan
from ..introspection.attention import head_attention_modules
from ..introspection.config import model_configs
from .apply import shared_parameters, tied_layout_error
from .matching import match_plan, replicated_linears, suggest_keys, within

logger = get_logger(__name__)


def attention_config(model: nn.Module) -> Any | None:
    """The config that carries the attention head counts: the model's, else its ``text_config``."""
    return next((candidate for candidate in model_configs(model)
                 if getattr(candidate, "is_heterogeneous", False)
                 or getattr(candidate, "num_attention_heads", None) is not None), None)


def head_counts(config: Any) -> set[tuple[int, int]]:
    """The distinct ``(attention heads, key/value heads)`` of ``config``'s layers; a heterogeneous config
    (transformers' ``per_layer_config``, e.g. Dots 3, whose global head count is ambiguous) gives one per kind."""
    layers = config.per_layer_config if getattr(config, "is_heterogeneous", False) else (config,)
    counts = set()
    for layer in layers:
        heads = int(layer.num_attention_heads)
        counts.add((heads, int(getattr(layer, "num_key_value_heads", None) or heads)))
    return counts


def splits_attention(attention: Collection[str], plan: ResolvedPlan) -> bool:
    """Whether ``plan`` shards parameters of one of the ``attention`` modules
    (:func:`~meshplan.introspection.attention.head_attention_modules`) or of a module inside one, i.e. may split
    attention heads; styles that only move activations (sequence parallel's gathers) or keep modules whole do not
    count."""
    from .styles.traits import shards_parameters  # DTensor styles: imported when a plan is used

    return any(within(fqn, attention) for key, found in plan.matches.items()
               if shards_parameters(plan.styles[key]) for fqn in found)


def fits_tp_size(heads: int, kv_heads: int, tp_size: int) -> bool:
    """Whether ``tp_size`` divides the attention heads, and divides the KV heads or is a multiple of them (KV heads
    then replicated: :mod:`meshplan.tensor_parallel.kv_replication`)."""
    return heads % tp_size == 0 and (kv_heads % tp_size == 0 or tp_size % kv_heads == 0)


def validate_tp_size(model: nn.Module, tp_size: int) -> None:
    """Attention heads (of every layer kind) must divide by the TP size, and KV heads must divide by it or divide
    it (fewer KV heads than TP ranks are replicated, when the fitted plan can: :func:`fit_to_tp_size`, which runs
    this check only when its plan splits attention). Skipped without such a config."""
    config = attention_config(model)
    if tp_size <= 1 or config is None:
        return
    counts = head_counts(config)
    for heads, kv_heads in sorted(counts):
        if fits_tp_size(heads, kv_heads, tp_size):
            continue
        label, count, rule = (("num_attention_heads", heads, "") if heads % tp_size else
                              ("num_key_value_heads", kv_heads, ", or divide it (KV heads replicated)"))
        sizes = [d for d in range(1, max(max(pair) for pair in counts) + 1)
                 if all(fits_tp_size(h, kv, d) for h, kv in counts)]
        raise TensorParallelSizeError(
            f"{label} ({count}) must be divisible by TP size ({tp_size}){rule} for {type(model).__qualname__}; "
            f"TP sizes that fit every head count: {sizes}."
        )


def _log_uneven_vocabulary(model: nn.Module, tp_size: int) -> None:
    """One INFO line (rank 0) when vocab-parallel embeddings will be sharded unevenly."""
    vocab = getattr(attention_config(model), "vocab_size", None)
    if vocab and vocab % tp_size:
        log_rank0(logger, logging.INFO, "vocab_size %d is not divisible by TP size %d: vocab-parallel "
                  "embeddings / lm_head are sharded unevenly (the last rank holds fewer rows, DTensor handles "
                  "the uneven shards); results are unaffected. Pad the vocabulary to a multiple of the TP size "
                  "for balanced memory.", vocab, tp_size)


def match_and_check(model: nn.Module, plan: ResolvedPlan, strict: bool = True, axis: str = "TP") -> MatchedPlan:
    """Match every plan key to modules; a key matching nothing is an error (or one warning if not strict).
    ``axis`` names the plan in messages (``"TP"``, ``"EP"``)."""
    matches = match_plan(model, plan.styles)
    unmatched = [key for key, found in matches.items() if not found]
    if unmatched:
        details = "; ".join(
            f"{key!r} (closest modules: {', '.join(suggest_keys(model, key)) or 'none'})" for key in unmatched
        )
        message = (f"{len(unmatched)} {axis} plan key(s) from {plan.source} match no module of "
                   f"{type(model).__qualname__}: {details}.")
        if strict:
            raise UnmatchedPlanKeyError(message + " Fix the keys, or pass strict=False to skip them.")
        log_rank0(logger, logging.WARNING, "%s Skipping them (strict=False).", message)
    styles = {key: style for key, style in plan.styles.items() if matches[key]}
    matches = {k: v for k, v in matches.items() if v}
    check_module_types(model, styles, matches)
    check_tied_parameters(model, styles, matches)
    return MatchedPlan(styles, plan.source, plan.sequence_parallel, matches,
                       _replicated_linears(model, styles, matches))


def _replicated_linears(model: nn.Module, styles: dict, matches: dict[str, list[str]]) -> tuple[str, ...]:
    """The ``nn.Linear`` modules that no parameter-sharding style covers."""
    from .styles.traits import shards_parameters  # DTensor styles: imported when a plan is used

    sharded = (fqn for key, found in matches.items() if shards_parameters(styles[key]) for fqn in found)
    return replicated_linears(model, sharded)


def fit_to_tp_size(model: nn.Module, plan: MatchedPlan, tp_size: int) -> FittedPlan:
    """``plan`` fitted to ``tp_size``, before any collective and the same on every rank.

    When the plan splits attention, the head counts must fit the TP size (:func:`validate_tp_size`; not otherwise:
    DeepSeek-V4's plan splits only its experts, and its single KV head must not forbid that), and an attention block
    whose KV heads are fewer than the TP size gets replicated KV heads
    (:func:`~meshplan.tensor_parallel.kv_replication.replicate_key_value_heads`; refused with
    :class:`TensorParallelSizeError` where it cannot). Every style that can tell in advance (a
    ``check(module, tp_size)`` method, e.g. the experts' style for a TP size that does not divide the expert
    intermediate size) checks each module it matched and raises a typed error. A style that may instead leave a
    module whole (``whole_reason(module, tp_size)``, the fallback's mixer styles) loses that match, with one warning
    per reason, so the report, explain and ``apply`` all see the module replicated. Styles answer through their
    traits (:func:`~meshplan.tensor_parallel.styles.traits.traits_of`).
    """
    from .kv_replication import replicate_key_value_heads  # DTensor styles: imported when a plan is used
    from .styles.traits import traits_of  # DTensor styles: imported when a plan is used

    config = attention_config(model)
    fitted = plan
    if tp_size > 1 and config is not None:
        attention = head_attention_modules(model)
        if splits_attention(attention, plan):
            validate_tp_size(model, tp_size)
            kv_heads = {kv for _, kv in head_counts(config)}
            fitted = replicate_key_value_heads(model, plan, tp_size, attention, kv_heads)
    _log_uneven_vocabulary(model, tp_size)
    matches: dict[str, list[str]] = {}
    whole: dict[str, list[str]] = {}
    for key, style in fitted.styles.items():
        matches[key] = []
        traits = traits_of(style)
        for fqn in fitted.matches.get(key, ()):
            module = model.get_submodule(fqn)
            reason = traits.whole_reason(module, tp_size)
            if reason is not None:
                whole.setdefault(f"{type(module).__name__}: {reason}", []).append(fqn)
                continue
            traits.check(module, tp_size)
            matches[key].append(fqn)
    if not whole and fitted is plan:
        return plan.fitted("tp", tp_size)
    for reason, fqns in whole.items():
        log_rank0(logger, logging.WARNING, "TP=%d leaves %d module(s) replicated (%s): %s.", tp_size, len(fqns),
                  ", ".join(fqns[:3]) + (", ..." if len(fqns) > 3 else ""), reason)
    styles = {key: style for key, style in fitted.styles.items() if matches[key]}
    matches = {key: found for key, found in matches.items() if found}
    return fitted.fitted("tp", tp_size, styles=styles, matches=matches,
                         replicated_linears=_replicated_linears(model, styles, matches))


def check_module_types(model: nn.Module, styles: dict, matches: dict[str, list[str]]) -> None:
    """Refuse, before any collective, a style matched to a module type it cannot shard."""
    from .styles.traits import check_module_type  # DTensor styles: imported when a plan is used

    for key, found in matches.items():
        for fqn in found:
            check_module_type(styles[key], model.get_submodule(fqn), fqn)


def check_tied_parameters(model: nn.Module, styles: dict, matches: dict[str, list[str]]) -> None:
    """Refuse, before any collective, a plan that would lay out tied parameters differently.

    (Layouts that cannot be predicted without applying the style are checked after applying it.)
    """
    from .styles.traits import predicted_placement  # DTensor styles: imported when a plan is used

    style_of = {fqn: styles[key] for key, found in matches.items() for fqn in found}
    for group in shared_parameters(model):
        predicted = {
            f"{fqn}.{name}" if fqn else name: predicted_placement(style_of.get(fqn), model.get_submodule(fqn), name)
            for fqn, name in group
        }
        if None not in predicted.values() and len(set(predicted.values())) > 1:
            raise tied_layout_error(predicted)
