"""Read the layout of a parallelized model: per-parameter shards, FSDP units, per-rank memory.

Everything is read from the model *after* the strategy ran (DTensor placements, ``FSDPModule``
instances), so it reflects what the strategy really did. Two facts come from FSDP2 internals, guarded
so that a torch change degrades them to "unknown" instead of failing: a unit's mixed-precision policy
and whether it reshards after forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..state.fsdp_state import mixed_precision_policy, reshards_after_forward
from .all_ranks import AllRanks

#: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype plus a float32 ``step`` per tensor.
ADAMW_STATES_PER_ELEMENT = 2
ADAMW_STEP_BYTES = 4


@dataclass(frozen=True)
class ParamLayout:
    """One parameter as this rank holds it."""

    name: str
    numel: int  # global elements
    local: int  # elements on this rank
    gathered: int  # elements after the data-parallel all-gather (still TP-sharded)
    shards: int  # distinct pieces the parameter is cut into (product of sharded mesh dims)
    dtype: torch.dtype
    trainable: bool

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize


def param_layouts(model: nn.Module, tp_dims: Iterable[str]) -> list[ParamLayout]:
    """Every (deduplicated) parameter's global size, local size and sharding on this rank."""
    tp_dims = set(tp_dims)
    layouts = []
    for name, param in model.named_parameters():
        local, gathered, shards = param.numel(), param.numel(), 1
        if isinstance(param, DTensor):
            local = param.to_local().numel()
            names = param.device_mesh.mesh_dim_names or ()
            sharded = [(names[i] if i < len(names) else None, param.device_mesh.size(i))
                       for i, placement in enumerate(param.placements) if placement.is_shard()]
            shards = math.prod(size for _, size in sharded)
            gathered = param.numel() // math.prod(size for dim, size in sharded if dim in tp_dims)
        layouts.append(ParamLayout(name, param.numel(), local, gathered, shards, param.dtype,
                                   param.requires_grad))
    return layouts


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def fsdp_units(model: nn.Module, layouts: list[ParamLayout]) -> list[dict[str, Any]]:
    """Every ``FSDPModule`` with the parameters it manages (those not inside a nested unit)."""
    from torch.distributed.fsdp import FSDPModule  # loaded on use: keeps start-up light

    modules = {fqn: module for fqn, module in model.named_modules() if isinstance(module, FSDPModule)}
    owned: dict[str, list[ParamLayout]] = {fqn: [] for fqn in modules}
    for layout in layouts:
        parts = layout.name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = ".".join(parts[:cut])
            if owner in owned:
                owned[owner].append(layout)
                break
    units = []
    for fqn, module in modules.items():
        policy, reshard = mixed_precision_policy(module), reshards_after_forward(module)
        params = owned[fqn]
        storage = params[0].dtype if params else None
        compute = getattr(policy, "param_dtype", None) or storage
        gathered = sum(p.gathered for p in params)
        units.append({
            "module": fqn,
            "class": _original_class(module),
            "parameters": sum(p.numel for p in params),
            "local_elements": sum(p.local for p in params),
            "gathered_elements": gathered,
            "compute_dtype": _dtype_name(compute),
            "reduce_dtype": _dtype_name(getattr(policy, "reduce_dtype", None) or compute),
            "gathered_bytes": gathered * _element_size(compute),
            "reshard_after_forward": reshard,
        })
    return units


def _original_class(module: nn.Module) -> str:
    """``LlamaDecoderLayer`` for FSDP2's dynamic ``FSDPLlamaDecoderLayer`` (or ``Replicate...``) class."""
    for cls in type(module).__mro__[1:]:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(module).__name__


def _element_size(dtype: torch.dtype | None) -> int:
    return 0 if dtype is None else dtype.itemsize


def _dtypes(layouts: Iterable[ParamLayout]) -> str:
    return ", ".join(sorted({_dtype_name(p.dtype) or "?" for p in layouts}))


def state_bytes(layouts: list[ParamLayout], local: Mapping[str, int]) -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state for the given local elements per parameter name."""
    trainable = [p for p in layouts if p.trainable]
    params = sum(local[p.name] * p.element_size for p in layouts)
    grads = sum(local[p.name] * p.element_size for p in trainable)
    adamw = ADAMW_STATES_PER_ELEMENT * grads + ADAMW_STEP_BYTES * len(trainable)
    return {"params": params, "grads": grads, "adamw": adamw, "total": params + grads + adamw}


def memory(layouts: list[ParamLayout], units: list[dict[str, Any]], total_parameters: int,
           spread: AllRanks | None = None, coordinate_of: Callable[[int], dict[str, int]] | None = None,
           everything: list[ParamLayout] | None = None, pp: int = 1) -> dict[str, Any]:
    """Per-rank bytes of parameters, gradients and AdamW state, against the ideal (total / shards).

    ``total_parameters`` is counted before parallelization. ``shards`` is the largest number of pieces
    any parameter is cut into (e.g. ``dp_shard x tp``); replicas (``dp_replicate``) do not divide memory.
    Gradients and AdamW moments have the parameter's storage dtype (FSDP2 reduces in ``reduce_dtype``
    and casts back). The transient part estimates the all-gathered (unsharded) units in compute dtype:
    units kept unsharded after forward, plus twice the largest other unit (current + prefetched); units
    whose parameters are not sharded over the data-parallel dims (replicas) gather nothing.
    ``spread`` (every rank's elements) adds the worst rank: ``max_local``, its rank and its bytes.
    With pipeline parallelism, ``layouts`` are this rank's stages, ``everything`` every parameter of the model (as
    laid out without ``pp``) and ``pp`` divides the ideal as well.
    """
    everything = layouts if everything is None else everything
    trainable = [p for p in everything if p.trainable]
    shards = max((p.shards for p in everything), default=1) * pp
    local = sum(p.local for p in layouts)
    here = state_bytes(layouts, {p.name: p.local for p in layouts})
    whole = state_bytes(everything, {p.name: p.numel for p in everything})
    steps = ADAMW_STEP_BYTES * len(trainable) / pp  # one float32 step per tensor on every rank: not sharded
    unsharded = {"params": 0, "grads": 0, "adamw": steps, "total": steps}
    ideal_bytes = {key: (value - unsharded[key]) / shards + unsharded[key] for key, value in whole.items()}
    worst: dict[str, int] | None = None
    ideal_local = total_parameters / shards
    parameters: dict[str, Any] = {
        "total": total_parameters,
        "local": local,
        "shards": shards,
        "ideal_local": ideal_local,
        "overhead": local / ideal_local - 1 if ideal_local else 0.0,
        "max_local": None, "max_local_rank": None, "max_local_coordinate": None, "max_local_overhead": None,
    }
    if spread is not None:
        rank = spread.max_local_rank
        worst = state_bytes(everything, spread.local_by_name(rank))
        parameters.update(max_local=spread.max_local, max_local_rank=rank,
                          max_local_coordinate=coordinate_of(rank) if coordinate_of else None,
                          max_local_overhead=spread.max_local / ideal_local - 1 if ideal_local else 0.0)
    dtypes = {"params": _dtypes(everything), "grads": _dtypes(trainable), "adamw": _dtypes(trainable), "total": None}
    sharded = [u for u in units if u["gathered_elements"] > u["local_elements"]]  # replicas gather nothing
    kept = [u["gathered_bytes"] for u in sharded if u["reshard_after_forward"] is False]
    others = [u["gathered_bytes"] for u in sharded if u["reshard_after_forward"] is not False]
    return {
        "parameters": parameters,
        "bytes": {key: ({"dtype": dtypes[key]} if dtypes[key] is not None else {})
                  | {"local": here[key], "max_local": None if worst is None else worst[key],
                     "ideal": ideal_bytes[key]}
                  for key in ("params", "grads", "adamw", "total")},
        "transient": {
            "compute_dtype": ", ".join(sorted({u["compute_dtype"] for u in units if u["compute_dtype"]})) or None,
            "largest_unit_bytes": max(others, default=0),
            "kept_unsharded_bytes": sum(kept),
            "peak_estimate_bytes": sum(kept) + 2 * max(others, default=0),
        },
    }
