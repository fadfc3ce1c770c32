"""EP=2 conformance check of one transformers causal-LM model type (used by ``bench/conformance.py``).

* :func:`model_types_with_ep_plan` — causal-LM model types whose config (or a sub-config) declares
  ``base_model_ep_plan``.
* :func:`check_architecture_ep` — runs on every rank of a 2-rank gloo pool: the tiny model of
  :mod:`meshplan.conformance.check` once unsharded and once after ``meshplan.prepare(..., ep_size=2).apply()`` with an
  EP-only strategy (the EP plan ``meshplan.parallelize`` resolves and validates: the Hugging Face fallback reads
  ``base_model_ep_plan``). Both ranks hold the same batch and each dispatches half of its tokens to the experts'
  owners, so logits and every gathered gradient must match the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..core.axis_options import ExpertParallelOptions
from ..core.strategy import Strategy
from ..experts.apply import apply_expert_parallel
from .check import RTOL, failure_reason, run_check, sub_config_classes, tiny_config

EP_SIZE = 2
#: Config fields that select the MoE variant of a model type whose default config is dense (set after the tiny
#: config is built; ``{model type: {sub-config name or "": {field: value}}}``).
MOE_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    **{t: {sub: {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}}
       for t, sub in (("gemma4", "text_config"), ("gemma4_text", ""))},
}


def moe_config(model_type: str) -> Any:
    """:func:`tiny_config`, switched to the MoE variant where the default is dense (:data:`MOE_VARIANTS`)."""
    config = tiny_config(model_type)
    for sub, fields in MOE_VARIANTS.get(model_type, {}).items():
        target = getattr(config, sub) if sub else config
        for name, value in fields.items():
            setattr(target, name, value)
    return config


def ep_plan_declared(model_type: str) -> bool:
    """Whether the config class of ``model_type`` (or a sub-config class) declares ``base_model_ep_plan``."""
    config_class = CONFIG_MAPPING[model_type]
    return any(getattr(c, "base_model_ep_plan", None) for c in [config_class, *sub_config_classes(config_class)])


def model_types_with_ep_plan() -> list[str]:
    """Causal-LM model types (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) that declare a transformers EP plan."""
    return [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if ep_plan_declared(t)]


def ep_only_strategy():
    @dataclasses.dataclass
    class ConformanceEPOptions(ExpertParallelOptions):
        ep_size: int = EP_SIZE

    class ConformanceEP(Strategy):
        """Test-only strategy: apply the resolved, validated EP plan and nothing else; every rank holds the same
        batch, so the EP ranks split its tokens (as TP ranks do when EP borrows them)."""

        name = "conformance_ep"
        supports = frozenset({"tp", "ep"})
        options_class = ConformanceEPOptions

        def parallelize(self, model, roles, plans, options, validated):
            meshes = roles.expert_meshes()
            if plans.ep is not None:
                apply_expert_parallel(model, plans.ep, dataclasses.replace(meshes, token_mesh=meshes.ep))
            return model

    return ConformanceEP


def ep_mesh():
    """The 1-D ``("dp_shard",)`` mesh over all ranks, from which EP carves its ranks."""
    return init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))


def check_architecture_ep(model_type: str, rtol: float = RTOL) -> dict[str, Any]:
    """Runs on every rank: EP=2 forward + backward parity of ``model_type`` against the unsharded model
    (:func:`meshplan.conformance.check.run_check` with the EP-only strategy)."""
    try:
        config = moe_config(model_type)
    except Exception as exc:  # noqa: BLE001 - reported in the result
        return {"model_type": model_type, "status": "fail", "reason": failure_reason("config", exc), "stage": "config"}
    return run_check(model_type, config, ep_mesh, ep_only_strategy(), "EP", rtol)
