"""Even FSDP2 shards of expert parameters when there are more data-parallel ranks than experts (fake process
groups, meta device: the layout of every rank is computed from the placements)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import meshplan
from meshplan.core.torch_private import compute_local_shape_and_global_offset as _compute_local_shape_and_global_offset
from meshplan.experts.sharding import even_shard_dim
from meshplan.introspection.experts import expert_parameter_names
from tests.support import tiny_hf

MIXTRAL_8 = dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)


def local_numels(param: DTensor) -> set[int]:
    """The number of elements of ``param`` on every rank of its mesh."""
    shape, mesh_shape = tuple(param.shape), tuple(param.device_mesh.shape)
    return {
        torch.Size(_compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), param.placements)[0]).numel()
        for coord in itertools.product(*map(range, mesh_shape))
    }


def test_even_shard_dim():
    assert even_shard_dim((8, 128, 64), 8) == 0  # the default is already even
    assert even_shard_dim((8, 128, 64), 16) == 1  # more ranks than experts
    assert even_shard_dim((60, 40, 64), 16) == 2  # dim 0 would leave the last rank empty
    assert even_shard_dim((3, 5), 4) == 0  # nothing divides: FSDP2 pads dim 0


@pytest.mark.parametrize("mesh_shape", [{"dp_shard_cp": 16}, {"dp_shard_cp": 16, "tp": 2}])
def test_more_ranks_than_experts_get_even_expert_shards(fake_pg, mesh_shape):
    """Mixtral with 8 experts over 16 data-parallel ranks (and TP=2): every rank holds 1/world of every expert
    parameter. The routers' ``[8, 64]`` weights (not experts) keep dim 0 with 8 empty ranks, and nothing breaks."""
    with torch.device("meta"):
        model = tiny_hf("mixtral", **MIXTRAL_8)
    world = 16 * mesh_shape.get("tp", 1)
    with fake_pg(world):
        mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
        model = meshplan.parallelize(model, mesh)
    params = dict(model.named_parameters())
    experts = expert_parameter_names(model)
    assert len(experts) == 4
    for name in experts:
        assert local_numels(params[name]) == {params[name].numel() // world}, name
        assert params[name].placements[0] != Shard(0), name
    router = params["model.layers.0.mlp.gate.weight"]
    assert router.placements[0] == Shard(0) and local_numels(router) == {64, 0}
