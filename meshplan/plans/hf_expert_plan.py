"""The Hugging Face fallback's expert-parallel plan: ``config.base_model_ep_plan`` read exactly as the TP plan.

:func:`meshplan.plans.hf_translation.hf_plans`, the provider registered for ``PreTrainedModel``, returns
``{"tp": ..., "ep": ...}``, each computed only when its axis is used. The EP plan is merged like the TP plan
(:func:`~meshplan.plans.hf_translation.merged_hf_plan` with ``axis="ep"``) and translated:

* ``ep_dispatch_experts`` on a module and ``grouped_gemm`` on its parameters become one :class:`ExpertParallel`
  (:func:`meshplan.experts.plan.fold_expert_parameters`);
* keys matching no module or parameter are dropped with a warning (rank 0), as for the TP plan (transformers'
  plans list keys for every variant of an architecture);
* other styles (``colwise`` on a dense MLP, which transformers applies on the EP ranks when they are its TP
  ranks) are left to the TP plan and named in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..core.errors import PlanNotFoundError
from ..core.log import get_logger, log_rank0
from ..experts.plan import DISPATCH_EXPERTS, GROUPED_GEMM, fold_expert_parameters
from ..tensor_parallel.matching import match_key, match_parameter_key

logger = get_logger(__name__)


def hf_ep_plan(model: nn.Module, declared: Mapping[str, Any]) -> dict[str, Any]:
    """The model's transformers EP plan, translated (see the module docstring); ``declared`` is the plan as
    :func:`~meshplan.plans.hf_translation.merged_hf_plan` merged it (``axis="ep"``), which the provider has read
    already to decide whether the model has one."""
    name = type(model).__qualname__
    kept: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for key, style in declared.items():
        if style == GROUPED_GEMM and match_parameter_key(model, key):
            kept[key] = style
        elif style == DISPATCH_EXPERTS and match_key(model, key):
            kept[key] = style
        elif not match_key(model, key) and not match_parameter_key(model, key):
            skipped[key] = f"{style} (matches no module or parameter)"
        else:
            skipped[key] = f"{style} (not an expert-parallel style; the TP plan decides)"
    if DISPATCH_EXPERTS not in kept.values():
        raise PlanNotFoundError(f"The Hugging Face EP plan of {name} has no {DISPATCH_EXPERTS!r} entry that matches "
                                "a module of this model; pass ep_plan=... or register one.")
    if skipped:
        log_rank0(logger, logging.WARNING, "Hugging Face EP plan of %s: %d entries skipped: %s.", name, len(skipped),
                  ", ".join(f"{key!r}: {why}" for key, why in skipped.items()))
    return fold_expert_parameters(kept)
