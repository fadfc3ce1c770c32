"""Checkpoints of parallelized models: torch Distributed Checkpoint (DCP) and full state dicts.

A DCP checkpoint stores every parameter's global shape and each rank's shard under the parameter's plain
name (no FSDP / checkpoint-wrapper prefixes), so it loads under any other mesh or strategy
(TP=2 -> FSDP=2, HSDP -> FSDP, ...), except for parameters that TP stores rank-major (packed ``[gate; up]``
projections, split mixers): their global order depends on the TP size, so the checkpoint records that layout
and loading it under another one raises :class:`~meshplan.core.errors.CheckpointLayoutError` (gather a full state
dict to move such a model to another TP size). :func:`gather_full_state_dict` builds the plain-tensor state dict
that ``save_pretrained`` expects. All functions here are collective: call them on every rank.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..core.errors import CheckpointLayoutError
from ..core.naming import unwrapped_name

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
#: the rank-major parameter layouts of the saved model, as JSON (``{name: [part sizes, TP size, dim]}``)
PACKED_KEY = "meshplan_packed_layout"


def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict of plain tensors, keyed and laid out like the unparallelized model
    (parameters that TP stores rank-major, such as packed ``[gate; up]`` projections, are unpacked).

    ``rank0_only=True`` (default): tensors are gathered one at a time and kept on the CPU of rank 0; the
    other ranks get ``{}`` (what ``save_pretrained`` on rank 0 needs). ``False``: every rank gets every
    tensor on the model's device.
    """
    from ..tensor_parallel.custom_styles import unpack_full_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    full = get_model_state_dict(model, options=options)
    return unpack_full_state_dict(model, full, strict=bool(full))


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
    dcp.save({**_state(model, optimizer), PACKED_KEY: _packed_layout(model)}, checkpoint_id=checkpoint_id)


def load_distributed_checkpoint(
    model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in place, resharding to the current layout.

    The checkpoint may come from a different mesh shape or strategy; only parameter names and global
    shapes must agree, and parameters stored rank-major must have been saved with the same layout
    (:class:`CheckpointLayoutError` otherwise, before any tensor is read). Missing or unexpected keys raise
    (strict loading).
    """
    _check_packed_layout(model, checkpoint_id)
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    if optimizer is None:
        set_model_state_dict(model, state[MODEL_KEY])
    else:
        set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIMIZER_KEY])


def _packed_layout(model: nn.Module) -> str:
    """The model's rank-major parameter layouts as JSON, keyed by state-dict names."""
    from ..tensor_parallel.custom_styles import packed_parameters

    return json.dumps({unwrapped_name(name): [list(sizes), world, dim]
                       for name, (sizes, world, dim) in sorted(packed_parameters(model).items())})


def _check_packed_layout(model: nn.Module, checkpoint_id: str | os.PathLike[str]) -> None:
    """:class:`CheckpointLayoutError` (the same on every rank) unless the checkpoint's rank-major parameters were
    saved in the layout ``model`` has now; a checkpoint written without the record (before meshplan kept it) is
    not checked. Any storage ``dcp.load`` reads (paths, fsspec URLs)."""
    saved: dict[str, Any] = {PACKED_KEY: ""}
    dcp.load(saved, checkpoint_id=checkpoint_id, planner=DefaultLoadPlanner(allow_partial_load=True))
    if not saved[PACKED_KEY]:  # written before the layout was recorded: unknown, not checked
        return
    before, now = json.loads(saved[PACKED_KEY]), json.loads(_packed_layout(model))
    differing = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
    if differing:
        def describe(layout: dict[str, Any], name: str) -> str:
            return f"rank-major for TP={layout[name][1]}" if name in layout else "unpacked"

        shown = "; ".join(f"{name}: saved {describe(before, name)}, {describe(now, name)} here"
                          for name in differing[:3])
        raise CheckpointLayoutError(
            f"{len(differing)} parameter(s) of this checkpoint are stored in another order than this model's "
            f"({shown}{'; ...' if len(differing) > 3 else ''}): their TP size differs. Load it under the TP size it "
            "was saved with, then gather_full_state_dict() and load that full state dict into the new layout.")
