"""Write a parallelized model as a Hugging Face ``save_pretrained`` folder, never holding the whole model.

The folder is what transformers itself writes (``AutoModelForCausalLM.from_pretrained`` loads it unchanged): hub
key names and per-expert tensors through the reverse of transformers' conversion mapping
(``revert_weight_conversion``), safetensors files split by ``huggingface_hub.split_torch_state_dict_into_shards``
with an index, the config. Tensors go to rank 0 in batches of whole conversion groups (a parameter, or the
parameters one reverse conversion takes together) of about :data:`BATCH_BYTES` (one group at least): each rank sends
its shards of a batch in one message (:class:`~.rank0_gather.Rank0Gatherer`), rank 0 converts the batch and writes
its bytes at their offsets in files whose headers were written first, from the shapes the conversion gives on the
meta device. Memory is bounded by a batch on rank 0 and by the rank's shards of it elsewhere.

The folder is written next to ``path`` under a temporary name and renamed at the end: a failed save leaves a
previous folder at ``path`` as it was.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.log import is_rank_zero
from .hf_conversion import own_class, save_groups, to_hub_format
from .hf_folder import INDEX_FILE
from .hf_load import model_tensors, packed_layouts, raise_on_every_rank
from .rank0_gather import Rank0Gatherer

FILE_PATTERN = "model{suffix}.safetensors"
#: the full-tensor bytes gathered to rank 0 at once (a larger conversion group goes alone)
BATCH_BYTES = 256 * 2**20


def _unique(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tied tensor under its first name only (``save_pretrained`` drops ``lm_head.weight`` when tied)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in tensors.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _batches(groups: list[list[str]], gatherer: Rank0Gatherer) -> list[list[str]]:
    """Consecutive conversion groups joined into batches of about :data:`BATCH_BYTES` of full tensors."""
    batches: list[list[str]] = []
    size = BATCH_BYTES
    for group in groups:
        group_size = sum(gatherer.full_bytes(name) for name in group)
        if size + group_size > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].extend(group)
        size += group_size
    return batches


class _StreamingFile:
    """A safetensors file whose header is written first; tensors are written later, in any order."""

    def __init__(self, file: Path, layout: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import _TYPES  # safetensors' own dtype names

        names = {dtype: name for name, dtype in _TYPES.items()}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for key, tensor in layout.items():
            size = tensor.numel() * tensor.element_size()
            header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                           "data_offsets": [offset, offset + size]}
            self.offsets[key] = offset
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        self.handle: BinaryIO = open(file, "wb")  # noqa: SIM115 - closed in close()
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.handle.truncate(self.data_start + offset)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.handle.seek(self.data_start + self.offsets[key])
        self.handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        self.handle.close()


class _FolderWriter:
    """Rank 0's side: the temporary folder, its file headers, the tensors' bytes, the index and the config."""

    def __init__(self, model: nn.Module, path: Path, layout: dict[str, torch.Tensor], max_shard_size: int | str
                 ) -> None:
        from huggingface_hub import split_torch_state_dict_into_shards  # imported on use

        self.model, self.path = model, path
        self.temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(self.temporary, ignore_errors=True)
        self.temporary.mkdir(parents=True)
        self.split = split_torch_state_dict_into_shards(layout, filename_pattern=FILE_PATTERN,
                                                        max_shard_size=max_shard_size)
        self.files = {name: _StreamingFile(self.temporary / name, {key: layout[key] for key in keys})
                      for name, keys in self.split.filename_to_tensors.items()}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.files[self.split.tensor_to_filename[key]].write(key, tensor)

    def finish(self) -> None:
        for file in self.files.values():
            file.close()
        if self.split.is_sharded:
            index = {"metadata": dict(self.split.metadata), "weight_map": self.split.tensor_to_filename}
            (self.temporary / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self._write_config()
        if self.path.exists():
            previous = self.path.parent / f".{self.path.name}.previous-{os.getpid()}"
            self.path.rename(previous)
            self.temporary.rename(self.path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            self.temporary.rename(self.path)

    def _write_config(self) -> None:
        config = getattr(self.model, "config", None)
        if config is None:
            return
        config = copy.deepcopy(config)
        if hasattr(config, "quantization_config"):  # loaded from a quantized folder: the tensors written are not
            del config.quantization_config
        config.architectures = [own_class(type(self.model)).__name__]  # not FSDP2's or replicate's wrapper class
        dtypes = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        if dtypes:
            config.dtype = dtypes[0]
        config.save_pretrained(self.temporary)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.temporary)

    def abandon(self) -> None:
        for file in self.files.values() if hasattr(self, "files") else ():
            file.close()
        shutil.rmtree(self.temporary, ignore_errors=True)


@torch.no_grad()
def save_pretrained(model: nn.Module, path: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` (parallelized by meshplan, any layout) to the folder ``path`` in the format transformers'
    own ``save_pretrained`` writes: hub keys, ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_size`` each (a single ``model.safetensors`` when it fits) with their index, ``config.json``.

    No rank holds the whole model: rank 0 gathers whole conversion groups, about :data:`BATCH_BYTES` at a time,
    and writes them (a :class:`~meshplan.PipelineModel`: the groups of every stage, from the ranks holding it).
    The folder appears at ``path`` only when complete (a previous one is replaced then).
    Collective: call it on every rank; an error on rank 0 (disk full) is raised on every rank as a
    :class:`~meshplan.core.errors.CheckpointError`.
    """
    path = Path(path)
    stages = list(getattr(model, "stage_modules", None) or [model])  # a PipelineModel: this rank's stages
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for stage in stages:
        tensors.update(_unique(model_tensors(stage)))
        packed.update(packed_layouts(stage))
    gatherer = Rank0Gatherer(tensors, packed)  # every tensor of every rank (all the stages of a pipeline)
    chunks = (gatherer.gather(batch)  # every rank sends its shards; rank 0 gets the full tensors
              for batch in _batches(save_groups(stages[0], gatherer.names), gatherer))
    writer: _FolderWriter | None = None
    error: Exception | None = None
    if is_rank_zero():
        try:
            layout = to_hub_format(stages[0], {name: torch.empty(shape, dtype=dtype, device="meta")
                                               for name, (shape, dtype) in gatherer.meta.items()})
            writer = _FolderWriter(stages[0], path, layout, max_shard_size)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
    for full in chunks:
        if writer is not None and full is not None and error is None:
            try:
                for key, tensor in to_hub_format(stages[0], full).items():
                    writer.write(key, tensor)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        del full
    if writer is not None:
        try:
            if error is None:
                writer.finish()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
        if error is not None:
            writer.abandon()
    if error is not None and not isinstance(error, CheckpointError):
        wrapped = CheckpointError(f"save_pretrained to {path} failed on rank 0 ({type(error).__name__}: {error}); "
                                  "a previous folder there is unchanged.")
        wrapped.__cause__ = error
        error = wrapped
    raise_on_every_rank(error, f"Another rank failed to save {path} (see its error); a previous folder there is "
                               "unchanged.")
