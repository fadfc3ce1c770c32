"""Rank-side checks for gradient norms and clipping: a parallelized tiny model against the same model in one
process, every rank on the same batch (data-parallel ranks average identical gradients; CP ranks shard it)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from tests.plans.helpers import build
from tests.support import full_grads, relative_error


def _batch(vocab_size: int = 250) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return {"input_ids": torch.randint(0, vocab_size, (2, 16), generator=generator),
            "labels": torch.randint(0, vocab_size, (2, 16), generator=generator)}


def _parallel_and_reference(name: str, mesh_shape: dict[str, int], options: dict[str, Any],
                            overrides: dict[str, Any] | None = None):
    """``(parallelized model, reference)``, both after one backward on the same batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from meshplan.context_parallel import shard_batch

    reference = build(name, **(overrides or {}))
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), **options)
    batch = _batch()
    reference(**batch).loss.backward()
    shard = shard_batch(batch, mesh["cp"]) if "cp" in mesh_shape else batch
    model(**shard).loss.backward()
    return model, reference


def clip_parity(name: str, mesh_shape: dict[str, int], options: dict[str, Any], norm_type: float = 2.0,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs on every rank: ``meshplan.grad_norm`` and ``meshplan.clip_grad_norm_`` (``max_norm`` = a tenth of the
    norm, so it clips) against ``torch.nn.utils.clip_grad_norm_`` on the one-process model: the relative errors of
    the norms and the worst one of the gathered, clipped gradients."""
    import meshplan

    model, reference = _parallel_and_reference(name, mesh_shape, options, overrides)
    logged = meshplan.grad_norm(model, norm_type)
    unclipped = full_grads(model)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf, norm_type)  # the norm only
    max_norm = 0.1 * float(expected)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
    total = meshplan.clip_grad_norm_(model, max_norm, norm_type)
    grads, ref_grads = full_grads(model), {n: p.grad for n, p in reference.named_parameters()}
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
    errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max(errors, key=errors.get)
    scale = max_norm / (float(expected) + 1e-6)
    return {"norm": abs(float(total) - float(expected)) / float(expected),
            "logged": abs(float(logged) - float(expected)) / float(expected),
            "grad": (errors[worst], worst),
            "unclipped_grad": max(relative_error(unclipped[n], ref_grads[n] / scale) for n in ref_grads),
            "scale": max(relative_error(grads[n], unclipped[n] * scale) for n in grads),
            "clipped": float(meshplan.grad_norm(model, norm_type)) / max_norm}


def nonfinite_refused(name: str, mesh_shape: dict[str, int], options: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank: one rank puts a ``nan`` into its shard of one gradient; every rank must raise
    ``NonFiniteGradNormError`` with ``error_if_nonfinite=True`` and leave the gradients as they were, and without it
    return a ``nan`` norm as torch does."""
    import torch.distributed as dist

    import meshplan
    from meshplan.core.errors import NonFiniteGradNormError

    model, _ = _parallel_and_reference(name, mesh_shape, options)
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    if dist.get_rank() == 1:
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = math.nan
    before = [p.grad.to_local().clone() for p in model.parameters() if p.grad is not None]
    try:
        meshplan.clip_grad_norm_(model, 1.0, error_if_nonfinite=True)
        raised = None
    except NonFiniteGradNormError as exc:
        raised = str(exc)
    after = [p.grad.to_local() for p in model.parameters() if p.grad is not None]
    unchanged = all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
                    for a, b in zip(after, before))
    return {"raised": raised, "unchanged": unchanged,
            "norm": float(meshplan.clip_grad_norm_(model, 1.0, error_if_nonfinite=False))}
