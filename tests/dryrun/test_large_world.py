"""The dry run's shortcuts for large worlds (:mod:`meshplan.dryrun.large_world`) give torch's own results, and a
dry run pauses the garbage collector."""

from __future__ import annotations

import contextlib
import gc
import sys

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh

import meshplan
from meshplan.core import torch_private
from meshplan.dryrun import explain, run
from meshplan.dryrun.large_world import LazyChunks, large_world_shortcuts
from meshplan.dryrun.meshspec import build_mesh
from meshplan.dryrun.shared_ranks import share_rank_list

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 251}


@pytest.mark.parametrize(("length", "count"), [(10, 4), (16, 4), (7, 3), (3, 8), (1, 5), (9, 9), (2048, 7)])
@pytest.mark.parametrize("dim", [0, 1])
def test_lazy_chunks_are_fsdps_chunks(length, count, dim):
    """Every chunk (and the empty ones past torch.chunk's last) has the size, stride and offset of FSDP2's own."""
    shape = [length, 6] if dim == 0 else [6, length]
    tensor = torch.empty(shape, device="meta")
    expected = torch_private.resolve("fsdp_chunk_with_empty")(tensor, count, dim)
    lazy = LazyChunks(tensor, count, dim)
    assert len(lazy) == len(expected) == count
    for index in [*range(count), -1, -count]:
        mine, torchs = lazy[index], expected[index]
        assert (mine.shape, mine.stride(), mine.storage_offset(), mine.dtype, mine.device) == \
            (torchs.shape, torchs.stride(), torchs.storage_offset(), torchs.dtype, torchs.device)
    assert [c.shape for c in lazy[1:3]] == [c.shape for c in expected[1:3]]
    with pytest.raises(IndexError):
        lazy[count]


def _meshes(root: DeviceMesh) -> list[DeviceMesh]:
    """Meshes derived from ``root`` the ways FSDP2 and the strategies derive them."""
    return [root, root["tp"], root["dp_replicate", "dp_shard"], root["dp_shard"],
            DeviceMesh._concatenate([root["dp_replicate", "dp_shard"], root["tp"]]),
            DeviceMesh._concatenate([root["dp_shard"], root["tp"]]), root["dp_shard", "tp"]._flatten("dp_tp")]


@pytest.mark.parametrize("rank", [0, 37, 63])
def test_meshes_inside_the_shortcuts_are_torchs(rank):
    """Mesh tensors and coordinates computed once per layout equal torch's, and torch's attributes come back."""
    dims = {"dp_replicate": 2, "dp_shard": 4, "tp": 8}
    originals = {name: torch_private.resolve(name) for name in ("mesh_tensor", "mesh_coordinate")}
    with meshplan.fake_process_group(64, rank=rank):
        plain = build_mesh(dims)
        expected = [(m.mesh.tolist(), m.get_coordinate()) for m in _meshes(plain) for _ in range(2)]
        shared = build_mesh(dims)
        share_rank_list(shared)
        with large_world_shortcuts():
            assert DeviceMesh.mesh is not originals["mesh_tensor"]
            found = [(m.mesh.tolist(), m.get_coordinate()) for m in _meshes(shared) for _ in range(2)]
    assert found == expected
    assert DeviceMesh.mesh is originals["mesh_tensor"]
    assert DeviceMesh._compute_coordinate_on_dim is originals["mesh_coordinate"]


def _without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings_s"}


@pytest.mark.parametrize(("mesh", "rank", "options"), [
    ("dp_shard=7,tp=2", 13, {}),
    ("dp_replicate=2,dp_shard=3,tp=2", 7, {}),
    ("pp=2,dp_shard=2,tp=2", 5, {"pp_microbatches": 2}),
])
def test_explain_reports_the_same_without_the_shortcuts(monkeypatch, mesh, rank, options):
    overrides = TINY | ({"num_hidden_layers": 4} if "pp" in mesh else {})
    fast = explain("llama", mesh, overrides=overrides, options=options, rank=rank)
    monkeypatch.setattr(run, "large_world_shortcuts", contextlib.nullcontext)
    slow = explain("llama", mesh, overrides=overrides, options=options, rank=rank)
    assert _without_timings(fast) == _without_timings(slow)
    assert fast["memory"]["parameters"]["max_local"] is not None


@pytest.mark.parametrize("enabled", [True, False])
def test_explain_runs_without_automatic_collections(enabled):
    """No collection runs inside a dry run (none could free its model), and the collector is left as it was."""
    collections: list[int] = []

    def record(phase: str, info: dict) -> None:
        frame = sys._getframe()
        while frame is not None and frame.f_code is not run._explain_in_world.__code__:
            frame = frame.f_back
        if phase == "start" and frame is not None:  # a collection while the dry run works
            collections.append(info["generation"])

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    gc.callbacks.append(record)
    try:
        explain("llama", "dp_shard=2,tp=2", overrides=TINY)
        assert gc.isenabled() is enabled
    finally:
        gc.callbacks.remove(record)
        (gc.enable if was else gc.disable)()
    assert collections == []

