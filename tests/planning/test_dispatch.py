from dataclasses import dataclass

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan import (
    MeshplanError,
    OptionsError,
    Strategy,
    StrategyOptions,
    TensorParallelSizeError,
    UnknownStrategyError,
    UnmatchedPlanKeyError,
)
from tests.support import TinyStack, tiny_hf


@dataclass
class RecordingOptions(StrategyOptions):
    flavour: str = "plain"


class RecordingStrategy(Strategy):
    name = "recording"
    supports = frozenset({"tp"})
    aliases = ("rec",)
    options_class = RecordingOptions

    def parallelize(self, model, roles, plans, options, validated):
        model.seen = (plans.tp, options)
        return model


def test_unknown_strategy_lists_known_and_suggests():
    with pytest.raises(UnknownStrategyError, match="Did you mean 'fsdp2'") as info:
        meshplan.get_strategy("fsdp")
    assert isinstance(info.value, KeyError)


def test_strategy_by_alias_and_typed_options(fake_pg):
    meshplan.register_strategy(RecordingStrategy)
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
        model = meshplan.parallelize(TinyStack(), mesh, strategy="REC", flavour="spicy")
    plan, options = model.seen
    assert plan is None  # no TP dim -> no plan resolution at all
    assert isinstance(options, RecordingOptions) and options.flavour == "spicy"
    assert meshplan.get_report(model)["strategy"] == "recording"


def test_unknown_option_lists_valid_options(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        with pytest.raises(OptionsError, match="dp_shard_cp_mesh_name") as info:
            meshplan.parallelize(TinyStack(), mesh, strategy="fsdp2", dp_shard_mesh="x")
    assert "Unknown option(s) ['dp_shard_mesh']" in str(info.value)


def test_plan_resolved_matched_and_reported_before_strategy_runs(fake_pg):
    meshplan.register_strategy(RecordingStrategy)
    meshplan.register_tp_plan(TinyStack, {"layers.*.up": "colwise", "layers.*.down": "rowwise"})
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        model = meshplan.parallelize(TinyStack(), mesh, strategy="recording")
    plan, _ = model.seen
    assert plan.matches["layers.*.up"] == ["layers.0.up", "layers.1.up"]
    assert plan.replicated_linears == ("head",)
    entries = meshplan.get_report(model)["plan"]["entries"]
    assert entries[0]["style"].startswith("ColwiseParallel")


def test_unmatched_key_is_strict_by_default(fake_pg):
    meshplan.register_strategy(RecordingStrategy)
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        plan = {"layers.*.upp": "colwise", "head": "colwise"}
        with pytest.raises(UnmatchedPlanKeyError, match=r"layers\.\*\.upp.*closest modules: layers\.\*\.up"):
            meshplan.parallelize(TinyStack(), mesh, strategy="recording", tp_plan=plan)
        model = meshplan.parallelize(TinyStack(), mesh, strategy="recording", tp_plan=plan, strict=False)
    assert list(model.seen[0].styles) == ["head"]


def test_heads_must_divide_tp_size_before_any_work(fake_pg):
    meshplan.register_strategy(RecordingStrategy)
    model = tiny_hf("llama", hidden_size=48, num_attention_heads=12, num_key_value_heads=3)
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        with pytest.raises(TensorParallelSizeError, match=r"num_key_value_heads \(3\).*TP size \(4\)") as info:
            meshplan.parallelize(model, mesh, strategy="recording")
    assert isinstance(info.value, MeshplanError) and not isinstance(info.value, AssertionError)  # compat only
    assert not hasattr(model, "seen")
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
