"""A test per private torch API meshplan uses (:mod:`meshplan.core.torch_private`): each fails, not skips, on a
torch release that moved or changed one, so an upgrade shows at once what to adapt."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from meshplan.core import torch_private as tp
from meshplan.core.mesh import submesh


@pytest.mark.parametrize("name", sorted(tp.PRIVATE_APIS))
def test_every_private_api_resolves(name):
    assert tp.resolve(name) is not None


def test_a_missing_api_names_itself_and_the_torch_version(monkeypatch):
    monkeypatch.setitem(tp.PRIVATE_APIS, "gone", "torch.distributed.device_mesh:DeviceMesh._no_such_method")
    expected = rf"DeviceMesh\._no_such_method \(gone\).*torch {re.escape(torch.__version__)}"
    with pytest.raises(tp.TorchPrivateAPIError, match=expected):
        tp.resolve("gone")
    with pytest.raises(AttributeError):
        tp.no_such_api  # noqa: B018


def test_flatten_unflatten_concatenate_and_the_flattened_dim_record(fake_pg):
    with fake_pg(8, rank=5), warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation on the supported path
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("a", "b", "c"))
        flat = tp.flatten(mesh["a", "b"], "ab")
        assert (flat.mesh_dim_names, flat.size()) == (("ab",), 4)
        assert flat.mesh.tolist() == mesh["a", "b"].mesh.flatten().tolist() == [1, 3, 5, 7]
        assert tp.flattened_dim(mesh, "ab") is flat and submesh(mesh, "ab") is flat
        assert tp.flattened_dim(mesh, "zz") is None and submesh(mesh, "zz") is None
        assert tp.flattened_dim(mesh["a", "b"], "ab") is None  # only the root records flattened dims
        split = tp.unflatten(flat, 0, (2, 2), ("x", "y"))
        assert (split.mesh_dim_names, tuple(split.shape)) == (("x", "y"), (2, 2))
        assert split.mesh.tolist() == mesh["a", "b"].mesh.tolist()
        joined = tp.concatenate([mesh["a"], mesh["c"]])
        assert joined.mesh_dim_names == ("a", "c") and joined.mesh.tolist() == mesh["a", "c"].mesh.tolist()
        assert tp.concatenate([mesh["c"], flat]).mesh_dim_names == ("c", "ab")


def test_dim_rank_groups_list_every_process_group_of_each_dim(fake_pg):
    with fake_pg(8):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))
        groups = tp.dim_rank_groups(mesh)
    full = torch.arange(8).reshape(2, 4)
    assert [g.tolist() for g in groups] == [full.T.tolist(), full.tolist()]


def test_strided_shard_placement():
    placement = tp.StridedShard(0, split_factor=2)
    assert (placement.dim, placement.split_factor) == (0, 2)
    assert isinstance(placement, torch.distributed.tensor.placement_types.Placement)


def test_fsdp_state_param_groups_and_mixed_precision(fake_pg):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fully_shard(model[0], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        assert tp.fsdp_state(model[0]) is not None and tp.fsdp_state(nn.Linear(2, 2)) is None
        groups = tp.fsdp_param_groups(model[0])
        assert len(groups) == 1 and groups[0].post_forward_mesh_info is None  # reshard_after_forward=False
        assert tp.fsdp_param_groups(model)[0].post_forward_mesh_info is not None
        assert tp.fsdp_mixed_precision(model[0]) == policy
        assert tp.fsdp_param_groups(nn.Linear(2, 2)) == [] and tp.fsdp_mixed_precision(nn.Linear(2, 2)) is None


def test_checkpoint_wrapper_wraps_a_module_and_keeps_its_output():
    layer = nn.Linear(4, 4)
    wrapped = tp.checkpoint_wrapper(layer)
    assert isinstance(wrapped, tp.CheckpointWrapper) and wrapped._checkpoint_wrapped_module is layer
    x = torch.randn(2, 4)
    torch.testing.assert_close(wrapped(x), layer(x))


def test_replicate_functions_take_the_arguments_ddp_passes():
    ddp = inspect.signature(tp.replicate).parameters  # DDP's keywords (process_group, bucket_cap_mb) pass through
    assert "module" in ddp and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ddp.values())
    assert "mesh" in inspect.signature(tp.replicate_with_fsdp).parameters
    assert tp.DDP_REPLICATE_MODULE == "torch.distributed._composable.replicate"


def test_functional_all_to_all_and_ring_attention_switches():
    parameters = list(inspect.signature(tp.all_to_all_single_autograd).parameters)
    assert parameters[1:4] == ["output_split_sizes", "input_split_sizes", "group"]  # after the tensor
    assert issubclass(tp.AsyncCollectiveTensor, torch.Tensor) and hasattr(tp.AsyncCollectiveTensor, "wait")
    assert isinstance(tp.context_parallel_options.enable_load_balance, bool)
    assert not inspect.signature(tp.enable_context_parallel_dispatcher).parameters


def test_the_fake_process_group_needs_no_store(fake_pg):
    with fake_pg(4096, rank=4095):
        assert (dist.get_world_size(), dist.get_rank(), dist.get_backend()) == (4096, 4095, "fake")
    assert not dist.is_initialized()
    source = inspect.getsource(__import__("meshplan.core.fake_pg", fromlist=["x"]))
    assert "testing._internal" not in source and "FakeStore" not in source


def test_the_test_config_silences_no_torch_warning():
    config = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    filters = config["tool"]["pytest"]["ini_options"].get("filterwarnings", [])
    assert [f for f in filters if f.startswith("ignore")] == []


def test_replaced_swaps_an_api_where_torch_looks_it_up_and_restores_it(monkeypatch):
    from torch.distributed.device_mesh import DeviceMesh

    original = vars(DeviceMesh)["mesh"]
    with pytest.raises(RuntimeError, match="inside"):
        with tp.replaced("mesh_tensor", property(lambda mesh: "stand-in")):
            assert DeviceMesh.mesh.fget(None) == "stand-in"
            raise RuntimeError("inside")
    assert vars(DeviceMesh)["mesh"] is original
    monkeypatch.setitem(tp.PRIVATE_APIS, "gone", "torch.distributed.device_mesh:DeviceMesh._no_such_method")
    with pytest.raises(tp.TorchPrivateAPIError):
        with tp.replaced("gone", None):
            pass


def test_mesh_identity_is_shared_by_meshes_of_one_root(fake_pg):
    with fake_pg(8, rank=3):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp", "tp"))
        layout, rank_map, rank = tp.mesh_identity(mesh["tp"])
        assert tp.mesh_identity(mesh["tp"])[0] == layout and hash(layout) == hash(tp.mesh_identity(mesh["tp"])[0])
        assert tp.mesh_identity(mesh["dp"])[1] is rank_map and rank == 3
        assert tp.mesh_identity(mesh["dp"])[0] != layout
