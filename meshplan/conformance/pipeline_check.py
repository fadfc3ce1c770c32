"""PP=2 conformance check of one transformers causal-LM model type (used by ``bench/conformance.py --pp``).

* :func:`model_types_with_pp_plan` — causal-LM model types whose config (or a sub-config) declares
  ``base_model_pp_plan``.
* :func:`check_architecture_pp` — runs on every rank of a 2-rank gloo pool: the tiny model of
  :mod:`meshplan.conformance.check` (tied embeddings untied: pipeline stages cannot share a parameter) as
  ``meshplan.parallelize(model, pp=2 x dp_shard=1 mesh)`` with 1F1B over 2 microbatches (``pipe.step``). The loss
  and every gradient of this rank's stage must match one process running the same 2 microbatches with gradient
  accumulation, with the TP check's tolerance rule (gradients relative to max(own max |g|, ``GRAD_FLOOR`` x the
  largest |g|)); the error against one process on the whole batch is reported too. The pipeline adds nothing to
  float32 rounding, but splitting the batch does: summing a scalar parameter's gradient over two microbatches
  instead of one batch moves it by up to ~3e-5 relative in some models (Lara's ``A_log``, Inkling's router
  ``global_scale``, DeepSeek-V4's ``hc_scale``) with or without a pipeline, so the microbatched reference is the one
  that isolates what the pipeline does. It must itself stay within :data:`ACCUMULATION_TOLERANCE` of the whole
  batch, which catches a loss normalized per microbatch or a model whose result depends on how the batch is split.
"""

from __future__ import annotations

import copy
import time
import traceback
from typing import Any

import torch

from ..pipeline.model import IGNORE_INDEX
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
#: How far one process accumulating the microbatches' gradients may be from the whole batch (float32 rounding of
#: sums over differently split batches reaches ~3e-5 on scalar parameters; a loss normalized per microbatch, or a
#: model whose result depends on the batch, is far beyond).
ACCUMULATION_TOLERANCE = 1e-3


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


def accumulated_reference(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                          microbatches: int = MICROBATCHES) -> torch.Tensor:
    """One process, the pipeline's microbatches one after the other, gradients accumulated in ``model`` (each
    microbatch's transformers loss summed over its tokens and divided by the batch's scored tokens); returns the
    summed loss. What the pipeline computes, without the pipeline."""
    vocab_size = model.config.get_text_config().vocab_size
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    total = torch.zeros(())
    for chunk_ids, chunk_labels in zip(ids.chunk(microbatches), labels.chunk(microbatches)):
        logits = model(input_ids=chunk_ids, use_cache=False).logits
        loss = model.loss_function(logits=logits, labels=chunk_labels, vocab_size=vocab_size,
                                   num_items_in_batch=count)
        loss.backward()
        total += loss.detach()
    return total


def _errors(loss: torch.Tensor, grads: dict[str, torch.Tensor | None], ref_loss: torch.Tensor,
            reference: torch.nn.Module) -> dict[str, float]:
    """Relative errors of a loss and gradients (by original name) against ``reference``'s, with the TP check's rule:
    gradients relative to max(own max |g|, ``GRAD_FLOOR`` x the reference's largest |g|)."""
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    floor = GRAD_FLOOR * max((float(g.abs().max()) for g in ref_grads.values() if g is not None and g.numel()),
                             default=0.0)
    errors = {"loss": relative_error(loss, ref_loss)}
    for name, grad in grads.items():
        want = ref_grads[name]
        if grad is None or want is None:
            errors[name] = 0.0 if grad is None and want is None else float("inf")
        else:
            errors[name] = relative_error(grad, want, floor)
    return errors


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def check_architecture_pp(model_type: str, rtol: float = RTOL) -> dict[str, Any]:
    """Runs on every rank: PP=2 loss and gradient parity of ``model_type`` against one process running the same
    microbatches (``rtol``), and against one process on the whole batch (reported as ``whole_batch_error``; the
    microbatched reference must itself stay within :data:`ACCUMULATION_TOLERANCE` of it). Never raises for a
    model problem: ``status`` is ``"pass"`` or ``"fail"`` with a short ``reason``."""
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
        whole = build_model(config)
        accumulated = copy.deepcopy(whole)
        model = copy.deepcopy(whole)
        result["model_class"] = type(model).__name__
        ids, labels = make_batch(config)
        stage = "reference forward/backward"
        whole_loss = whole(input_ids=ids, labels=labels, use_cache=False).loss
        whole_loss.backward()
        accumulated_loss = accumulated_reference(accumulated, ids, labels)
        stage = "PP split"
        mesh = init_device_mesh("cpu", (PP_SIZE, dist.get_world_size() // PP_SIZE), mesh_dim_names=("pp", "dp_shard"))
        pipe = meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), pp_microbatches=MICROBATCHES)
        stage = "PP step"
        loss = pipe.step(input_ids=ids, labels=labels).detach()
        stage = "compare"
        grads = {pipe.original_name(name): None if p.grad is None else _full(p.grad)
                 for name, p in pipe.named_parameters()}
        worst, error = _worst(_errors(loss, grads, accumulated_loss, accumulated))
        whole_worst, whole_error = _worst(_errors(loss, grads, whole_loss.detach(), whole))
        accumulated_grads = {name: p.grad for name, p in accumulated.named_parameters()}
        drift_worst, drift = _worst(_errors(accumulated_loss, accumulated_grads, whole_loss.detach(), whole))
        result.update(max_error=error, whole_batch_error=whole_error, whole_batch_worst=whole_worst,
                      accumulation_error=drift)
        if error > rtol:
            result["reason"] = f"{worst}: relative error {error:.2e}"
        elif drift > ACCUMULATION_TOLERANCE:
            result["reason"] = (f"microbatches change the result: one process with {MICROBATCHES} microbatches is "
                                f"{drift:.2e} from the whole batch ({drift_worst})")
        else:
            result["status"] = "pass"
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["reason"] = failure_reason(stage, exc)
        result["traceback"] = traceback.format_exc(limit=-6)
        result["restart_pool"] = stage == "PP step"  # a failed schedule can leave the other rank mid-collective
    result["stage"] = stage
    result["seconds"] = time.perf_counter() - start
    return result
