import pytest

import meshplan
from meshplan import RegistrationError
from meshplan.plugins.manager import get_host


class Dummy(meshplan.Strategy):
    name = "dummy"

    def parallelize(self, model, roles, plan, options):
        return model


def test_runtime_registration_is_listed_with_provenance():
    meshplan.register_strategy(Dummy, aliases=("dum",))
    row = {r["name"]: r for r in meshplan.list_strategies()}["dummy"]
    assert row["plugin"] == "<runtime>" and row["tier"] == "runtime" and row["aliases"] == ["dum"]
    assert isinstance(meshplan.get_strategy("DUM"), Dummy)


def test_runtime_replacement_of_builtin_needs_override():
    with pytest.raises(RegistrationError, match="already provided by builtin plugin 'meshplan.strategies.fsdp2'"):
        meshplan.register_strategy(Dummy, name="fsdp2")
    meshplan.register_strategy(Dummy, name="fsdp2", override=True)
    assert isinstance(meshplan.get_strategy("fsdp2"), Dummy)


def test_registrations_do_not_leak_between_tests():
    assert "dummy" not in get_host().registry.strategies


def test_path_registration_needs_a_name():
    with pytest.raises(RegistrationError, match="name="):
        meshplan.register_strategy("tests.plugins.test_runtime:Dummy")
    meshplan.register_strategy("tests.plugins.test_runtime:Dummy", name="lazy")
    assert isinstance(meshplan.get_strategy("lazy"), Dummy)


def test_unregister_tp_plan_removes_every_tier_until_rediscovery():
    from transformers import LlamaForCausalLM

    from meshplan.plugins import manager

    meshplan.register_tp_plan("tests.support.TinyStack", {"layers.*.up": "colwise"})
    assert meshplan.unregister_tp_plan("tests.support.TinyStack") is True
    assert meshplan.unregister_tp_plan("tests.support.TinyStack") is False  # nothing left to remove
    assert meshplan.unregister_tp_plan(LlamaForCausalLM) is True  # a built-in provider
    rows = [r for r in meshplan.list_tp_plans() if r["model_class"].endswith("LlamaForCausalLM")]
    assert rows == []
    found = get_host().registry.find_tp_plan(LlamaForCausalLM)  # the base class's provider still applies
    assert found is not None and found[1].provenance.plugin == "meshplan.plans.hf"
    contributions = get_host().records["meshplan.plans.llama"].contributions
    assert ("tp_plan", "transformers.models.llama.modeling_llama.LlamaForCausalLM") not in contributions
    manager.reset()
    assert get_host().registry.find_tp_plan(LlamaForCausalLM)[1].provenance.plugin == "meshplan.plans.llama"
