"""PP=2 conformance check of one transformers causal-LM model type (used by ``bench/conformance.py --pp``).

* :func:`model_types_with_pp_plan` — causal-LM model types whose config (or a sub-config) declares
  ``base_model_pp_plan``.
* :func:`check_architecture_pp` — runs on every rank of a 2-rank gloo pool: the tiny model of
  :mod:`meshplan.conformance.check` (tied embeddings untied: pipeline stages cannot share a parameter) once unsharded
  (loss and backward on the whole batch) and once as ``meshplan.parallelize(model, pp=2 x dp_shard=1 mesh)`` with
  1F1B over 2 microbatches (``pipe.step``); the loss and every gradient of this rank's stage must match, with the
  TP check's tolerance rule (gradients relative to max(own max |g|, ``GRAD_FLOOR`` x the largest |g|)).
"""

from __future__ import annotations

import copy
import time
import traceback
from typing import Any

import torch

from .check import (
    GRAD_FLOOR,
    RTOL,
    build_model,
    failure_reason,
    make_batch,
    sub_config_classes,
    text_config,
    tiny_config,
)
from .parity import relative_error

PP_SIZE = 2
MICROBATCHES = 2


def pp_plan_declared(model_type: str) -> bool:
    """Whether the config class of ``model_type`` (or a sub-config class) declares ``base_model_pp_plan``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    return any(getattr(c, "base_model_pp_plan", None) for c in [config_class, *sub_config_classes(config_class)])


def model_types_with_pp_plan() -> list[str]:
    """Causal-LM model types (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) that declare a transformers PP plan."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if pp_plan_declared(t)]


def untied_config(model_type: str) -> Any:
    """:func:`tiny_config` with ``tie_word_embeddings=False`` (on the config and its text config)."""
    config = tiny_config(model_type)
    for target in {id(config): config, id(text_config(config)): text_config(config)}.values():
        target.tie_word_embeddings = False
    return config


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_architecture_pp(model_type: str, rtol: float = RTOL) -> dict[str, Any]:
    """Runs on every rank: PP=2 loss and gradient parity of ``model_type`` against the unsharded model. Never raises
    for a model problem: ``status`` is ``"pass"`` or ``"fail"`` with a short ``reason``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    start = time.perf_counter()
    result: dict[str, Any] = {"model_type": model_type, "status": "fail", "reason": ""}
    stage = "config"
    try:
        config = untied_config(model_type)
        stage = "build"
        reference = build_model(config)
        model = copy.deepcopy(reference)
        result["model_class"] = type(model).__name__
        ids, labels = make_batch(config)
        stage = "reference forward/backward"
        ref_loss = reference(input_ids=ids, labels=labels, use_cache=False).loss
        ref_loss.backward()
        stage = "PP split"
        mesh = init_device_mesh("cpu", (PP_SIZE, dist.get_world_size() // PP_SIZE), mesh_dim_names=("pp", "dp_shard"))
        pipe = meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), pp_microbatches=MICROBATCHES)
        stage = "PP step"
        loss = pipe.step(input_ids=ids, labels=labels)
        stage = "compare"
        grads = dict(reference.named_parameters())
        # the TP check's rule: gradients relative to max(own max |g|, GRAD_FLOOR x the model's largest |g|)
        floor = GRAD_FLOOR * max(float(p.grad.abs().max()) for p in grads.values()
                                       if p.grad is not None and p.grad.numel())
        errors = {"loss": relative_error(loss.detach(), ref_loss.detach())}
        for name, param in pipe.named_parameters():
            original = pipe.original_name(name)
            if param.grad is None or grads[original].grad is None:
                errors[original] = 0.0 if param.grad is None and grads[original].grad is None else float("inf")
                continue
            errors[original] = relative_error(_full(param.grad), grads[original].grad, floor)
        worst = max(errors, key=errors.get)
        result["max_error"] = errors[worst]
        result["status"] = "pass" if errors[worst] <= rtol else "fail"
        result["reason"] = "" if result["status"] == "pass" else f"{worst}: relative error {errors[worst]:.2e}"
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["reason"] = failure_reason(stage, exc)
        result["traceback"] = traceback.format_exc(limit=-6)
        result["restart_pool"] = stage == "PP step"  # a failed schedule can leave the other rank mid-collective
    result["stage"] = stage
    result["seconds"] = time.perf_counter() - start
    return result
