"""Experts split by tensor parallelism: tiny Mixtral, Qwen3-MoE and DeepSeek-V3 (top-2 of 4 experts, uneven
tokens per expert) with TP=2 against one process, 3 SGD steps in fp32: every loss, every gathered gradient and
every gathered parameter within 1e-5 relative. Plans come from the built-in providers. Also FSDP2 with more
data-parallel ranks than experts."""

from __future__ import annotations

import pytest

from tests.experts.helpers import sgd_parity_cases

pytestmark = pytest.mark.distributed

RTOL = 1e-5
TP2 = {"dp_shard_cp": 1, "tp": 2}
PROVIDERS = {"mixtral": "mixtral_plan", "qwen3_moe": "qwen3_moe_plan", "deepseek_v3": "deepseek_plan"}


def test_builtin_moe_providers_match_single_process(ranks2):
    """TP=2 for each family (DeepSeek with and without q-LoRA); and FSDP over 2 ranks of Mixtral with 3 experts,
    whose fused parameters are then sharded on dim 1 (even shards) rather than on the expert dim."""
    cases = [(name, TP2, {}, {}) for name in PROVIDERS]
    cases.append(("deepseek_v3", TP2, {}, {"q_lora_rank": None}))  # MLA without q-LoRA: q_proj column-wise
    cases.append(("mixtral", {"dp_shard_cp": 2}, {}, {"num_local_experts": 3}))
    results = ranks2.run(sgd_parity_cases, cases, timeout=600)[0]
    for (name, mesh, _, _), result in zip(cases, results):
        assert isinstance(result, dict), f"{name}: {result}"
        if "tp" in mesh:
            assert PROVIDERS[name] in result["source"], f"{name}: planned by {result['source']}"
        assert result["loss"] <= RTOL, f"{name}: loss relative error {result['loss']:.2e}"
        (grad, grad_name), (param, param_name) = result["grad"], result["param"]
        assert grad <= RTOL, f"{name}: gradient of {grad_name} relative error {grad:.2e}"
        assert param <= RTOL, f"{name}: parameter {param_name} relative error {param:.2e}"
        for counts in result["tokens_per_expert"]:  # the router is not degenerate: every expert, unevenly
            assert min(counts) > 0 and len(set(counts)) > 1, f"{name}: tokens per expert {counts}"


def test_tp_experts_under_fsdp_and_activation_checkpointing(ranks4):
    """DeepSeek-V3 on dp_shard=2 x tp=2 with full activation checkpointing: the experts' local forward runs on
    the parameters FSDP2 all-gathers, also when the block is recomputed in backward."""
    cases = [("deepseek_v3", {"dp_shard_cp": 2, "tp": 2}, {"activation_checkpointing": "full"}, {})]
    result = ranks4.run(sgd_parity_cases, cases, timeout=600)[0][0]
    assert isinstance(result, dict), result
    assert max(result["loss"], result["grad"][0], result["param"][0]) <= RTOL, result


def test_sequence_parallel_with_moe_layers(ranks2):
    """TP=2 with sequence parallel: the MoE blocks gather the sequence and return their slice; the same numbers
    as one process for each built-in family."""
    cases = [(name, TP2, {"sequence_parallel": True}, {}) for name in PROVIDERS]
    results = ranks2.run(sgd_parity_cases, cases, timeout=600)[0]
    for (name, *_), result in zip(cases, results):
        assert isinstance(result, dict), f"{name}: {result}"
        assert max(result["loss"], result["grad"][0], result["param"][0]) <= RTOL, f"{name}: {result}"
