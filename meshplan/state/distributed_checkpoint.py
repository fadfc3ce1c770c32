"""Checkpoints of parallelized models: torch Distributed Checkpoint (DCP) and full state dicts.

A DCP checkpoint stores every parameter's global shape and each rank's shard under the parameter's plain
name (no FSDP / checkpoint-wrapper prefixes), so it loads under any other mesh or strategy
(TP=2 -> FSDP=2, HSDP -> FSDP, ...). :func:`gather_full_state_dict` builds the plain-tensor state dict that
``save_pretrained`` expects. All functions here are collective: call them on every rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict of plain tensors, keyed like the unparallelized model.

    ``rank0_only=True`` (default): tensors are gathered one at a time and kept on the CPU of rank 0; the
    other ranks get ``{}`` (what ``save_pretrained`` on rank 0 needs). ``False``: every rank gets every
    tensor on the model's device.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=options)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {MODEL_KEY: get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}


def save_distributed_checkpoint(
    model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Save the model's (and optionally the optimizer's) sharded state with DCP under ``checkpoint_id``.

    Each rank writes only its own shards; ``checkpoint_id`` must be a directory all ranks can reach.
    """
    dcp.save(_state(model, optimizer), checkpoint_id=checkpoint_id)


def load_distributed_checkpoint(
    model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in place, resharding to the current layout.

    The checkpoint may come from a different mesh shape or strategy; only parameter names and global
    shapes must agree. Missing or unexpected keys raise (strict loading).
    """
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    if optimizer is None:
        set_model_state_dict(model, state[MODEL_KEY])
    else:
        set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIMIZER_KEY])
