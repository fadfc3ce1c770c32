"""A Hugging Face ``save_pretrained`` folder on disk: where it is, which tensors its safetensors files hold, and
reading index ranges of one tensor without reading the rest.

Reads go through ``safetensors.safe_open(...).get_slice``: the file is memory-mapped and only the pages of the
requested rows are touched. A reader drops its open files after every ``budget`` bytes it has read, so the
mapped pages it touched (which count in the process's resident memory) are released as loading goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointFileError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def resolve_folder(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder as is; else a hub id (``org/name``) resolved from the local Hugging Face cache only (no
    download). :class:`CheckpointFileError` when neither exists."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # imported on use: keeps `import meshplan` light
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise CheckpointFileError(
            f"{str(name_or_path)!r} is no local folder and no model in the local Hugging Face cache "
            f"(HF_HUB_CACHE / HF_HOME); meshplan does not download: fetch it first (`hf download ...`). "
            f"({type(exc).__name__})") from None


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the folder: its file, shape and dtype (read from the file's header)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def _open(file: Path) -> Any:
    from safetensors import SafetensorError, safe_open  # imported on use

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointFileError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _file_names(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointFileError(f"{index} is no valid index (a JSON object with a 'weight_map'): {exc}") from None
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CheckpointFileError(f"{index} names {len(missing)} file(s) that {folder} lacks: {missing[:5]}.")
        return names
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise CheckpointFileError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors folders, as "
                              "save_pretrained writes them, are read).")


def read_catalog(folder: Path) -> dict[str, StoredTensor]:
    """``{key: StoredTensor}`` of every tensor in the folder's safetensors files; only headers are read, and every
    file's size is checked against its header (:class:`CheckpointFileError` for a truncated or corrupt file)."""
    from safetensors import SafetensorError  # imported on use

    catalog: dict[str, StoredTensor] = {}
    for name in _file_names(folder):
        file = folder / name
        try:
            with _open(file) as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    dtype = _torch_dtype(piece.get_dtype(), file, key)
                    catalog[key] = StoredTensor(file, tuple(piece.get_shape()), dtype)
        except SafetensorError as exc:
            raise CheckpointFileError(f"{file} cannot be read (truncated or corrupt?): {exc}") from None
    return catalog


def _torch_dtype(name: str, file: Path, key: str) -> torch.dtype:
    from safetensors.torch import _TYPES  # safetensors' own name -> dtype table

    dtype = _TYPES.get(name)
    if dtype is None:
        raise CheckpointFileError(f"{file}: tensor {key!r} has dtype {name}, which torch cannot hold.")
    return dtype


class SliceReader:
    """Reads index ranges of stored tensors, keeping files open until ``budget`` bytes were read through them."""

    def __init__(self, catalog: dict[str, StoredTensor], budget: int = 64 << 20) -> None:
        self.catalog = catalog
        self.budget = budget
        self.bytes_read = 0
        self._handles: dict[Path, Any] = {}
        self._since_open = 0

    def read(self, key: str, region: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """The tensor ``key`` restricted to ``region`` (``(start, stop)`` per leading dim; ``None``: whole)."""
        stored = self.catalog[key]
        handle = self._handles.get(stored.file)
        if handle is None:
            handle = self._handles[stored.file] = _open(stored.file).__enter__()
        piece = handle.get_slice(key)
        if region is None or not stored.shape:
            tensor = piece[...] if stored.shape else handle.get_tensor(key)
        else:
            tensor = piece[tuple(slice(start, stop) for start, stop in region)]
        self.bytes_read += tensor.nbytes
        self._since_open += tensor.nbytes
        if self._since_open >= self.budget:
            self.close()
        return tensor

    def close(self) -> None:
        """Unmap every open file (the pages read so far leave the process's resident memory)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._since_open = 0
