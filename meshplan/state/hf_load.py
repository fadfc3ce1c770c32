"""Load a Hugging Face ``save_pretrained`` folder into a parallelized model, every rank reading only its shards.

>>> model = meshplan.from_pretrained("path/or/cached-hub-id", mesh, mp_policy=MixedPrecisionPolicy())
>>> report = meshplan.load_pretrained(model, folder)      # a model parallelize() returned, meta or materialized

How: each parameter's global index ranges on this rank follow from its DTensor placements and mesh (plus the
rank-major layout of packed parameters; :mod:`meshplan.state.shard_regions`), the folder's keys are renamed and
converted by transformers' own conversion mapping (:mod:`meshplan.state.hf_conversion`), and each block is read
with ``safetensors.safe_open(...).get_slice``, cast to the parameter's dtype and copied into the local shard. A
rank's memory is its own shards plus one block being read (a whole source group only for a conversion that cannot
be sliced); rank 0 is no different.

Why safetensors slices and not torch DCP's ``HuggingFaceStorageReader``: DCP's reader loads a state dict whose
keys and shapes are the file's, one file tensor per model tensor. The model's tensors are often *made* of several
stored tensors (Mixtral's fused ``gate_up_proj`` from ``2 x num_experts`` per-expert matrices), and packed
parameters are stored rank-major, an order no DCP placement describes. Slicing lets one rank read rows
``[a, b)`` of exactly the per-expert matrices its shard covers, for any placement, without an intermediate
full-size tensor.

Bad folders raise a :class:`~meshplan.core.errors.CheckpointError` subclass on every rank before any rank
reads a tensor: every rank reads the same headers and decides alike, then one tiny collective makes sure no rank
goes on alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..core.errors import (
    CheckpointArchitectureError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointShapeError,
)
from ..core.log import get_logger, log_rank0
from ..core.naming import closest, unwrapped_name
from .hf_conversion import SourceGroup, plan_sources
from .hf_folder import CONFIG_FILE, StoredTensor, read_catalog, resolve_folder
from .hf_fp8 import dequantized_catalog
from .hf_mxfp4 import MXFP4Reader, mxfp4_catalog
from .shard_regions import blocks, owned_indices

logger = get_logger(__name__)

#: loads that take longer than this (seconds) log their progress on rank 0
PROGRESS_EVERY = 5.0


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: model tensors the folder lacked and folder tensors the model has no place
    for (both empty for a strict load), the bytes this rank read and the seconds it took."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name without wrapper components: tensor}`` (tied tensors under each of their names)."""
    return {unwrapped_name(name): tensor for name, tensor in model.state_dict(keep_vars=True).items()}


def packed_layouts(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int, int]]:
    from .packing import packed_parameters  # the rank-major layouts the TP styles record

    return {unwrapped_name(name): layout for name, layout in packed_parameters(model).items()}


def _ignored(model: nn.Module, attribute: str) -> list[re.Pattern[str]]:
    return [re.compile(pattern) for pattern in getattr(model, attribute, None) or ()]


def _listed(names: list[str], candidates: list[str]) -> str:
    shown = []
    for name in names[:5]:
        hint = closest(name, candidates, n=1)
        shown.append(f"{name!r}" + (f" (closest: {hint[0]!r})" if hint else ""))
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_architecture(model: nn.Module, folder: Path) -> None:
    config_file = folder / CONFIG_FILE
    expected = getattr(getattr(model, "config", None), "model_type", None)
    if expected is None or not config_file.is_file():
        return
    try:
        found = json.loads(config_file.read_text()).get("model_type")
    except ValueError as exc:
        raise CheckpointArchitectureError(f"{config_file} is no valid JSON: {exc}") from None
    if found is not None and found != expected:
        raise CheckpointArchitectureError(
            f"{folder} holds a {found!r} model ({config_file}), but the model loading it is a {expected!r} "
            f"({type(model).__name__}). Load it into a model built from its own config (meshplan.from_pretrained).")


@dataclass
class _Plan:
    stored: dict[str, StoredTensor]  # the folder's tensors as stored
    scales: dict[str, tuple[str, tuple[int, int]]]  # block-quantized FP8 weights: (scale key, block size)
    mxfp4: dict[str, tuple[str, str]]  # MXFP4 expert projections: (blocks key, scales key)
    groups: list[SourceGroup]
    targets: list[str]  # the output keys that fill model tensors (one name per tied tensor)
    missing: list[str]
    unexpected: list[str]


def _plan(model: nn.Module, folder: Path, strict: bool) -> _Plan:
    """Reads headers only; raises a :class:`CheckpointError` for a folder that cannot be loaded."""
    _check_architecture(model, folder)
    stored = read_catalog(folder)
    catalog, scales = dequantized_catalog(folder, stored)
    catalog, mxfp4 = mxfp4_catalog(folder, catalog)
    tensors = model_tensors(model)
    groups, unexpected = plan_sources(model, catalog, set(tensors))
    produced = {name: node for group in groups for name, node in group.outputs.items()}
    unexpected += [name for name in produced if name not in tensors]
    ignore_unexpected = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    unexpected = sorted(key for key in unexpected if not any(p.search(key) for p in ignore_unexpected))

    aliases: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        aliases.setdefault(id(tensor), []).append(name)
    targets: list[str] = []
    missing: list[str] = []
    ignore_missing = _ignored(model, "_keys_to_ignore_on_load_missing")
    for names in aliases.values():
        present = next((name for name in names if name in produced), None)
        if present is not None:
            targets.append(present)
        elif not any(p.search(name) for name in names for p in ignore_missing):
            missing.append(names[0])

    mismatched = [(name, tuple(produced[name].shape), tuple(tensors[name].shape)) for name in targets
                  if tuple(produced[name].shape) != tuple(tensors[name].shape)]
    if mismatched:
        shown = "; ".join(f"{name}: {found} in the folder, {wanted} in the model" for name, found, wanted in
                          mismatched[:3])
        raise CheckpointShapeError(
            f"{len(mismatched)} tensor(s) of {folder} do not match the model's shapes ({shown}"
            f"{'; ...' if len(mismatched) > 3 else ''}): the folder was written for another config.")
    if strict and (missing or unexpected):
        raise _key_error(folder, missing, unexpected, sorted(produced), sorted(tensors))
    return _Plan(stored, scales, mxfp4, groups, targets, missing, unexpected)


def _key_error(folder: Path, missing: list[str], unexpected: list[str], produced: list[str], tensors: list[str]
               ) -> CheckpointKeyError:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) the model needs: {_listed(missing, produced)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {_listed(unexpected, tensors)}")
    return CheckpointKeyError(f"{folder} does not fit the model: {'; '.join(parts)}. Pass strict=False to load "
                              "what matches (the rest keeps its values) and get the lists back.")


def _pipeline_keys(pipe: nn.Module, plans: list[_Plan]) -> tuple[list[str], list[str]]:
    """The whole pipeline's missing and unexpected keys: each stage plans alone (the other stages' tensors are
    unexpected to it), so over the pipeline ranks a key is missing where any stage misses it and unexpected where
    every stage has no place for it. The same lists on every rank (one exchange over the pipeline ranks)."""
    local = ([name for plan in plans for name in plan.missing], [set(plan.unexpected) for plan in plans])
    parts: list[Any] = [None] * pipe.pp_mesh.size()
    dist.all_gather_object(parts, local, group=pipe.pp_mesh.get_group())
    missing = sorted({name for part in parts for name in part[0]})
    unexpected = sorted(set.intersection(*[names for part in parts for names in part[1]]))
    return missing, unexpected


def raise_on_every_rank(error: CheckpointError | None,
                        elsewhere: str = "Another rank could not load the folder (see its error); nothing was loaded."
                        ) -> None:
    """Raise ``error`` on this rank, and a :class:`CheckpointError` saying ``elsewhere`` on every other rank when
    any rank has one (one tiny collective when distributed), so that no rank goes on alone."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and flag.item() > 0:
            raise CheckpointError(elsewhere)
    if error is not None:
        raise error


class _Progress:
    """Rank-0 log lines with bytes and rate, for loads that run longer than :data:`PROGRESS_EVERY` seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()
        self.last = self.start

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if (final and now - self.start > PROGRESS_EVERY) or now - self.last > PROGRESS_EVERY:
            self.last = now
            rate = done / max(now - self.start, 1e-9) / 2**20
            log_rank0(logger, logging.INFO, "load_pretrained: %s%.1f of %.1f MiB read on rank 0 (%.0f MiB/s, %.0f s)",
                      "done, " if final else "", done / 2**20, self.total / 2**20, rate, now - self.start)


def _owned_bytes(targets: dict[str, torch.Tensor]) -> int:
    total = 0
    for tensor in targets.values():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    """Load the ``save_pretrained`` folder ``path`` (or a hub id in the local Hugging Face cache) into ``model``,
    a model :func:`meshplan.parallelize` returned, its parameters on the meta device or materialized.

    Each rank reads only the bytes of its own shards; keys and fused tensors are converted by transformers'
    conversion mapping of the model type; tied tensors may be stored once; values are cast to each parameter's
    dtype. A meta-device model is allocated shard by shard first and its buffers (rotary tables) initialized.
    ``strict=False`` loads what matches and returns (and logs) the rest; strict raises a
    :class:`~meshplan.core.errors.CheckpointError` subclass, on every rank, before any rank reads a tensor.
    A :class:`~meshplan.PipelineModel`: each stage reads only its own layers; missing and unexpected keys are
    the whole model's. Collective: call it on every rank.
    """
    start = time.perf_counter()
    stages = list(getattr(model, "stage_modules", None) or [model])  # a PipelineModel: each stage its own layers
    pipeline = hasattr(model, "stage_modules")
    error: CheckpointError | None = None
    plans: list[_Plan] = []
    folder = None
    try:
        folder = resolve_folder(path)
        plans = [_plan(stage, folder, strict and not pipeline) for stage in stages]
    except CheckpointError as exc:
        error = exc
    raise_on_every_rank(error)
    if pipeline:
        missing, unexpected = _pipeline_keys(model, plans)
        if strict and (missing or unexpected):  # the same lists, so the same error, on every rank
            raise _key_error(folder, missing, unexpected, [], [])
    else:
        missing, unexpected = plans[0].missing, plans[0].unexpected
    if missing or unexpected:
        log_rank0(logger, logging.WARNING, "load_pretrained(strict=False): %d model tensor(s) not in the folder "
                  "(kept as they are) %s; %d folder tensor(s) not loaded %s", len(missing), missing[:5],
                  len(unexpected), unexpected[:5])
    bytes_read = sum(_read(stage, plan) for stage, plan in zip(stages, plans, strict=True))
    return LoadReport(missing, unexpected, bytes_read, time.perf_counter() - start)


def _read(model: nn.Module, plan: _Plan) -> int:
    """Allocate a meta-device ``model`` and copy this rank's shards of ``plan``'s tensors; the bytes read."""
    from .meta_init import allocate, initialize_sharded, model_device  # the meta-init machinery (buffers, streams)

    if any(tensor.is_meta for tensor in model.state_dict(keep_vars=True).values()):
        allocate(model, model_device(model))
        # buffers always; parameters only where the folder leaves some out (the rest is overwritten below)
        initialize_sharded(model, parameters=bool(plan.missing))
    tensors = model_tensors(model)  # after allocation: the materialized tensors
    targets = {name: tensors[name] for name in plan.targets}
    packed = packed_layouts(model)
    progress = _Progress(_owned_bytes(targets))
    reader = MXFP4Reader(plan.stored, plan.scales, plan.mxfp4)
    copied = 0
    try:
        for group in plan.groups:
            for name, node in group.outputs.items():
                tensor = targets.get(name)
                if tensor is None:
                    continue
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                for region, local_slices in blocks(owned_indices(tensor, packed.get(name))):
                    if any(start_ == stop for start_, stop in region):
                        continue
                    target = local[local_slices]
                    target.copy_(node.read(reader, region))
                    copied += target.numel() * target.element_size()
                progress.update(copied)
            group.release()
    finally:
        reader.close()
    progress.update(copied, final=True)
    return reader.bytes_read
