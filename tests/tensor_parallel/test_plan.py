import pytest
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from meshplan import (
    PlanNotFoundError,
    PlanSourceError,
    RegistrationError,
    UnknownStyleError,
    get_tp_plan,
    register_tp_plan,
)
from meshplan.tensor_parallel.matching import match_key, replicated_linears, suggest_keys
from tests.support import TinyStack

STACK_PLAN = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}


def stack_plan_function(model, sequence_parallel):
    return {**STACK_PLAN, "head": "colwise_rep"} if sequence_parallel else STACK_PLAN


def no_argument_plan():
    return STACK_PLAN


NOT_A_PLAN = 42


def test_explicit_dict_wins_over_registered_provider():
    register_tp_plan(TinyStack, {"head": "colwise"})
    plan = get_tp_plan(TinyStack(), tp_plan=STACK_PLAN)
    assert list(plan.styles) == list(STACK_PLAN)
    assert plan.source.startswith("explicit")


@pytest.mark.parametrize("source", [
    "tests.tensor_parallel.test_plan.STACK_PLAN", "tests.tensor_parallel.test_plan:stack_plan_function",
    "tests.tensor_parallel.test_plan.no_argument_plan", stack_plan_function,
])
def test_explicit_sources(source):
    plan = get_tp_plan(TinyStack(), tp_plan=source)
    assert isinstance(plan.styles["layers.*.up"], ColwiseParallel)
    assert isinstance(plan.styles["layers.*.down"], RowwiseParallel)


def test_bad_explicit_sources_explain_the_accepted_forms():
    with pytest.raises(PlanSourceError, match="dict"):
        get_tp_plan(TinyStack(), tp_plan=3.5)
    with pytest.raises(PlanSourceError, match="dict or a function"):
        get_tp_plan(TinyStack(), tp_plan="tests.tensor_parallel.test_plan.NOT_A_PLAN")


def test_provider_callable_receives_sequence_parallel_flag():
    register_tp_plan(TinyStack, stack_plan_function)
    assert "head" not in get_tp_plan(TinyStack()).styles
    assert "head" in get_tp_plan(TinyStack(), sequence_parallel=True).styles


def test_lookup_walks_mro_and_accepts_bare_names():
    class MyStack(TinyStack):
        pass

    register_tp_plan(TinyStack, STACK_PLAN)
    plan = get_tp_plan(MyStack())
    assert "TinyStack" in plan.source

    class RemoteCodeModel(nn.Module):
        pass

    register_tp_plan("RemoteCodeModel", {"x": "colwise"})
    assert list(get_tp_plan(RemoteCodeModel()).styles) == ["x"]


def test_runtime_registration_needs_override_to_replace():
    register_tp_plan(TinyStack, STACK_PLAN)
    register_tp_plan(TinyStack, STACK_PLAN)  # identical: no-op
    with pytest.raises(RegistrationError, match="override=True"):
        register_tp_plan(TinyStack, {"head": "colwise"})
    register_tp_plan(TinyStack, {"head": "colwise"}, override=True)
    assert list(get_tp_plan(TinyStack()).styles) == ["head"]


def test_styles_are_fresh_and_inputs_never_mutated():
    style = ColwiseParallel()
    user_plan = {"head": style}
    first, second = get_tp_plan(TinyStack(), tp_plan=user_plan), get_tp_plan(TinyStack(), tp_plan=user_plan)
    assert first.styles["head"] is not style and first.styles["head"] is not second.styles["head"]
    assert user_plan == {"head": style}


def test_unknown_style_in_plan():
    with pytest.raises(UnknownStyleError):
        get_tp_plan(TinyStack(), tp_plan={"head": "diagonal"})


def test_no_plan_for_plain_module():
    with pytest.raises(PlanNotFoundError, match="register_tp_plan"):
        get_tp_plan(TinyStack())


def test_matching_follows_parallelize_module_semantics():
    model = TinyStack(depth=3)
    assert match_key(model, "layers.*.up") == ["layers.0.up", "layers.1.up", "layers.2.up"]
    assert match_key(model, "layers.1.*") == ["layers.1.up", "layers.1.down"]
    assert match_key(model, "*.up") == []  # '*' is exactly one segment
    assert match_key(model, "") == [""]
    assert "layers.*.up" in suggest_keys(model, "layers.*.upp")
    assert replicated_linears(model, ["layers.0.up"])[0] == "layers.0.down"
