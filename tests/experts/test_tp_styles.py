"""The experts' tensor-parallel style: layouts read off transformers' experts, parity of the module alone for the
layouts the built-in plans do not cover, the Hugging Face translation, and typed errors before any collective."""

from __future__ import annotations

import pytest
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.conformance.check import build_model, tiny_config
from meshplan.core.errors import PlanError, TensorParallelSizeError
from meshplan.experts.modules import SUMMAND, ExpertParamLayout, infer_param_layouts
from meshplan.experts.tp_styles import ExpertsTensorParallel, IdentityExpertParallel
from meshplan.introspection.experts import find_expert_modules
from meshplan.plans.hf_translation import hf_tp_plan, translate_hf_plan
from meshplan.plans.mixtral import mixtral_plan
from tests.experts.helpers import experts_module_parity
from tests.plans.helpers import build


def tiny(model_type: str):
    return build_model(tiny_config(model_type))


def test_experts_modules_and_layouts_are_read_off_transformers_models():
    mixtral = build("mixtral")
    assert [name for name, _ in find_expert_modules(mixtral)] == ["model.layers.0.mlp.experts",
                                                                  "model.layers.1.mlp.experts"]  # not the routers
    assert infer_param_layouts(mixtral.model.layers[0].mlp.experts) == {
        "gate_up_proj": ExpertParamLayout(1, 2), "down_proj": ExpertParamLayout(2)}
    _, gpt_oss = next(find_expert_modules(tiny("gpt_oss")))  # [E, in, out], gate/up interleaved, biases
    assert infer_param_layouts(gpt_oss) == {"gate_up_proj": ExpertParamLayout(2), "down_proj": ExpertParamLayout(1),
                                            "gate_up_proj_bias": ExpertParamLayout(1), "down_proj_bias": SUMMAND}


@pytest.mark.distributed
def test_transposed_interleaved_biased_and_gateless_experts_match_single_process(ranks2):
    """GPT-OSS (``[E, in, out]`` weights, interleaved gate/up, a ``down_proj_bias`` added once), Nemotron-H
    (``up_proj`` only) and Mixtral, under each transformers experts implementation: output, input and
    routing-weight gradients and every parameter gradient."""
    cases = [(model_type, implementation) for model_type in ("gpt_oss", "nemotron_h", "mixtral")
             for implementation in ("eager", "batched_mm", "grouped_mm")]
    results = ranks2.run(experts_module_parity, cases, timeout=300)[0]
    assert len(results) == len(cases)
    for case, result in results.items():
        assert isinstance(result, tuple), f"{case}: {result}"
        assert result[0] <= 1e-5, f"{case}: {result[1]} relative error {result[0]:.2e}"


def test_hugging_face_identity_experts_and_experts_it_cannot_split():
    longcat = translate_hf_plan(tiny("longcat_flash")).styles
    assert isinstance(longcat["model.layers.*.mlp.experts"], ExpertsTensorParallel)
    assert isinstance(longcat["model.layers.*.mlp.experts.identity_expert"], IdentityExpertParallel)

    model = build("mixtral")
    for _, experts in find_expert_modules(model):
        experts.has_post_expert_norm = True  # a norm of partial sums would be wrong: stays replicated
    plan = translate_hf_plan(model)
    assert "model.layers.*.mlp.experts" not in plan.styles
    assert "has_post_expert_norm" in plan.left_replicated["model.layers.*.mlp.experts"]


def test_gate_up_parameters_are_packed_as_the_forward_reads_them():
    """Inkling's plans say ``colwise`` for a ``gate_up_proj`` its forward splits with ``chunk(2)``: split as one
    part, one rank would keep every gate and the other every up projection (logits rel. error 0.9). The fallback
    packs it in two parts and records why; an explicit layout with other parts is refused."""
    for model_type in ("inkling2_text", "inkling_text"):
        plan = translate_hf_plan(tiny(model_type))
        assert plan.styles["model.layers.*.mlp.experts"].params["gate_up_proj"] == ExpertParamLayout(1, 2)
        assert "[gate; up]" in plan.corrected["model.layers.*.mlp.experts.gate_up_proj"]
    assert not translate_hf_plan(build("mixtral")).corrected  # packed_colwise: taken at its word
    experts = build("mixtral").model.layers[0].mlp.experts
    with pytest.raises(PlanError, match=r"gate_up_proj is \[gate; up\].*2 packed part\(s\), not 1"):
        ExpertsTensorParallel({"gate_up_proj": ExpertParamLayout(1)}).check(experts, 2)
    _, gpt_oss = next(find_expert_modules(tiny("gpt_oss")))  # interleaved: two packed parts would be wrong
    with pytest.raises(PlanError, match="interleaved"):
        ExpertsTensorParallel({"gate_up_proj": ExpertParamLayout(2, 2)}).check(gpt_oss, 2)


def test_tp_size_not_dividing_the_expert_intermediate_size_fails_in_prepare(fake_pg):
    """``prepare`` runs no collective: the same typed error on every rank, naming the parameter."""
    model = build("mixtral", intermediate_size=21)  # gate_up_proj [4, 42, 64]: 21 per packed part
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard_cp", "tp"))
        with pytest.raises(TensorParallelSizeError, match=r"gate_up_proj .*intermediate size \(21 per packed part"):
            meshplan.prepare(model, mesh)
    with pytest.raises(PlanError, match="no parameter 'gate_proj'"):
        ExpertsTensorParallel({"gate_proj": ExpertParamLayout(1)}).check(model.model.layers[0].mlp.experts, 2)


def test_moe_plans_derive_sequence_parallel_with_gathered_moe_blocks():
    """The MoE block (dense or sparse layer alike) gathers the sequence as a plain tensor and returns its slice;
    its row-wise projections (dense MLP, shared experts) keep all-reducing; attention still reduce-scatters."""
    from torch.distributed.tensor import Replicate, Shard

    from meshplan.tensor_parallel.styles.composition import ChainedStyles
    from meshplan.tensor_parallel.styles.hidden_states import PrepareHiddenStatesOutput

    plan = hf_tp_plan(tiny("glm4_moe_lite"), sequence_parallel=True)
    block = plan["model.layers.*.mlp"]
    assert isinstance(block, ChainedStyles) and isinstance(block.styles[1], PrepareHiddenStatesOutput)
    assert block.styles[0].use_local_output and block.styles[1].desired_output_layouts == (Shard(1),)
    assert plan["model.layers.*.mlp.down_proj"].output_layouts == (Replicate(),)
    assert plan["model.layers.*.self_attn.o_proj"].output_layouts == (Shard(1),)
    assert "model.layers.*.mlp" in mixtral_plan(build("mixtral"), sequence_parallel=True)
