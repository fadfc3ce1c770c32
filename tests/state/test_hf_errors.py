"""Bad Hugging Face folders: typed errors before anything is loaded, the same on every rank, never a hang;
``strict=False`` loads what matches and reports the rest. Hub ids resolve from the local cache only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import meshplan
from meshplan.core.errors import (
    CheckpointArchitectureError,
    CheckpointError,
    CheckpointFileError,
    CheckpointKeyError,
    CheckpointShapeError,
)
from meshplan.state.hf_folder import resolve_folder
from tests.support import tiny_hf


def _meta(model_type: str = "llama", **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_hf(model_type, **overrides).config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "llama"
    tiny_hf("llama").save_pretrained(folder)  # one model.safetensors
    return folder


def _edited(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``folder`` whose tensors went through ``edit(dict)``."""
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_missing_and_unexpected_keys_are_listed_with_the_closest_names(llama_folder, tmp_path):
    def edit(tensors):
        tensors["model.layers.0.mlp.up_proj.wieght"] = tensors.pop("model.layers.0.mlp.up_proj.weight")

    folder = _edited(llama_folder, tmp_path, edit)
    with pytest.raises(CheckpointKeyError) as info:
        meshplan.load_pretrained(_meta(), folder)
    message = str(info.value)
    assert "missing 1 tensor(s)" in message and "'model.layers.0.mlp.up_proj.weight'" in message
    assert "unexpected" in message and "closest: 'model.layers.0.mlp.up_proj.weight'" in message


def test_strict_false_loads_what_matches_and_reports_the_rest(llama_folder, tmp_path):
    def edit(tensors):
        tensors["extra.weight"] = torch.zeros(2)
        del tensors["model.norm.weight"]

    model = _meta()
    report = meshplan.load_pretrained(model, _edited(llama_folder, tmp_path, edit), strict=False)
    assert report.missing == ["model.norm.weight"] and report.unexpected == ["extra.weight"]
    expected = load_file(llama_folder / "model.safetensors")
    assert torch.equal(model.state_dict()["model.layers.1.self_attn.q_proj.weight"],
                       expected["model.layers.1.self_attn.q_proj.weight"])
    assert not model.state_dict()["model.norm.weight"].is_meta  # initialized by the model's own initializer


def test_shape_not_matching_the_config(llama_folder):
    with pytest.raises(CheckpointShapeError, match=r"intermediate|mlp.*\(128, 64\) in the folder, \(96, 64\)"):
        meshplan.load_pretrained(_meta(intermediate_size=96), llama_folder)


def test_another_architecture(llama_folder):
    with pytest.raises(CheckpointArchitectureError, match="holds a 'llama' model.*'qwen3'"):
        meshplan.load_pretrained(_meta("qwen3"), llama_folder)


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "sharded"
    tiny_hf("llama").save_pretrained(folder, max_shard_size="100KB")
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_index_naming_a_missing_file(sharded_folder, tmp_path):
    folder = _copy(sharded_folder, tmp_path)
    (folder / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointFileError, match="names 1 file.*model-00002-of-00005"):
        meshplan.load_pretrained(_meta(), folder)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_file(sharded_folder, tmp_path, damage):
    folder = _copy(sharded_folder, tmp_path)
    file = folder / "model-00003-of-00005.safetensors"
    if damage == "truncated":
        os.truncate(file, file.stat().st_size - 64)
    else:
        file.write_bytes(b"\xff" * 64 + file.read_bytes()[64:])
    with pytest.raises(CheckpointFileError, match="model-00003-of-00005.safetensors"):
        meshplan.load_pretrained(_meta(), folder)


def _load_on_ranks(folders: list[str]) -> str:
    """Runs on every rank: loads its own folder of ``folders`` into a parallelized meta model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = meshplan.parallelize(_meta(), init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)))
    try:
        meshplan.load_pretrained(model, folders[dist.get_rank()])
    except CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


@pytest.mark.distributed
def test_a_rank_that_fails_stops_every_rank_without_a_hang(ranks2, sharded_folder, tmp_path):
    broken = _copy(sharded_folder, tmp_path)
    os.truncate(broken / "model-00001-of-00005.safetensors", 100)
    results = ranks2.run(_load_on_ranks, [str(sharded_folder), str(broken)])
    assert results[0].startswith("CheckpointError: Another rank could not load")
    assert results[1].startswith("CheckpointFileError:")
    assert ranks2.run(_load_on_ranks, [str(broken), str(broken)]) == [results[1]] * 2  # the same on every rank


def test_hub_id_resolves_from_the_local_cache_only(llama_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in llama_folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_folder("tiny/llama") == snapshot
    report = meshplan.load_pretrained(_meta(), "tiny/llama")
    assert report.missing == [] and report.bytes_read > 0
    with pytest.raises(CheckpointFileError, match="not-cached/model.*local Hugging Face cache"):
        resolve_folder("not-cached/model")
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "llama"
