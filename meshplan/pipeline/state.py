"""Whole-model state of a :class:`~meshplan.pipeline.model.PipelineModel`: every stage's full state dict under the
original parameter names, collected over the pipeline ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .model import PipelineModel


def gather_pipeline_state_dict(pipe: PipelineModel, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict of the whole model (all stages), keyed like the unparallelized model. Each stage is
    gathered over its own mesh, then the stages' dicts are exchanged over the pipeline ranks (CPU tensors).
    ``rank0_only``: global rank 0 gets the dict, the other ranks ``{}``."""
    from ..state.distributed_checkpoint import gather_full_state_dict

    local: dict[str, torch.Tensor] = {}
    for stage in pipe.stage_modules:
        local.update({k: v.cpu() for k, v in gather_full_state_dict(stage, rank0_only=False).items()})
    parts: list[dict[str, torch.Tensor] | None] = [None] * pipe.pp_mesh.size()
    dist.all_gather_object(parts, local, group=pipe.pp_mesh.get_group())
    if rank0_only and dist.get_rank() != 0:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def pipeline_model_state(pipe: PipelineModel) -> dict[str, torch.Tensor]:
    """This rank's sharded model state for DCP: every stage's state dict under the original names (unique over the
    pipeline ranks, so a checkpoint does not depend on the pipeline layout)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state: dict[str, torch.Tensor] = {}
    for stage in pipe.stage_modules:
        state.update(get_model_state_dict(stage))
    return state


def set_pipeline_model_state(pipe: PipelineModel, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (from :func:`pipeline_model_state`, filled by DCP) into every stage."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    for stage in pipe.stage_modules:
        names = set(stage.state_dict())
        set_model_state_dict(stage, {k: v for k, v in state.items() if k in names})

