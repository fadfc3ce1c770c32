"""Distributed-checkpoint state of a :class:`~meshplan.pipeline.model.PipelineModel` (any module with
``stage_modules``, ``stage_indices``, ``pp_mesh`` and ``original_name``): every stage's state under the original
parameter names, so a checkpoint does not depend on the pipeline layout. :mod:`.distributed_checkpoint` calls it."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


def pipeline_model_state(pipe: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's sharded model state for DCP: every stage's state dict under the original names (unique over the
    pipeline ranks, so a checkpoint does not depend on the pipeline layout)."""
    state: dict[str, torch.Tensor] = {}
    for stage in pipe.stage_modules:
        state.update(get_model_state_dict(stage))
    return state


def set_pipeline_model_state(pipe: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (from :func:`pipeline_model_state`, filled by DCP) into every stage."""
    for stage in pipe.stage_modules:
        names = set(stage.state_dict())
        set_model_state_dict(stage, {k: v for k, v in state.items() if k in names})


def pipeline_state(pipe: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's sharded model and optimizer state for DCP under the original names, laid out as a one-process
    model's: every parameter group lists the parameters of all stages (exchanged over the pipeline ranks, in the
    stages' order), so the checkpoint does not depend on the pipeline layout and loads into a plain model too."""
    model_state, optimizer_state = get_state_dict(pipe, optimizer)
    stage_of = {f"stages.{i}.": index for i, index in enumerate(pipe.stage_indices)}
    groups = []
    for group in optimizer_state["param_groups"]:
        stages = [stage_of[next(p for p in stage_of if fqn.startswith(p))] for fqn in group["params"]]
        groups.append(list(zip(stages, range(len(stages)), map(pipe.original_name, group["params"]), strict=True)))
    parts: list[Any] = [None] * pipe.pp_mesh.size()
    dist.all_gather_object(parts, groups, group=pipe.pp_mesh.get_group())
    param_groups = [{**group, "params": [name for _, _, name in sorted(entry for part in parts for entry in part[g])]}
                    for g, group in enumerate(optimizer_state["param_groups"])]
    state = {pipe.original_name(fqn): value for fqn, value in optimizer_state["state"].items()}
    return ({pipe.original_name(k): v for k, v in model_state.items()},
            {"state": state, "param_groups": param_groups})


def set_pipeline_state(pipe: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                       optimizer_state: dict[str, Any]) -> None:
    """Load ``model_state`` and ``optimizer_state`` (from :func:`pipeline_state`, filled by DCP) into this rank's
    stages and ``optimizer``: each parameter group keeps this rank's own parameters."""
    names = {pipe.original_name(fqn): fqn for fqn, _ in pipe.named_parameters()}
    names.update({pipe.original_name(fqn): fqn for fqn in pipe.state_dict()})
    own = {"state": {names[k]: v for k, v in optimizer_state["state"].items() if k in names},
           "param_groups": [{**group, "params": [names[p] for p in group["params"] if p in names]}
                            for group in optimizer_state["param_groups"]]}
    set_state_dict(pipe, optimizer, model_state_dict={names[k]: v for k, v in model_state.items() if k in names},
                   optim_state_dict=own)
