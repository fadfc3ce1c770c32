"""The ``megatron_fsdp`` strategy.

On CPU, ``megatron_fsdp.fully_shard`` / ``fully_shard_model`` are replaced by recording stand-ins that
check each call against the installed signature, and the strategy is constructed with
``device_types=("cpu",)`` so the mapping runs on a fake-process-group CPU mesh. The GPU test runs the
real package on one CUDA device.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import socket
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import meshplan
from meshplan import (
    ImportPathError,
    MeshError,
    OptionsError,
    StrategyUnavailableError,
    UnsupportedConfigurationError,
)
from meshplan.api import parallelize_megatron_fsdp
from meshplan.core.torch_private import CheckpointWrapper
from meshplan.strategies.megatron_fsdp import (
    TRANSLATIONS,
    MegatronFSDPOptions,
    MegatronFSDPStrategy,
    option_mapping,
)
from tests.support import Block, TinyStack, tiny_hf

LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


@dataclass
class Call:
    """One recorded call: which function, its bound arguments, and the model's state at call time."""

    function: str
    arguments: dict[str, Any]
    tp_applied: bool
    checkpoint_wrapped: int
    mesh_dims: list[str]
    submeshes: list[tuple]


class StandInFSDP(nn.Module):
    """What the stand-ins return in place of ``MegatronFSDP`` (which keeps the model as ``.module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.replaced = False

    def _replace_param_with_distributed_if_needed(self) -> None:
        self.replaced = True


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)

    def stand_in(self, package: Any, name: str, real) -> Any:
        signature = inspect.signature(real)

        def record(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)  # the installed API accepts exactly this call
            module = bound.arguments["module"]
            mesh = bound.arguments["device_mesh"]
            flattened = list(mesh._get_root_mesh()._flatten_mapping)
            # The real package's process-group index accepts the mesh arguments (it runs on CPU).
            with warnings.catch_warnings():  # Megatron-FSDP's API names a flattened dim of the root mesh and slices
                warnings.filterwarnings("ignore", "Slicing a flattened dim from root mesh", UserWarning)  # it itself
                index = package.FSDPDistributedIndex(device_mesh=mesh, dp_shard_dim=bound.arguments["dp_shard_dim"],
                                                     tp_dim=bound.arguments["tp_dim"])
            self.calls.append(Call(
                name, dict(bound.arguments),
                tp_applied=any(isinstance(p, DTensor) for p in module.parameters()),
                checkpoint_wrapped=sum(isinstance(m, CheckpointWrapper) for m in module.modules()),
                mesh_dims=[*mesh.mesh_dim_names, *flattened],
                submeshes=list(index.mesh_library),
            ))
            wrapped = StandInFSDP(module)
            return (wrapped, bound.arguments["optimizer"]) if name == "fully_shard" else wrapped

        record.__signature__ = signature
        return record

    @property
    def only(self) -> Call:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


@pytest.fixture
def megatron(monkeypatch) -> tuple[Any, Recorder]:
    """The installed ``megatron_fsdp`` with recording stand-ins, and a CPU-capable strategy registered."""
    module = pytest.importorskip("megatron_fsdp")
    recorder = Recorder()
    for name in ("fully_shard", "fully_shard_model"):
        monkeypatch.setattr(module, name, recorder.stand_in(module, name, getattr(module, name)))
    meshplan.register_strategy(MegatronFSDPStrategy(device_types=("cuda", "cpu")), override=True)
    return module, recorder


def _untouched(model: nn.Module) -> bool:
    return not any(isinstance(p, DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------------- the mapping
def test_mapping_table_covers_every_option_and_matches_the_installed_api():
    megatron_fsdp = pytest.importorskip("megatron_fsdp")
    mapping = option_mapping()
    assert list(mapping) == [f.name for f in dataclasses.fields(MegatronFSDPOptions)]
    accepted = set(inspect.signature(megatron_fsdp.fully_shard).parameters)
    policy_fields = {f.name for f in dataclasses.fields(megatron_fsdp.MixedPrecisionPolicy)}
    for translation in TRANSLATIONS:
        if translation.policy_field:
            assert translation.policy_field in policy_fields, translation
        else:
            assert translation.target in accepted, translation
    assert {"fsdp_unit_modules", "device_mesh", "dp_shard_dim", "tp_dim", "optimizer"} <= accepted


def test_every_option_reaches_fully_shard_after_tp_and_checkpointing(fake_pg, megatron):
    megatron_fsdp, recorder = megatron
    non_defaults = dict(
        nvfsdp_unit_modules=[LLAMA_LAYER], data_parallel_sharding_strategy="optim_grads",
        init_nvfsdp_with_meta_device=True, grad_reduce_in_fp32=True, preserve_fp32_weights=True,
        overlap_grad_reduce=False, overlap_param_gather=False, check_for_nan_in_grad=False,
        average_in_collective=True, disable_bucketing=True, calculate_per_token_loss=True,
        keep_fp8_transpose_cache_when_using_custom_fsdp=True, nccl_ub=True, fsdp_double_buffer=True,
        sync_model_each_microbatch=False, activation_checkpointing="full",
    )
    model = tiny_hf("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with fake_pg(8):
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
        wrapped, returned = parallelize_megatron_fsdp(model, mesh, optimizer=optimizer, **non_defaults)
    call = recorder.only
    assert call.function == "fully_shard"
    assert call.tp_applied, "the TP plan must be applied before Megatron-FSDP wraps the model"
    assert call.checkpoint_wrapped == 2, "activation checkpointing must wrap the blocks before Megatron-FSDP"
    assert "dp_cp" in call.mesh_dims, "the flattened dp_cp dim must exist when fully_shard is called"
    assert ("dp_cp", "tp", False) in call.submeshes  # Megatron-FSDP's (dp_cp, tp) mesh for TP-sharded params
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    args = call.arguments
    assert args["module"] is model and args["optimizer"] is optimizer and args["device_mesh"] is mesh
    assert {k: v for k, v in args.items() if k not in ("module", "optimizer", "device_mesh")} == {
        "dp_shard_dim": "dp_cp", "tp_dim": "tp", "fsdp_unit_modules": [LlamaDecoderLayer],
        "zero_dp_strategy": "optim_grads", "init_model_with_meta_device": True,
        "mixed_precision_policy": megatron_fsdp.MixedPrecisionPolicy(
            main_params_dtype=torch.float32, main_grads_dtype=torch.float32),
        "overlap_grad_reduce": False, "overlap_param_gather": False, "report_nan_in_param_grad": False,
        "average_in_collective": True, "disable_bucketing": True, "calculate_per_token_loss": True,
        "keep_fp8_transpose_cache": True, "nccl_ub": True, "fsdp_double_buffer": True,
        "sync_model_each_microbatch": False,
    }
    assert isinstance(wrapped, StandInFSDP) and wrapped.module is model and returned is optimizer
    assert meshplan.get_report(wrapped)["strategy"] == "megatron_fsdp"


def test_defaults_without_optimizer_wrap_the_model_only(fake_pg, megatron):
    megatron_fsdp, recorder = megatron
    model = tiny_hf("llama")
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        wrapped = meshplan.parallelize(model, mesh, strategy="nvfsdp")
    call = recorder.only
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert call.function == "fully_shard_model" and call.tp_applied and call.checkpoint_wrapped == 0
    args = call.arguments
    assert args["dp_shard_dim"] == "dp" and args["tp_dim"] == "tp"
    assert args["fsdp_unit_modules"] == [LlamaDecoderLayer]  # from LlamaForCausalLM._no_split_modules
    assert args["zero_dp_strategy"] == "optim_grads_params" and args["report_nan_in_param_grad"] is True
    assert args["overlap_grad_reduce"] is True and args["sync_model_each_microbatch"] is True
    assert args["mixed_precision_policy"] == megatron_fsdp.MixedPrecisionPolicy(
        main_params_dtype=None, main_grads_dtype=None)
    assert wrapped.replaced, "the distributed parameters must be exposed for a later fully_shard_optimizer"


def test_the_call_is_built_once_by_validate_and_reaches_the_wrapping(fake_pg, megatron, monkeypatch):
    """``validate`` maps the options onto the installed API once; ``parallelize`` receives that call (it was built
    twice before the strategy contract handed validate's result on)."""
    from meshplan.strategies import megatron_fsdp as strategy_module

    _, recorder = megatron
    built = []
    real = strategy_module.build_call
    monkeypatch.setattr(strategy_module, "build_call", lambda *args: built.append(real(*args)) or built[-1])
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp", overlap_grad_reduce=False)
    assert len(built) == 1
    assert recorder.only.arguments["overlap_grad_reduce"] is False == built[0].kwargs["overlap_grad_reduce"]


def test_unit_modules_default_to_the_block_class_and_accept_classes(fake_pg, megatron):
    _, recorder = megatron
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp")
        meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp", nvfsdp_unit_modules=[nn.Linear])
    assert [c.arguments["fsdp_unit_modules"] for c in recorder.calls] == [[Block], [nn.Linear]]
    assert not any(c.tp_applied for c in recorder.calls)


def test_option_without_counterpart_in_installed_version_errors_or_warns(fake_pg, megatron, monkeypatch, caplog):
    megatron_fsdp, recorder = megatron
    # An installed version whose fully_shard_model has no nccl_ub (and whose policy has no main_grads_dtype).
    signature = inspect.signature(megatron_fsdp.fully_shard_model)
    older = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "nccl_ub"])
    stand_in = megatron_fsdp.fully_shard_model

    def fully_shard_model(*args, **kwargs):
        return stand_in(*args, **kwargs)

    fully_shard_model.__signature__ = older
    monkeypatch.setattr(megatron_fsdp, "fully_shard_model", fully_shard_model)

    @dataclass
    class OlderPolicy:
        main_params_dtype: torch.dtype | None = torch.float32

    monkeypatch.setattr(megatron_fsdp, "MixedPrecisionPolicy", OlderPolicy)
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        with pytest.raises(UnsupportedConfigurationError, match=r"nccl_ub=True maps onto fully_shard_model\(nccl_ub"):
            meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp", nccl_ub=True)
        with pytest.raises(UnsupportedConfigurationError, match=r"MixedPrecisionPolicy\.main_grads_dtype"):
            meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp", grad_reduce_in_fp32=True)
        assert not recorder.calls
        with caplog.at_level(logging.WARNING, logger="meshplan"):
            meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp")
    assert "nccl_ub" not in recorder.only.arguments
    assert recorder.only.arguments["mixed_precision_policy"] == OlderPolicy(main_params_dtype=None)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "nccl_ub (default False) has no counterpart" in warned and "grad_reduce_in_fp32" in warned


def test_optimizer_groups_collapse_is_warned(fake_pg, megatron, caplog):
    model = TinyStack()
    groups = [{"params": list(model.layers.parameters()), "weight_decay": 0.0},
              {"params": list(model.head.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    with fake_pg(2), caplog.at_level(logging.WARNING, logger="meshplan"):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        _, returned = parallelize_megatron_fsdp(model, mesh, optimizer=optimizer)
    assert returned is optimizer
    assert "2 parameter group(s)" in caplog.text and "weight_decay" in caplog.text


# ------------------------------------------------------------------------------------- error paths
def test_cpu_mesh_is_refused_before_any_work(fake_pg):
    model = TinyStack()
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        with pytest.raises(StrategyUnavailableError, match=r"runs only on CUDA.*device type is 'cpu'"):
            meshplan.parallelize(model, mesh, strategy="mfsdp")
    assert _untouched(model)


def test_not_installed_names_the_extra(fake_pg, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_fsdp", None)  # import fails, find_spec says "absent"
    meshplan.register_strategy(MegatronFSDPStrategy(device_types=("cuda", "cpu")), override=True)
    model = TinyStack()
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        with pytest.raises(StrategyUnavailableError, match=r"pip install 'meshplan\[megatron\]'"):
            meshplan.parallelize(model, mesh, strategy="megatron-fsdp")
    assert _untouched(model)
    reason = MegatronFSDPStrategy().unavailable_reason("cpu")
    assert "CUDA" in reason and "megatron-fsdp (not installed" in reason


@pytest.mark.parametrize("options, error, message", [
    ({"nvfsdp_unit_modules": ["tests.support.NoSuchBlock"]}, ImportPathError, r"'tests\.support\.NoSuchBlock'"),
    ({"nvfsdp_unit_modules": ["no_such_package.Block"]}, ImportPathError, r"'no_such_package\.Block'"),
    ({"nvfsdp_unit_modules": [42]}, OptionsError, r"nn\.Module classes or dotted paths"),
    ({"data_parallel_sharding_strategy": "optim_grad"}, UnsupportedConfigurationError,
     r"must be one of \['no_shard'.*Did you mean 'optim_grads'"),
    ({"data_parallel_sharding_strategy": "no_shard", "init_nvfsdp_with_meta_device": True},
     UnsupportedConfigurationError, "meta-device initialization"),
    ({"optimizer": "adam"}, OptionsError, r"'optimizer' of strategy 'megatron_fsdp' must be Optimizer \| None"),
    ({"activation_checkpointing": "sometimes"}, UnsupportedConfigurationError, "activation_checkpointing must be"),
])
def test_bad_options_fail_before_any_work(fake_pg, megatron, options, error, message):
    _, recorder = megatron
    model = TinyStack()
    plan = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        with pytest.raises(error, match=message):
            meshplan.parallelize(model, mesh, strategy="megatron_fsdp", tp_plan=plan, **options)
    assert _untouched(model) and not recorder.calls


@pytest.mark.parametrize("shape, names, message", [
    ((2,), ("dp",), r"needs a tensor-parallel mesh dim.*Add a dim of size 1"),
    ((2, 1), ("data", "tp"), r"Mesh dim 'data' \(size 2\) has no role in strategy 'megatron_fsdp'"),
    ((2, 2, 1), ("dp_replicate", "dp", "tp"), r"Mesh dim 'dp_replicate' \(size 2\) has no role"),
])
def test_mesh_errors(fake_pg, megatron, shape, names, message):
    world = 1
    for size in shape:
        world *= size
    with fake_pg(world):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        with pytest.raises(MeshError, match=message):
            meshplan.parallelize(TinyStack(), mesh, strategy="megatron_fsdp")


def test_listing_shows_aliases_options_and_availability():
    row = next(r for r in meshplan.list_strategies() if r["name"] == "megatron_fsdp")
    assert set(row["aliases"]) == {"nvfsdp", "mfsdp", "megatron-fsdp"}
    options = {o["name"]: o["default"] for o in row["options"]}
    assert options["data_parallel_sharding_strategy"] == "'optim_grads_params'"
    assert options["dp_mesh_name"] == "'dp'" and options["check_for_nan_in_grad"] == "True"
    if not torch.cuda.is_available():
        assert row["unavailable_reason"].startswith("needs CUDA")


# ------------------------------------------------------------------------------------------- GPU
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron-FSDP needs a CUDA device")
def test_real_megatron_fsdp_trains_a_tiny_model_on_one_gpu():
    pytest.importorskip("megatron_fsdp")
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = TinyStack(dim=32, depth=2).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        wrapped, optimizer = parallelize_megatron_fsdp(model, mesh, optimizer=optimizer, check_for_nan_in_grad=True)
        inputs = torch.randn(8, 32, device="cuda")
        target = torch.randn(8, 4, device="cuda")
        losses = []
        for _ in range(3):
            loss = nn.functional.mse_loss(wrapped(inputs), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    finally:
        dist.destroy_process_group()
