"""Mesh roles: one resolution for every strategy, every dim larger than 1 covered (fake worlds, no ranks)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import meshplan
from meshplan.core.errors import MeshError
from meshplan.core.roles import resolve_roles
from meshplan.core.torch_private import flatten
from meshplan.strategies.ddp import DDPOptions
from meshplan.strategies.fsdp2 import FSDP2Options
from tests.support import TinyStack, tiny_hf

STACK_PLAN = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def _mesh(**dims: int):
    return init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))


def test_a_tp_dim_under_another_name_is_an_error_naming_it_not_silent_replication(fake_pg):
    """Regression (issue 11, defect 1): ``tensor=2`` used to leave ranks as unsynchronised copies."""
    with fake_pg(4):
        mesh = _mesh(dp_shard=2, tensor=2)
        with pytest.raises(MeshError) as info:
            meshplan.prepare(TinyStack(), mesh, "fsdp2", tp_plan=STACK_PLAN)
        message = str(info.value)
        assert "Mesh dim 'tensor' (size 2) has no role in strategy 'fsdp2'" in message
        assert "tp_mesh_name" in message
        prepared = meshplan.prepare(TinyStack(), mesh, "fsdp2", tp_plan=STACK_PLAN, tp_mesh_name="tensor")
        assert prepared.tp_size == 2 and prepared.roles.dims["tp"] == ("tensor",)


def test_the_same_check_holds_for_every_strategy(fake_pg):
    with fake_pg(4):
        for strategy in ("fsdp2", "ddp"):
            with pytest.raises(MeshError, match=f"Mesh dim 'extra' .* strategy '{strategy}'"):
                meshplan.prepare(TinyStack(), _mesh(dp=2, extra=2), strategy)


def test_fsdp2_roles_shard_over_dp_shard_times_cp_and_report_them(fake_pg):
    with fake_pg(16):
        roles = resolve_roles(_mesh(dp_replicate=2, dp_shard=2, cp=2, tp=2), FSDP2Options().mesh_roles(), "fsdp2")
        assert {r: roles.size(r) for r in ("dp_replicate", "dp_shard", "cp", "tp", "ep")} == {
            "dp_replicate": 2, "dp_shard": 2, "cp": 2, "tp": 2, "ep": 1}
        dp = roles.data_parallel
        assert (dp.replicate_name, dp.shard_name, dp.shard_size, tuple(dp.mesh.shape)) == (
            "dp_replicate", "dp_shard_cp", 4, (2, 4))
        assert roles.describe()["cp"] == {"dims": ["cp"], "size": 2}


def test_a_flattened_dp_shard_cp_may_contain_cp(fake_pg):
    """NeMo's layout: real dims (dp_shard, cp, tp) plus a flattened dp_shard_cp used for sharding."""
    with fake_pg(8):
        mesh = _mesh(dp_shard=2, cp=2, tp=2)
        flatten(mesh["dp_shard", "cp"], "dp_shard_cp")
        roles = resolve_roles(mesh, FSDP2Options().mesh_roles(), "fsdp2")
        assert roles.dims["dp_shard"] == ("dp_shard_cp",) and roles.shard_includes_cp
        assert roles.data_parallel.shard_size == 4


def test_ddp_replicates_over_dp_replicate_and_dp_shard_flattened(fake_pg):
    with fake_pg(8):
        roles = resolve_roles(_mesh(dp_replicate=2, dp_shard=2, tp=2), DDPOptions().mesh_roles(), "ddp")
        assert roles.dims["dp_replicate"] == ("dp_replicate", "dp_shard")
        assert roles.submesh("dp_replicate").size() == 4 and roles.size("tp") == 2


def test_roles_that_would_share_ranks_are_not_both_taken(fake_pg):
    """A flattened ``dp`` spanning the replicate dim is skipped as the shard dim (HSDP stays 2-D)."""
    with fake_pg(8):
        mesh = _mesh(dp_replicate=2, dp_shard=4)
        flatten(mesh["dp_replicate", "dp_shard"], "dp")
        roles = resolve_roles(mesh, FSDP2Options(dp_shard_cp_mesh_name="dp").mesh_roles(), "fsdp2")
        assert roles.dims == {"dp_replicate": ("dp_replicate",), "dp_shard": ("dp_shard",)}


def test_fsdp2_applies_on_the_roles_sub_meshes(fake_pg):
    with torch.device("meta"):  # cp > 1 wraps the attention, so a transformers model (a TinyStack is refused)
        model = tiny_hf("llama")
    with fake_pg(8):
        model = meshplan.parallelize(model, _mesh(dp_shard=2, cp=2, tp=2), "fsdp2")
        weight = model.model.layers[0].mlp.up_proj.weight
        assert isinstance(model, FSDPModule) and isinstance(weight, DTensor)
        assert weight.device_mesh.mesh_dim_names == ("dp_shard_cp", "tp")
        assert meshplan.get_report(model)["roles"]["dp_shard"]["size"] == 2
