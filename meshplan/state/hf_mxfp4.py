"""MXFP4 checkpoints (GPT-OSS's published format, ``quantization_config.quant_method == "mxfp4"``) dequantized on
read with transformers' own conversion.

Such a folder stores each quantized expert projection ``X`` of shape ``[experts, in, out]`` as ``X_blocks``
(``uint8 [experts, out, in / 32, 16]``: two FP4 values per byte, 32 per block) and ``X_scales``
(``uint8 [experts, out, in / 32]``: one power-of-two exponent per block, biased by 127). :func:`mxfp4_catalog`
lists ``X`` instead of the two (as float32, the shape the model has) and records the pair; :class:`MXFP4Reader`
reads the blocks and scales of the experts a region covers and dequantizes them with
``transformers.integrations.mxfp4.convert_moe_packed_tensors`` (plain torch, CPU included), the function
transformers' ``Mxfp4Dequantize`` uses: the values equal what ``from_pretrained`` dequantizes, bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..core.errors import CheckpointFileError
from .hf_folder import StoredTensor
from .hf_fp8 import DequantizingReader

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
#: FP4 values per ``_blocks`` byte
VALUES_PER_BYTE = 2


def mxfp4_catalog(folder: Path, catalog: dict[str, StoredTensor]
                  ) -> tuple[dict[str, StoredTensor], dict[str, tuple[str, str]]]:
    """The catalog with every ``X_blocks`` / ``X_scales`` pair replaced by ``X`` (float32, dequantized shape), and
    ``{X: (blocks key, scales key)}``. :class:`CheckpointFileError` for a pair whose shapes do not fit."""
    pairs: dict[str, tuple[str, str]] = {}
    listed: dict[str, StoredTensor] = {}
    for key, blocks in catalog.items():
        name = key.removesuffix(BLOCKS_SUFFIX)
        scales = catalog.get(name + SCALES_SUFFIX)
        if not key.endswith(BLOCKS_SUFFIX) or scales is None:
            continue
        if (len(blocks.shape) != 4 or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8
                or tuple(scales.shape) != tuple(blocks.shape[:-1])):
            raise CheckpointFileError(
                f"{folder}: MXFP4 tensors {key!r} {tuple(blocks.shape)} {blocks.dtype} and {name + SCALES_SUFFIX!r} "
                f"{tuple(scales.shape)} {scales.dtype} do not fit: expected uint8 blocks [experts, out, groups, "
                "bytes] and uint8 scales [experts, out, groups].")
        experts, out, groups, width = blocks.shape
        pairs[name] = (key, name + SCALES_SUFFIX)
        listed[name] = replace(blocks, shape=(experts, groups * width * VALUES_PER_BYTE, out), dtype=torch.float32)
    if not pairs:
        return catalog, pairs
    dropped = {key for pair in pairs.values() for key in pair}
    return {key: stored for key, stored in catalog.items() if key not in dropped} | listed, pairs


class MXFP4Reader(DequantizingReader):
    """A reader that also returns MXFP4 expert projections dequantized (float32), besides block-FP8 weights."""

    def __init__(self, stored: dict[str, StoredTensor], scales: dict[str, tuple[str, tuple[int, int]]],
                 mxfp4: dict[str, tuple[str, str]]) -> None:
        super().__init__(stored, scales)
        self.mxfp4 = mxfp4

    def read(self, key: str, region: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        if key not in self.mxfp4:
            return super().read(key, region)
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # transformers: loaded on use

        blocks_key, scales_key = self.mxfp4[key]
        experts = [region[0]] if region else None
        dequantized = convert_moe_packed_tensors(super().read(blocks_key, experts), super().read(scales_key, experts),
                                                 dtype=torch.float32)
        rest = tuple(slice(start, stop) for start, stop in (region or [])[1:])
        return dequantized[(slice(None), *rest)]
