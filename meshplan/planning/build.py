"""Resolved -> matched -> fitted: the one path a plan of any axis takes before a strategy applies it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core.plans import FittedPlan, MatchedPlan, ResolvedPlan
from ..tensor_parallel.validation import fit_to_tp_size, match_and_check

#: How a matched plan of each axis is fitted to the axis's size.
Fitter = Callable[[nn.Module, MatchedPlan, int], FittedPlan]


def _fit_expert_plan(model: nn.Module, plan: MatchedPlan, ep_size: int) -> FittedPlan:
    from ..experts.plan import fit_expert_plan  # the experts' styles (DTensor): imported when EP is used

    return fit_expert_plan(model, plan, ep_size)


FITTERS: dict[str, Fitter] = {"tp": fit_to_tp_size, "ep": _fit_expert_plan}


def build_plan(model: nn.Module, plan: ResolvedPlan, axis: str, size: int, strict: bool = True) -> FittedPlan:
    """``plan`` (of ``axis``: ``"tp"`` or ``"ep"``) matched to ``model``'s modules and fitted to ``size`` ranks;
    every refusal is a typed error raised before any collective, the same on every rank. ``strict=False`` drops
    keys that match nothing (one warning) instead of refusing them."""
    return FITTERS[axis](model, match_and_check(model, plan, strict=strict, axis=axis.upper()), size)
