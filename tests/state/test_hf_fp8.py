"""Quantized folders are dequantized on read, each rank reading only what its own shards need: block-quantized FP8
(DeepSeek-V3's format: the weights and scale blocks of its shards) and MXFP4 (GPT-OSS's: the blocks and scales of
its experts, dequantized by transformers' own conversion)."""

from __future__ import annotations

import pytest
import torch

from meshplan.core.errors import CheckpointFileError
from meshplan.state.hf_folder import StoredTensor
from meshplan.state.hf_fp8 import dequantized_catalog
from meshplan.state.hf_mxfp4 import mxfp4_catalog
from tests.state.hf_checks import fp8_parity, write_fp8_folder, write_mxfp4_folder


@pytest.mark.distributed
def test_fp8_folder_loads_dequantized_under_fsdp_x_tp(ranks4, tmp_path):
    folder = tmp_path / "fp8"
    expected = write_fp8_folder(folder)
    assert sum(1 for tensor in expected.values() if tensor.dim() == 2) > 4
    torch.save(expected, tmp_path / "expected.pt")
    results = ranks4.run(fp8_parity, str(folder), str(tmp_path / "expected.pt"), {"dp_shard": 2, "tp": 2})
    assert results == [[]] * 4


def test_scales_that_do_not_fit_their_weight_are_refused(tmp_path):
    catalog = {"w.weight": StoredTensor(tmp_path / "x", (64, 96), torch.float8_e4m3fn),
               "w.weight_scale_inv": StoredTensor(tmp_path / "x", (2, 2), torch.float32)}
    (tmp_path / "config.json").write_text('{"quantization_config": {"weight_block_size": [32, 32]}}')
    with pytest.raises(CheckpointFileError, match="needs \\(2, 3\\)"):
        dequantized_catalog(tmp_path, catalog)


@pytest.mark.distributed
@pytest.mark.parametrize("shape", [{"dp_shard": 2, "tp": 2}, {"dp_shard": 4}])
def test_mxfp4_folder_loads_dequantized(ranks4, tmp_path, shape):
    folder = tmp_path / "mxfp4"
    expected = write_mxfp4_folder(folder)
    assert sum(1 for key in expected if key.endswith("_proj") and "experts" in key) == 4
    torch.save(expected, tmp_path / "expected.pt")
    results = ranks4.run(fp8_parity, str(folder), str(tmp_path / "expected.pt"), shape)
    assert results == [[]] * 4


def test_mxfp4_pairs_that_do_not_fit_are_refused(tmp_path):
    catalog = {"e.down_proj_blocks": StoredTensor(tmp_path / "x", (4, 64, 2, 16), torch.uint8),
               "e.down_proj_scales": StoredTensor(tmp_path / "x", (4, 64, 3), torch.uint8)}
    with pytest.raises(CheckpointFileError, match="MXFP4 tensors 'e.down_proj_blocks'"):
        mxfp4_catalog(tmp_path, catalog)
