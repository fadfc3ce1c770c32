"""Block-quantized FP8 checkpoints (DeepSeek-V3's published format) dequantized on read.

Such a folder stores a 2-D ``X.weight`` in ``float8_e4m3fn`` next to ``X.weight_scale_inv`` (float32), one factor
per block of ``weight_block_size`` (``quantization_config`` in ``config.json``; 128 x 128 for DeepSeek-V3): the value
is ``weight * scale_inv`` of its block. :func:`dequantized_catalog` drops the scale keys from the folder's catalog
(they make no model tensor) and records them; :class:`DequantizingReader` reads a region of such a weight together
with the scales of the blocks it touches and returns the products in float32 (then cast to the parameter's dtype).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..core.errors import CheckpointFileError
from .hf_folder import CONFIG_FILE, SliceReader, StoredTensor

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _block_size(folder: Path, weight: StoredTensor, scale: StoredTensor) -> tuple[int, int]:
    """The config's ``quantization_config.weight_block_size``, else what the two shapes imply."""
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
        if quantization.get("weight_block_size"):
            rows, cols = quantization["weight_block_size"]
            return int(rows), int(cols)
    return math.ceil(weight.shape[0] / scale.shape[0]), math.ceil(weight.shape[1] / scale.shape[1])


def dequantized_catalog(folder: Path, catalog: dict[str, StoredTensor]
                        ) -> tuple[dict[str, StoredTensor], dict[str, tuple[str, tuple[int, int]]]]:
    """The catalog without the scale keys of block-quantized weights (those weights listed as float32), and
    ``{weight key: (scale key, block size)}``. :class:`CheckpointFileError` for scales that do not fit."""
    scales: dict[str, tuple[str, tuple[int, int]]] = {}
    for key, stored in catalog.items():
        weight_key = key.removesuffix(SCALE_SUFFIX)
        weight = catalog.get(weight_key)
        if not key.endswith(SCALE_SUFFIX) or weight is None or weight.dtype not in FP8_DTYPES:
            continue
        block = _block_size(folder, weight, stored)
        expected = tuple(math.ceil(size / step) for size, step in zip(weight.shape, block))
        if len(weight.shape) != 2 or tuple(stored.shape) != expected:
            raise CheckpointFileError(
                f"{folder}: {key!r} has shape {tuple(stored.shape)}, but {weight_key!r} {tuple(weight.shape)} in "
                f"blocks of {block} needs {expected} (only 2-D weights with one scale per block are read).")
        scales[weight_key] = (key, block)
    if not scales:
        return catalog, scales
    dropped = {scale for scale, _ in scales.values()}
    plain = {key: (replace(stored, dtype=torch.float32) if key in scales else stored)
             for key, stored in catalog.items() if key not in dropped}
    return plain, scales


class DequantizingReader(SliceReader):
    """A :class:`SliceReader` that returns block-quantized weights dequantized (float32)."""

    def __init__(self, stored: dict[str, StoredTensor], scales: dict[str, tuple[str, tuple[int, int]]]) -> None:
        super().__init__(stored)  # the folder's own catalog: FP8 weights and their scales
        self.scales = scales

    def read(self, key: str, region: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        if key not in self.scales:
            return super().read(key, region)
        scale_key, (block_rows, block_cols) = self.scales[key]
        shape = self.catalog[key].shape
        (row_start, row_stop), (col_start, col_stop) = region if region is not None else [(0, n) for n in shape]
        weight = super().read(key, [(row_start, row_stop), (col_start, col_stop)])
        first_row, first_col = row_start // block_rows, col_start // block_cols
        scale = super().read(scale_key, [(first_row, -(-row_stop // block_rows)),
                                         (first_col, -(-col_stop // block_cols))])
        scale = scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
        row, col = row_start - first_row * block_rows, col_start - first_col * block_cols
        return weight.to(torch.float32) * scale[row:row + row_stop - row_start, col:col + col_stop - col_start]
