"""Rank side of the pipeline Hugging Face checkpoint checks: ``meshplan.from_pretrained`` onto a mesh with ``pp``
(each stage loads its own layers), ``meshplan.save_pretrained`` of the ``PipelineModel``, both compared bitwise
with transformers' own ``from_pretrained`` in one process. Only lists of differing names travel back."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.pipeline.harness import _fp32
from tests.support import full


def _differing(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    names = sorted(actual.keys() ^ expected.keys())
    return names + sorted(n for n in actual.keys() & expected.keys() if not torch.equal(actual[n], expected[n]))


def pipeline_hf_round_trip(folder: str, out: str, mesh_shape: dict[str, int], options: dict[str, Any]
                           ) -> dict[str, list[str]]:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    import meshplan

    expected = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    pipe = meshplan.from_pretrained(folder, mesh, **(_fp32() | options))
    loaded = {name: full(t) for name, t in meshplan.gather_full_state_dict(pipe, rank0_only=False).items()}
    meshplan.save_pretrained(pipe, out)
    dist.barrier()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    return {"loaded": _differing(loaded, expected), "saved": _differing(saved, loaded)}
