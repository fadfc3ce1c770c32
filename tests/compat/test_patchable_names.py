"""The module names NeMo code patches exist in ``meshplan.parallelizer`` and are what its functions call."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel

import meshplan.parallelizer
from meshplan import parallelizer as P
from meshplan.compat import nemo_parallelizer
from meshplan.compat.nvfsdp import MegatronFSDPShim
from meshplan.core.errors import MeshError, StrategyUnavailableError, UnmatchedPlanKeyError
from meshplan.strategies.megatron_fsdp import MegatronFSDPStrategy
from tests.compat.fakes import FakeMesh, UnitDouble
from tests.support import TinyStack


def test_the_alias_is_the_module_object():
    assert meshplan.parallelizer is nemo_parallelizer is sys.modules["meshplan.parallelizer"]
    for name in ("fully_shard", "FSDPModule", "parallelize_module", "checkpoint_wrapper", "HAVE_NVFSDP",
                 "nvfsdp_fully_shard", "import_class_from_path", "import_classes_from_paths",
                 "get_hf_tp_shard_plan", "PARALLELIZE_FUNCTIONS"):
        assert hasattr(P, name), name


def test_fully_shard_is_looked_up_at_call_time_and_offload_policy_passes_through(monkeypatch):
    calls = []
    monkeypatch.setattr(P, "fully_shard", lambda module, **kwargs: calls.append((module, kwargs)))
    model, policy = TinyStack(depth=3), MixedPrecisionPolicy()
    P.apply_fsdp2_sharding_recursively(model, mesh="mesh", mp_policy=policy)
    assert [module for module, _ in calls] == list(model.layers)
    assert [kw["reshard_after_forward"] for _, kw in calls] == [True, True, False]
    assert all(kw["offload_policy"] is None and kw["mp_policy"] is policy and kw["mesh"] == "mesh"
               for _, kw in calls)


def test_fsdp_module_is_looked_up_at_call_time_and_units_reshard_after_an_error(monkeypatch):
    log: list[str] = []
    units = [UnitDouble(log, "root"), UnitDouble(log, "block")]

    class Model:
        def modules(self):
            return [units[0], nn.Linear(2, 2), units[1]]

    monkeypatch.setattr(P, "FSDPModule", UnitDouble)
    with pytest.raises(KeyError), P.unshard_fsdp2_model(Model()):
        log.append("body")
        raise KeyError("body failed")
    assert log == ["unshard root", "unshard block", "body", "reshard block", "reshard root"]


# --- nvfsdp_strategy_parallelize: the reference's steps over patchable names ------------------------------
@pytest.fixture
def nvfsdp_calls(monkeypatch):
    calls = {"tp": [], "shard": []}
    monkeypatch.setattr(P, "HAVE_NVFSDP", True)
    monkeypatch.setattr(P, "parallelize_module", lambda *args: calls["tp"].append(args))

    def fake_shard(**kwargs):
        calls["shard"].append(kwargs)
        return "wrapped", kwargs["optimizer"]

    monkeypatch.setattr(P, "nvfsdp_fully_shard", fake_shard)
    return calls


def test_nvfsdp_steps_use_the_patched_names(nvfsdp_calls):
    mesh, model, plan = FakeMesh(data=2, ctx=2, tensor=2), TinyStack(), {"layers.*.up": ColwiseParallel()}
    result = P.nvfsdp_strategy_parallelize(model, mesh, optimizer="opt", tp_shard_plan=plan, dp_mesh_name="data",
                                           cp_mesh_name="ctx", tp_mesh_name="tensor")
    assert result == ("wrapped", "opt")
    assert nvfsdp_calls["tp"] == [(model, mesh["tensor"], plan)]
    (kwargs,) = nvfsdp_calls["shard"]
    assert (kwargs["dp_mesh_name"], kwargs["cp_mesh_name"], kwargs["tp_mesh_name"]) == ("data", "ctx", "tensor")
    assert kwargs["dp_cp_mesh_name"] == "dp_cp" and kwargs["module"] is model and kwargs["device_mesh"] is mesh


def test_nvfsdp_without_tp_or_cp_skips_tensor_parallelism(nvfsdp_calls):
    P.nvfsdp_strategy_parallelize(TinyStack(), FakeMesh(dp=4, cp=1, tp=1), nvfsdp_unit_modules=["tests.support.Block"])
    assert nvfsdp_calls["tp"] == []
    (kwargs,) = nvfsdp_calls["shard"]
    assert kwargs["dp_cp_mesh_name"] == "dp" and [c.__name__ for c in kwargs["fsdp_unit_modules"]] == ["Block"]


def test_nvfsdp_errors(nvfsdp_calls, monkeypatch):
    with pytest.raises(MeshError, match="no dimension 'cp'"):
        P.nvfsdp_strategy_parallelize(TinyStack(), FakeMesh(dp=2, tp=1))
    monkeypatch.setattr(P, "HAVE_NVFSDP", False)
    with pytest.raises(AssertionError, match="nvFSDP is not installed") as info:
        P.nvfsdp_strategy_parallelize(TinyStack(), FakeMesh(dp=2, cp=1, tp=1))
    assert isinstance(info.value, StrategyUnavailableError) and nvfsdp_calls["shard"] == []


def test_the_default_nvfsdp_fully_shard_maps_the_legacy_call_onto_megatron_fsdp(fake_pg):
    shim = MegatronFSDPShim(MegatronFSDPStrategy(device_types=("cpu",)))  # build the call only: no CUDA needed
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("dp", "cp", "tp"))
        call, _, _ = shim.prepare(
            TinyStack(), device_mesh=mesh, fsdp_unit_modules=None, dp_mesh_name="dp", cp_mesh_name="cp",
            tp_mesh_name="tp", dp_cp_mesh_name="dp_cp", init_model_with_meta_device=False,
            data_parallel_sharding_strategy="optim_grads", sync_grads_each_step=False, nccl_ub=False)
    assert call.function == "fully_shard_model"
    assert call.kwargs["zero_dp_strategy"] == "optim_grads" and call.kwargs["sync_model_each_microbatch"] is False
    assert call.kwargs["init_model_with_meta_device"] is False and call.kwargs["dp_shard_dim"] == "dp_cp"
    assert [c.__name__ for c in call.kwargs["fsdp_unit_modules"]] == ["Block"]
    with pytest.raises(StrategyUnavailableError, match="CUDA"):
        MegatronFSDPShim().prepare(TinyStack(), device_mesh=mesh)


# --- the default parallelize_module: meshplan's checked tensor parallelism ---------------------------------
def test_default_parallelize_module_checks_then_shards(fake_pg):
    model = TinyStack()
    full = model.layers[0].up.weight.detach().clone()
    with fake_pg(2):
        tp = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with pytest.raises(UnmatchedPlanKeyError, match="layers.*.upp"):
            P.parallelize_module(model, tp, {"layers.*.up": "colwise", "layers.*.upp": "colwise"})
        assert not isinstance(model.layers[0].up.weight, DTensor)  # nothing was sharded
        assert P.parallelize_module(model, tp, {"layers.*.up": "colwise"}) is model
        weight = model.layers[0].up.weight
        assert isinstance(weight, DTensor) and weight.placements == (Shard(0),)
        assert torch.equal(weight.to_local(), full.chunk(2)[weight.device_mesh.get_local_rank()])
        P.parallelize_module(model.head, tp, ColwiseParallel())  # a single style goes straight to torch
        assert model.head.weight.placements == (Shard(0),)
