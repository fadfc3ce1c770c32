"""The strategy contract: declared axes, plans resolved once, ``validate`` -> ``parallelize``, the shared order, and
the adapter that keeps pre-contract strategies running (fake process groups: no ranks needed)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import meshplan
from meshplan import ComposedStrategy, PlanSet, Strategy, StrategyOptions, UnsupportedAxisError
from meshplan.core.roles import RoleDims, pipeline_role
from tests.support import TinyStack, tiny_hf

STACK_PLAN = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
MIXTRAL = {"num_local_experts": 8, "num_experts_per_tok": 2}


def _mesh(**dims: int):
    return init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))


def _meta_mixtral() -> nn.Module:
    with torch.device("meta"):
        return tiny_hf("mixtral", **MIXTRAL)


class Ordered(ComposedStrategy):
    """Records each step of the shared order it can see, and what ``validate`` handed to ``parallelize``."""

    name = "ordered"
    supports = frozenset({"tp"})

    def validate(self, model, roles, plans, options):
        super().validate(model, roles, plans, options)
        model.validations = getattr(model, "validations", 0) + 1
        return {"computed": "once"}

    def split_pipeline_stages(self, model, roles, plans, options, compose):
        model.steps = ["pipeline"]
        model.seen = (roles.pp, roles.describe(), plans.pp)
        return compose(model, plans)

    def compile_regions(self, model, roles, options, done):
        model.steps.append(("compile", isinstance(model.layers[0].up.weight, DTensor)))
        return model

    def wrap_data_parallel(self, model, roles, plans, options, validated, done):
        model.steps.append(("wrap", validated, [fqn for fqn, _ in done.blocks]))
        return model


def test_validate_result_reaches_parallelize_and_steps_run_in_the_shared_order(fake_pg):
    with fake_pg(2):
        model = meshplan.parallelize(TinyStack(), _mesh(tp=2), strategy=Ordered(), tp_plan=STACK_PLAN)
    assert model.validations == 1
    assert model.steps == ["pipeline", ("compile", True), ("wrap", {"computed": "once"}, ["layers.0", "layers.1"])]


@pytest.mark.parametrize("dims, options, what", [
    ({"dp_shard": 2, "cp": 2}, {}, r"context parallelism \('cp'\), asked for by mesh dim 'cp' of size 2"),
    ({"pp": 2, "dp_shard": 2}, {}, r"pipeline parallelism \('pp'\), asked for by mesh dim 'pp' of size 2"),
    ({"dp_shard": 4}, {"ep_size": 2}, r"expert parallelism \('ep'\), asked for by ep_size=2"),
    ({"dp_shard": 4}, {"ep_plan": {"x": "ep_dispatch_experts"}}, r"expert parallelism \('ep'\), asked for by ep_plan"),
])
def test_an_axis_the_strategy_does_not_declare_is_refused_the_same_on_every_rank(fake_pg, dims, options, what):
    messages = []
    for rank in (0, 3):
        with fake_pg(4, rank=rank), pytest.raises(UnsupportedAxisError, match=what) as info:
            meshplan.prepare(TinyStack(), _mesh(**dims), strategy=Ordered(), **options)
        messages.append(str(info.value))
    assert "'ordered'" in messages[0] and "it supports ['tp']" in messages[0] and messages[0] == messages[1]
    assert isinstance(info.value, meshplan.UnsupportedConfigurationError)


def test_fsdp2_declares_tp_cp_ep_pp_and_ddp_refuses_pp(fake_pg):
    rows = {row["name"]: row for row in meshplan.list_strategies()}
    assert rows["fsdp2"]["supports"] == ["cp", "ep", "pp", "tp"] and rows["ddp"]["supports"] == ["tp"]
    assert rows["megatron_fsdp"]["supports"] == ["cp", "tp"]
    with fake_pg(4), pytest.raises(UnsupportedAxisError, match="'ddp' does not support pipeline parallelism"):
        meshplan.prepare(TinyStack(), _mesh(pp=2, dp=2), strategy="ddp")


def test_a_renamed_tp_dim_is_refused_to_a_strategy_without_tp(fake_pg):
    class DataOnly(Ordered):
        name = "data_only"
        supports = frozenset()

    with fake_pg(2), pytest.raises(UnsupportedAxisError, match=r"tensor parallelism \('tp'\), asked for by mesh dims "
                                                               r"\['tensor'\]"):
        meshplan.prepare(TinyStack(), _mesh(tensor=2), strategy=DataOnly(), tp_mesh_name="tensor")


def test_declaring_an_unknown_axis_or_ep_without_its_options_is_the_authors_error(fake_pg):
    class Typo(Ordered):
        name = "typo"
        supports = frozenset({"tp", "ex"})

    class NoEPOptions(Ordered):
        name = "no_ep_options"
        supports = frozenset({"tp", "ep"})

    with fake_pg(2):
        with pytest.raises(meshplan.UnsupportedConfigurationError, match=r"\['ex'\] are not axes"):
            meshplan.prepare(TinyStack(), _mesh(dp_shard=2), strategy=Typo())
        with pytest.raises(meshplan.UnsupportedConfigurationError, match="does not derive from .*ExpertParallelOpt"):
            meshplan.prepare(TinyStack(), _mesh(dp_shard=2), strategy=NoEPOptions())


@dataclasses.dataclass
class PipelineOptions(StrategyOptions):
    pp_mesh_name: str = "pp"

    def mesh_roles(self) -> dict[str, RoleDims]:
        return super().mesh_roles() | {"pp": pipeline_role(self.pp_mesh_name)}


class Staged(Ordered):
    name = "staged"
    supports = frozenset({"tp", "pp"})
    options_class = PipelineOptions


def test_the_pp_role_and_the_providers_pp_entry_reach_a_strategy_that_declares_pp(fake_pg):
    stages = object()  # the pipeline axis's own data: passed through untouched
    meshplan.register_tp_plan(TinyStack, {"tp": STACK_PLAN, "pp": stages})
    with fake_pg(8, rank=5):
        model = meshplan.parallelize(TinyStack(), _mesh(pp=2, dp_shard=2, tp=2), strategy=Staged())
        pp_mesh, roles, pp_plan = model.seen
        assert sorted(pp_mesh.mesh.tolist()) == [1, 5]
    assert pp_plan is stages
    assert roles["pp"] == {"dims": ["pp"], "size": 2} and pp_mesh.mesh_dim_names == ("pp",)
    with fake_pg(4):  # without a pp dim > 1 the entry is not looked for
        model = meshplan.parallelize(TinyStack(), _mesh(dp_shard=2, tp=2), strategy=Staged())
    assert model.seen[0] is None and model.seen[2] is None


@dataclasses.dataclass
class LegacyOptions(StrategyOptions):
    dp_shard_cp_mesh_name: str = "dp_shard_cp"
    ep_size: int = 1


class LegacyEP(Strategy):
    """A strategy written before the contract: no ``supports``, ``plan`` and ``ep_plan=`` keywords."""

    name = "legacy_ep"
    options_class = LegacyOptions

    def validate(self, model, roles, plan, options, ep_plan=None):
        model.validated_with = (plan, ep_plan)

    def parallelize(self, model, roles, plan, options, ep_plan=None):
        model.applied_with = (plan, ep_plan)
        return model


def test_a_pre_contract_strategy_still_gets_tp_and_ep_plans_with_a_deprecation_warning(fake_pg):
    with fake_pg(4), pytest.warns(DeprecationWarning, match=r"'legacy_ep'.*no `supports`.*removed in meshplan 0\.3"):
        model = meshplan.parallelize(_meta_mixtral(), _mesh(dp_shard=2, tp=2), strategy=LegacyEP(), ep_size=2)
    plan, ep_plan = model.applied_with
    assert model.validated_with == model.applied_with
    assert isinstance(plan, meshplan.FittedPlan) and plan.axis == "tp"
    assert isinstance(ep_plan, meshplan.FittedPlan) and ep_plan.axis == "ep" and ep_plan.size == 2


def test_a_pre_contract_strategy_without_the_ep_plan_keyword_is_refused_ep(fake_pg):
    class LegacyTP(Strategy):
        name = "legacy_tp"
        options_class = LegacyOptions

        def parallelize(self, model, roles, plan, options):
            return model

    with fake_pg(4), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(UnsupportedAxisError, match="'legacy_tp' does not support expert parallelism"):
            meshplan.prepare(_meta_mixtral(), _mesh(dp_shard=4), strategy=LegacyTP(), ep_size=2)


def test_plans_are_typed_resolved_matched_fitted(fake_pg):
    with fake_pg(4):
        prepared = meshplan.prepare(_meta_mixtral(), _mesh(dp_shard=2, tp=2), strategy="fsdp2", ep_size=2)
    assert isinstance(prepared.plans, PlanSet) and prepared.plan is prepared.plans.tp
    assert type(prepared.plans.tp) is meshplan.FittedPlan and (prepared.plans.tp.axis, prepared.plans.tp.size) == (
        "tp", 2)
    assert type(prepared.plans.ep) is meshplan.FittedPlan and prepared.ep_plan.size == 2
    resolved = meshplan.get_tp_plan(_meta_mixtral())
    assert type(resolved) is meshplan.ResolvedPlan and not resolved.matches
    assert issubclass(meshplan.FittedPlan, meshplan.MatchedPlan) and issubclass(meshplan.MatchedPlan,
                                                                                meshplan.ResolvedPlan)


def test_providers_and_the_hf_ep_plan_are_read_once_per_prepare(fake_pg, monkeypatch):
    """The Hugging Face provider gives OLMoE both plans: it is called once for TP and EP together, and transformers'
    EP plan is merged once (three times per prepare before the planning layer: by the provider for each axis, then
    for the EP plan itself)."""
    from meshplan.plans import hf_translation

    calls = []
    merged = hf_translation.merged_hf_plan

    def counting(model, axis="tp"):
        calls.append(axis)
        return merged(model, axis)

    monkeypatch.setattr(hf_translation, "merged_hf_plan", counting)
    with fake_pg(4):
        with torch.device("meta"):
            model = tiny_hf("olmoe")
        prepared = meshplan.prepare(model, _mesh(dp_shard=2, tp=2), strategy="fsdp2", ep_size=2)
    assert "hf_plans" in prepared.plans.tp.source and "hf_ep_plan" in prepared.plans.ep.source
    assert sorted(calls) == ["ep", "tp"], calls


def test_a_subclass_overriding_parallelize_with_the_pre_contract_signature_is_refused_before_any_work(fake_pg):
    from meshplan.strategies.fsdp2 import FSDP2Strategy

    class OldStyleFSDP2(FSDP2Strategy):
        name = "old_style_fsdp2"

        def parallelize(self, model, roles, plan, options):
            raise AssertionError("must not be called")

    with fake_pg(2), pytest.raises(meshplan.UnsupportedConfigurationError,
                                   match=r"'old_style_fsdp2'.*parallelize\(\) does not take the contract's arguments"):
        meshplan.prepare(TinyStack(), _mesh(dp_shard=2), strategy=OldStyleFSDP2())
