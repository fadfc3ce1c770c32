"""Checkpoints of parallelized models: torch Distributed Checkpoint (DCP) and full state dicts.

A DCP checkpoint stores every parameter (and optimizer state) in the model's own order, under its plain name (no
FSDP / checkpoint-wrapper prefixes), each rank writing the chunks it holds at their global offsets, so it loads
under any other mesh or strategy: another TP, EP or FSDP size, HSDP, with or without CP.

Packed parameters (:mod:`meshplan.state.packing`: ``[gate; up]`` experts, ``[q; k; v]``, split Mamba mixers) hold,
on each rank, slices that are not one contiguous block of the model-order tensor: as a ``_StridedShard`` DTensor
(equal parts), whose one-chunk description DCP's planner refuses ("overlapping chunks", torch 2.13), or rank-major
(unequal parts). They are written as several chunks: the rank's local tensor is cut into the blocks whose
model-order indices (:func:`~meshplan.state.shard_regions.owned_indices`, from the placements and the recorded
rank-major layout) are contiguous, each given to DCP at its model-order offset (torch's ``LocalShardsWrapper``
inside a DTensor of the parameter's global shape, the multi-chunk form DCP reads and writes natively); loading
reads each piece from wherever the saving ranks put it, for parts of any sizes and any FSDP2 sharding on top.

Checkpoints written before (meshplan <= the layout record) stored packed parameters rank-major and record that
layout (``PACKED_KEY``); they are read through the same chunk views, from the recorded layout's positions. New
checkpoints record an empty layout: nothing is stored rank-major. :func:`gather_full_state_dict` builds the
plain-tensor state dict that ``save_pretrained`` expects. All functions here are collective: call them on every
rank.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
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
from torch.distributed.tensor import DTensor

from ..core.errors import CheckpointLayoutError
from .hf_load import model_tensors, packed_layouts
from .packing import (
    PackedLayout,
    as_rank_major,
    packed_state_keys,
    stored_positions,
    strided_packed_dim,
    unpack_full_state_dict,
    unpack_rank_major,
)
from .pipeline_state import pipeline_model_state, pipeline_state, set_pipeline_model_state, set_pipeline_state
from .rank0_gather import Rank0Gatherer
from .shard_regions import blocks, owned_indices

MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
#: the parameters the checkpoint stores rank-major, as JSON ``{name: [part sizes, TP size, dim]}``: empty since
#: meshplan stores the model's order; checkpoints written before list their packed parameters
PACKED_KEY = "meshplan_packed_layout"


def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict of plain tensors, keyed and laid out like the unparallelized model
    (parameters that TP stores rank-major, such as packed ``[gate; up]`` projections, are unpacked).

    ``rank0_only=True`` (default): tensors are gathered one at a time and kept on the CPU of rank 0; the
    other ranks get ``{}`` (what ``save_pretrained`` on rank 0 needs). ``False``: every rank gets every
    tensor on the model's device.
    """
    if hasattr(model, "stage_modules"):  # a PipelineModel: its stages, gathered over the pipeline ranks
        return gather_pipeline_state_dict(model, rank0_only)
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    full = get_model_state_dict(model, options=options)
    return unpack_full_state_dict(model, full, strict=bool(full))


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if hasattr(model, "stage_modules"):  # a PipelineModel: its stages' states under the original names
        if optimizer is None:
            return {MODEL_KEY: pipeline_model_state(model)}
        model_state, optimizer_state = pipeline_state(model, optimizer)
        return {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
    if optimizer is None:
        return {MODEL_KEY: get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}


def save_distributed_checkpoint(
    model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Save the model's (and optionally the optimizer's) sharded state with DCP under ``checkpoint_id``, in the
    model's order (rank-major packed parameters included).

    Each rank writes only its own shards; ``checkpoint_id`` must be a directory all ranks can reach.
    """
    state = _state(model, optimizer)
    dcp.save({**_checkpoint_views(state, packed_state_keys(model), {}), PACKED_KEY: json.dumps({})},
             checkpoint_id=checkpoint_id)


def load_distributed_checkpoint(
    model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in place, resharding to the current layout.

    The checkpoint may come from any other mesh shape or strategy (TP, EP, FSDP sizes, HSDP, CP); only parameter
    names and global shapes must agree. Checkpoints of earlier meshplan versions, which stored packed parameters
    rank-major, load too (:class:`CheckpointLayoutError` when their recorded layout does not fit this model, before
    any tensor is read). Missing or unexpected keys raise (strict loading).
    """
    now = packed_state_keys(model)
    state = _state(model, optimizer)
    stored = _stored_layout(checkpoint_id, state[MODEL_KEY], now, as_rank_major(model))
    dcp.load(_checkpoint_views(state, now, stored), checkpoint_id=checkpoint_id)
    _unpack_plain_tensors(state, now, stored)
    if hasattr(model, "stage_modules"):
        if optimizer is None:
            set_pipeline_model_state(model, state[MODEL_KEY])
        else:
            set_pipeline_state(model, optimizer, state[MODEL_KEY], state[OPTIMIZER_KEY])
    elif optimizer is None:
        set_model_state_dict(model, state[MODEL_KEY])
    else:
        set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIMIZER_KEY])


# --- packed parameters in a checkpoint ----------------------------------------------------------------------
def _packed_tensors(state: dict[str, Any], names: set[str] | None = None) -> list[tuple[dict[str, Any], str, str]]:
    """``(container, key, parameter name)`` of each tensor of ``state`` laid out like one of the parameters
    ``names`` (default: every parameter): the parameter itself and its per-parameter optimizer state of the same
    shape (AdamW's moments)."""
    model_state = state[MODEL_KEY]
    names = set(model_state) if names is None else names
    found = [(model_state, name, name) for name in sorted(names) if name in model_state]
    per_param = state.get(OPTIMIZER_KEY, {}).get("state", {})
    for name in sorted(names & per_param.keys() & model_state.keys()):
        found += [(per_param[name], key, name) for key, value in sorted(per_param[name].items())
                  if isinstance(value, torch.Tensor) and value.shape == model_state[name].shape]
    return found


def _checkpoint_views(state: dict[str, Any], now: dict[str, PackedLayout], stored: dict[str, PackedLayout]
                      ) -> dict[str, Any]:
    """A copy of ``state`` in which every DTensor of a parameter that is stored (``stored``) or held (``now``) in
    another order than the model's, or held as a ``_StridedShard`` (whose shard DCP cannot place), is replaced by
    :func:`_chunk_view`; the views share the tensors' memory."""
    views = {key: dict(value) for key, value in state.items()}
    if OPTIMIZER_KEY in views:
        per_param = {name: dict(entries) for name, entries in views[OPTIMIZER_KEY].get("state", {}).items()}
        views[OPTIMIZER_KEY]["state"] = per_param
    for container, key, name in _packed_tensors(views):
        value = container[key]
        if isinstance(value, DTensor) and (now.get(name) != stored.get(name) or strided_packed_dim(value) is not None):
            container[key] = _chunk_view(value, now.get(name), stored.get(name))
    return views


def _chunk_view(tensor: DTensor, held: PackedLayout | None, stored: PackedLayout | None) -> DTensor:
    """``tensor`` (local tensor in the rank-major layout ``held``, or described by its placements) as a DTensor
    whose chunks are the blocks of its local tensor that the checkpoint stores contiguously (in the rank-major
    layout ``stored``, or in model order), each at its offset there."""
    from ..core.torch_private import LocalShardsWrapper  # DCP's multi-chunk local tensor

    indices = owned_indices(tensor, held)
    if stored is not None:
        indices[stored[2]] = stored_positions(stored, indices[stored[2]])
    found = list(blocks(indices))
    if not found or any(len(index) == 0 for index in indices):  # this rank holds nothing of the tensor
        return tensor
    with torch.no_grad():
        local = tensor.to_local()
    pieces = [local[local_slices] for _, local_slices in found]
    offsets = [tuple(start for start, _ in region) for region, _ in found]
    # the constructor, not from_local (which views the local tensor: LocalShardsWrapper has no view for ndim > 2)
    return DTensor(LocalShardsWrapper(pieces, offsets), tensor._spec, requires_grad=False)


def _unpack_plain_tensors(state: dict[str, Any], now: dict[str, PackedLayout], stored: dict[str, PackedLayout]
                          ) -> None:
    """Plain (unsharded: DDP, one process) tensors loaded from a checkpoint that stores them rank-major, put back
    in model order in place."""
    for container, key, name in _packed_tensors(state, stored.keys() - now.keys()):
        value = container[key]
        if not isinstance(value, DTensor):
            sizes, world, dim = stored[name]
            with torch.no_grad():
                value.copy_(unpack_rank_major(value.clone(), sizes, world, dim))


def _stored_layout(checkpoint_id: str | os.PathLike[str], model_state: dict[str, Any], now: dict[str, PackedLayout],
                   unrecorded: dict[str, PackedLayout]) -> dict[str, PackedLayout]:
    """The rank-major layouts the checkpoint stores its packed parameters in (empty for checkpoints in model
    order). A checkpoint without a record (written before meshplan kept one, when every packed parameter was
    rank-major) is taken to be in ``unrecorded``'s layout, as it was then loaded. :class:`CheckpointLayoutError`
    (the same on every rank) for a recorded layout that does not fit the parameters of ``model_state``. Any
    storage ``dcp.load`` reads (paths, fsspec URLs)."""
    saved: dict[str, Any] = {PACKED_KEY: ""}
    dcp.load(saved, checkpoint_id=checkpoint_id, planner=DefaultLoadPlanner(allow_partial_load=True))
    if not saved[PACKED_KEY]:
        return unrecorded
    stored = {name: (tuple(sizes), world, dim) for name, (sizes, world, dim) in json.loads(saved[PACKED_KEY]).items()}
    shapes = {name: tuple(tensor.shape) for name, tensor in model_state.items()}
    unfit = [name for name, (sizes, world, dim) in stored.items()
             if name not in shapes or dim >= len(shapes[name]) or sum(sizes) != shapes[name][dim]
             or any(size % world for size in sizes) or now.get(name, stored[name])[2] != dim]
    if unfit:
        raise CheckpointLayoutError(
            f"The checkpoint records {len(unfit)} parameter(s) stored rank-major in a layout that does not fit this "
            f"model ({', '.join(unfit[:3])}{', ...' if len(unfit) > 3 else ''}: missing, packed along another dim, or "
            "part sizes that do not add up to the parameter's dim): it was saved from another architecture or "
            "configuration.")
    return stored


def gather_pipeline_state_dict(pipe: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict of the whole model (all stages), keyed like the unparallelized model, on the CPU: every
    rank sends its shards of its stages to rank 0 (:class:`~.rank0_gather.Rank0Gatherer`, as ``save_pretrained``
    does). ``rank0_only``: global rank 0 gets the dict, the other ranks ``{}``; else rank 0 broadcasts it."""
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedLayout] = {}
    for stage in pipe.stage_modules:
        tensors.update(model_tensors(stage))
        packed.update(packed_layouts(stage))
    gatherer = Rank0Gatherer(tensors, packed)
    full = gatherer.gather(gatherer.names) or {}
    if not rank0_only:
        shipped = [full]
        dist.broadcast_object_list(shipped, src=0)
        full = shipped[0]
    return full
