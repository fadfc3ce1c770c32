"""Block-quantized FP8 folders (DeepSeek-V3's format) are dequantized on read, each rank reading only the weights
and scale blocks of its own shards."""

from __future__ import annotations

import pytest
import torch

from meshplan.core.errors import CheckpointFileError
from meshplan.state.hf_folder import StoredTensor
from meshplan.state.hf_fp8 import dequantized_catalog
from tests.state.hf_checks import fp8_parity, write_fp8_folder


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
