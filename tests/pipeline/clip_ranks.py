"""Rank side of the pipeline gradient-norm checks: ``meshplan.grad_norm`` / ``meshplan.clip_grad_norm_`` of a
``PipelineModel`` after one ``pipe.step`` against torch's clip on the one-process model after one backward."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist

from tests.parity import batches
from tests.pipeline.harness import BATCH, LLAMA4, _fp32
from tests.support import full, relative_error


def _pipeline_grads(pipe) -> dict[str, torch.Tensor]:
    """Every stage's gradients, full and by original name, exchanged over the pipeline ranks."""
    local = {name: full(p.grad) for stage in pipe.stage_modules for name, p in stage.named_parameters()
             if p.grad is not None}
    parts: list[Any] = [None] * pipe.pp_mesh.size()
    dist.all_gather_object(parts, local, group=pipe.pp_mesh.get_group())
    return {name: grad for part in parts for name, grad in part.items()}


def pipeline_clip_parity(mesh_shape: dict[str, int], options: dict[str, Any]) -> dict[str, float]:
    """Runs on every rank (every rank on the whole batch): the relative errors of the logged norm, the returned
    norm and the worst clipped gradient (``max_norm`` a tenth of the norm, so it clips)."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    reference = LLAMA4.build()
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    pipe = meshplan.parallelize(model, mesh, **(_fp32() | options))
    data = batches(reference.config.vocab_size, 1, BATCH)[0]
    pipe.step(input_ids=data, labels=data)
    reference(input_ids=data, labels=data).loss.backward()

    logged = meshplan.grad_norm(pipe)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf)  # the norm only
    max_norm = 0.1 * float(expected)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    total = meshplan.clip_grad_norm_(pipe, max_norm)
    grads = _pipeline_grads(pipe)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    if grads.keys() != ref_grads.keys():
        raise AssertionError(f"parameters with gradients differ: {sorted(grads.keys() ^ ref_grads.keys())}")
    return {"logged": relative_error(logged, expected), "total": relative_error(total, expected),
            "grads": max(relative_error(grads[n], ref_grads[n]) for n in ref_grads)}
