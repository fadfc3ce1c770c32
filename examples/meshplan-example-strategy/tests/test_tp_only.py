"""Test a strategy without a cluster: meshplan's fake process group builds meshes of any size."""

import pytest
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import meshplan
from meshplan.plugins.testing import fake_process_group


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)


def test_tp_only_shards_the_planned_layers():
    with fake_process_group(world_size=8):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))
        model = meshplan.parallelize(Tiny(), mesh, strategy="tp_only", tp_plan={"up": "colwise", "down": "rowwise"})
        assert isinstance(model.up.weight, DTensor) and model.up.weight.to_local().shape == (8, 8)
        assert meshplan.get_report(model)["strategy"] == "tp_only"


def test_tp_only_needs_a_tp_dim():
    with fake_process_group(world_size=2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        with pytest.raises(meshplan.MeshError, match="tp_only needs a mesh dim 'tp'"):
            meshplan.parallelize(Tiny(), mesh, strategy="tp_only")


def test_tp_only_refuses_the_axes_it_does_not_declare():
    with fake_process_group(world_size=4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        with pytest.raises(meshplan.UnsupportedAxisError, match=r"expert parallelism.*it supports \['tp'\]"):
            meshplan.parallelize(Tiny(), mesh, strategy="tp_only", ep_size=2)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
        with pytest.raises(meshplan.UnsupportedAxisError, match="context parallelism"):
            meshplan.parallelize(Tiny(), mesh, strategy="tp_only")
