"""Expert-parallel plan entries: transformers' vocabulary folded into :class:`ExpertParallel` styles.

An EP plan names the experts module (``"layers.*.mlp.experts": "ep_dispatch_experts"``) and, as transformers'
``base_model_ep_plan`` does, each of its fused expert parameters (``"layers.*.mlp.experts.gate_up_proj":
"grouped_gemm"``). The parameter entries say which parameters are split by expert; they become the ``params`` of
the module's :class:`ExpertParallel`, so every remaining key names a module and is matched like a TP plan key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import PlanError

#: transformers' style for a fused expert parameter split by expert (dim 0).
GROUPED_GEMM = "grouped_gemm"
#: transformers' style for the experts module whose tokens are exchanged by all-to-all.
DISPATCH_EXPERTS = "ep_dispatch_experts"


def fold_expert_parameters(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with its ``grouped_gemm`` parameter entries moved into their module's ``ep_dispatch_experts``
    entry (an :class:`ExpertParallel` naming those parameters); :class:`PlanError` for a parameter entry whose
    module has no such entry."""
    from .expert_parallel import ExpertParallel

    folded: dict[str, Any] = {}
    params: dict[str, list[str]] = {}
    for key, style in spec.items():
        if style == GROUPED_GEMM and isinstance(key, str) and "." in key:
            owner, _, name = key.rpartition(".")
            params.setdefault(owner, []).append(name)
        else:
            folded[key] = style
    for owner, names in params.items():
        style = folded.get(owner)
        if style == DISPATCH_EXPERTS:
            folded[owner] = ExpertParallel(params=names)
        elif isinstance(style, ExpertParallel):
            folded[owner] = ExpertParallel(params=style.params or names, token_mesh=style.token_mesh)
        else:
            raise PlanError(
                f"EP plan entries {[f'{owner}.{n}' for n in names]} are {GROUPED_GEMM!r} but their module "
                f"{owner!r} has {'no entry' if style is None else repr(style)}; add {owner!r}: "
                f"{DISPATCH_EXPERTS!r} so its tokens reach the experts.")
    return folded
