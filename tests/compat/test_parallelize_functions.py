"""``PARALLELIZE_FUNCTIONS`` is the registry, and ``_get_parallel_plan`` follows NeMo AutoModel's priority."""

from __future__ import annotations

import pytest
from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel
from transformers import LlamaForCausalLM, PreTrainedModel

import meshplan
from meshplan import parallelizer as P
from meshplan.core.errors import PlanSourceError, SequenceParallelUnsupportedError
from meshplan.plans.llama import llama_plan
from tests.support import TinyStack, tiny_hf

STACK = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def stack_function(model, sequence_parallel):
    return dict(STACK, head="colwise_rep") if sequence_parallel else dict(STACK)


class SubStack(TinyStack):
    pass


def test_reading_shows_the_builtin_providers_by_class_but_not_the_hf_fallback():
    functions = P.PARALLELIZE_FUNCTIONS
    assert LlamaForCausalLM in functions and functions[LlamaForCausalLM] is llama_plan
    assert PreTrainedModel not in functions and TinyStack not in functions
    snapshot = functions.copy()
    assert type(snapshot) is dict and LlamaForCausalLM in snapshot and len(snapshot) == len(functions)
    assert all(callable(fn) for fn in snapshot.values())
    with pytest.raises(KeyError):
        functions[TinyStack]


def test_assignment_registers_a_runtime_provider_that_parallelize_uses():
    P.PARALLELIZE_FUNCTIONS[TinyStack] = stack_function
    assert P.PARALLELIZE_FUNCTIONS[TinyStack] is stack_function
    row = {r["model_class"]: r for r in meshplan.list_tp_plans()}["tests.support.TinyStack"]
    assert row["tier"] == "runtime" and row["status"] == "active"
    resolved = meshplan.get_tp_plan(TinyStack())
    assert list(resolved.styles) == list(STACK) and "stack_function" in resolved.source
    assert P._get_parallel_plan(TinyStack(), sequence_parallel=True) == dict(STACK, head="colwise_rep")
    assert P._get_parallel_plan(SubStack()) == STACK  # a subclass gets its base class's function


def test_assignment_replaces_a_builtin_and_delete_removes_it():
    model = tiny_hf("llama")
    P.PARALLELIZE_FUNCTIONS[LlamaForCausalLM] = stack_function
    assert P._get_parallel_plan(model) == STACK
    del P.PARALLELIZE_FUNCTIONS[LlamaForCausalLM]
    assert LlamaForCausalLM not in P.PARALLELIZE_FUNCTIONS
    assert "model.layers.*.self_attn.q_proj" in P._get_parallel_plan(model)  # now the Hugging Face plan
    assert meshplan.get_tp_plan(model).source.startswith("provider meshplan.plans.hf_translation")
    with pytest.raises(KeyError):
        del P.PARALLELIZE_FUNCTIONS[LlamaForCausalLM]


def test_clear_then_update_restores_the_table():
    saved = P.PARALLELIZE_FUNCTIONS.copy()
    P.PARALLELIZE_FUNCTIONS.clear()
    assert len(P.PARALLELIZE_FUNCTIONS) == 0 and list(P.PARALLELIZE_FUNCTIONS) == []
    model = tiny_hf("llama")
    assert "model.layers.*.self_attn.q_proj" in P._get_parallel_plan(model)
    P.PARALLELIZE_FUNCTIONS.update(saved)
    assert P.PARALLELIZE_FUNCTIONS[LlamaForCausalLM] is llama_plan
    assert any(isinstance(s, SequenceParallel) for s in P._get_parallel_plan(model, sequence_parallel=True).values())


def test_a_plain_dict_put_in_its_place_is_honoured(monkeypatch):
    monkeypatch.setattr(P, "PARALLELIZE_FUNCTIONS", {TinyStack: stack_function})
    assert P._get_parallel_plan(TinyStack()) == STACK


# --- _get_parallel_plan priority -----------------------------------------------------------------------
def test_explicit_plan_wins_and_a_dict_is_returned_as_given(monkeypatch):
    P.PARALLELIZE_FUNCTIONS[TinyStack] = stack_function
    plan = {"anything": "unchecked"}
    assert P._get_parallel_plan(TinyStack(), tp_shard_plan=plan) is plan
    paths = []
    monkeypatch.setattr(P, "import_class_from_path", lambda path: paths.append(path) or (lambda: plan))
    assert P._get_parallel_plan(TinyStack(), tp_shard_plan="pkg.make_plan") is plan  # module name is patched
    assert paths == ["pkg.make_plan"]


def test_a_bad_plan_path_is_the_reference_value_error():
    with pytest.raises(PlanSourceError, match="Custom parallel plan 'no_such.module.PLAN' is not valid") as info:
        P._get_parallel_plan(TinyStack(), tp_shard_plan="no_such.module.PLAN")
    assert isinstance(info.value, ValueError) and "No module named 'no_such'" in str(info.value)


def test_a_failing_optimized_plan_falls_back_to_the_hf_plan(monkeypatch):
    def broken(model, sequence_parallel):
        raise RuntimeError("no such layers")

    hf_plan = {"from": ColwiseParallel()}
    P.PARALLELIZE_FUNCTIONS[TinyStack] = broken
    monkeypatch.setattr(P, "get_hf_tp_shard_plan", lambda model: hf_plan)
    assert P._get_parallel_plan(TinyStack()) is hf_plan
    with pytest.raises(SequenceParallelUnsupportedError, match="sequence_parallel is not supported in HF tp plan"):
        P._get_parallel_plan(TinyStack(), sequence_parallel=True)
    del P.PARALLELIZE_FUNCTIONS[TinyStack]
    assert P._get_parallel_plan(TinyStack()) is hf_plan
    with pytest.raises(AssertionError, match="sequence_parallel is not supported"):
        P._get_parallel_plan(TinyStack(), sequence_parallel=True)
