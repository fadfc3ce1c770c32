"""Expert-parallel plan entries: transformers' vocabulary folded into :class:`ExpertParallel` styles.

An EP plan names the experts module (``"layers.*.mlp.experts": "ep_dispatch_experts"``) and, as transformers'
``base_model_ep_plan`` does, each of its fused expert parameters (``"layers.*.mlp.experts.gate_up_proj":
"grouped_gemm"``). The parameter entries say which parameters are split by expert; they become the ``params`` of
the module's :class:`ExpertParallel`, so every remaining key names a module and is matched like a TP plan key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from ..core.errors import ExpertParallelError, PlanError, PlanNotFoundError
from ..introspection.experts import find_expert_modules

if TYPE_CHECKING:
    from ..core.plans import FittedPlan, MatchedPlan, ResolvedPlan

#: transformers' style for a fused expert parameter split by expert (dim 0).
GROUPED_GEMM = "grouped_gemm"
#: transformers' style for the experts module whose tokens are exchanged by all-to-all.
DISPATCH_EXPERTS = "ep_dispatch_experts"


def fold_expert_parameters(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with its ``grouped_gemm`` parameter entries moved into their module's ``ep_dispatch_experts``
    entry (an :class:`ExpertParallel` naming those parameters); :class:`PlanError` for a parameter entry whose
    module has no such entry."""
    from .expert_parallel import ExpertParallel  # loaded on use: keeps start-up light

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


def missing_plan_error(model: nn.Module, ep_size: int,
                       not_found: PlanNotFoundError) -> PlanNotFoundError | ExpertParallelError:
    """The error for a model whose EP plan was found nowhere: :class:`ExpertParallelError` when it has no experts
    at all (``ep_size`` is then the mistake), else ``not_found``."""
    if next(find_expert_modules(model), None) is not None:
        return not_found
    error = ExpertParallelError(f"ep_size={ep_size} asks for expert parallelism, but {type(model).__qualname__} "
                                "has no mixture-of-experts layers; drop ep_size.")
    error.__cause__ = not_found
    return error


def fit_expert_plan(model: nn.Module, plan: MatchedPlan, ep_size: int) -> FittedPlan:
    """The matched EP plan fitted to ``ep_size`` ranks; typed errors before any collective, the same on every rank:
    :class:`ExpertParallelError` for a plan that splits no experts module or an ``ep_size`` that does not divide an
    experts module's expert count."""
    experts = _expert_entries(plan)
    if not experts:
        raise ExpertParallelError(f"ep_size={ep_size}: the EP plan of {type(model).__qualname__} ({plan.source}) "
                                  f"splits no experts module; give an experts module the {DISPATCH_EXPERTS!r} style.")
    for key, fqn in experts:
        plan.styles[key].check(model.get_submodule(fqn), ep_size)
    return plan.fitted("ep", ep_size, replicated_linears=())


def _expert_entries(plan: ResolvedPlan) -> list[tuple[str, str]]:
    """``(key, module name)`` of each module an EP plan splits by expert."""
    from .expert_parallel import ExpertParallel  # loaded on use: keeps start-up light

    return [(key, fqn) for key, style in plan.styles.items() if isinstance(style, ExpertParallel)
            for fqn in plan.matches.get(key, ())]


def expert_modules(plan: ResolvedPlan) -> list[str]:
    """Names of the modules an EP plan splits by expert."""
    return [fqn for _, fqn in _expert_entries(plan)]


def experts_tp_sharded(tp_plan: ResolvedPlan | None, ep_plan: ResolvedPlan) -> bool:
    """Whether the TP plan shards the experts modules of the EP plan (then EP cannot borrow the TP ranks)."""
    if tp_plan is None:
        return False
    from ..tensor_parallel.styles.composition import KeepReplicated  # loaded on use: keeps start-up light

    sharded = {fqn for key, style in tp_plan.styles.items() if not isinstance(style, KeepReplicated)
               for fqn in tp_plan.matches.get(key, ())}
    return any(fqn in sharded for fqn in expert_modules(ep_plan))
