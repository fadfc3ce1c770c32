"""More TP ranks than key/value heads: KV heads replicated (``meshplan.tensor_parallel.kv_replication``).

Parity: 3 SGD steps in fp32 against one process (every loss, gathered gradient and gathered parameter within 1e-5
relative), checked on every rank, since the ranks sharing a KV head and those holding another one compute
differently: at TP=2 MQA Llama (with and without sequence parallel), Qwen2 (k/v biases) and Gemma2 (the Hugging Face
fallback's plan); Qwen3 (per-head k_norm) with 2 KV heads at TP=4; MQA Llama under FSDP2 (dp_shard=2 x tp=2) with
activation checkpointing. Refusals come before any collective.
"""

from __future__ import annotations

import logging

import pytest
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import meshplan
from meshplan import TensorParallelSizeError
from meshplan.tensor_parallel.kv_replication import ReplicatedKeyValueAttention, ReplicatedKeyValueProjection
from meshplan.tensor_parallel.styles.traits import predicted_placement
from tests.plans.helpers import build
from tests.support import TensorParallelOnly, tp_mesh

RTOL = 1e-5
MQA = {"num_key_value_heads": 1}


def _worst_over_ranks(results: list[list[dict | str]], index: int) -> dict:
    """The case ``index`` of every rank's results: its worst errors over the ranks (an error text fails)."""
    cases = [rank[index] for rank in results]
    for case in cases:
        assert isinstance(case, dict), case
    return {"loss": max(c["loss"] for c in cases), "grad": max(c["grad"] for c in cases),
            "param": max(c["param"] for c in cases)}


def _assert_parity(results: list[list[dict | str]], cases: list[tuple]) -> None:
    for index, case in enumerate(cases):
        worst = _worst_over_ranks(results, index)
        assert worst["loss"] <= RTOL, f"{case}: loss relative error {worst['loss']:.2e}"
        for what in ("grad", "param"):
            error, name = worst[what]
            assert error <= RTOL, f"{case}: {what} {name} relative error {error:.2e}"


@pytest.mark.distributed
def test_tp2_with_one_kv_head_matches_single_process(ranks2):
    from tests.experts.helpers import sgd_parity_cases

    tp2 = {"dp_shard_cp": 1, "tp": 2}
    cases = [("llama", tp2, {}, MQA), ("llama", tp2, {"sequence_parallel": True}, MQA), ("qwen2", tp2, {}, MQA),
             ("gemma2", tp2, {}, MQA)]
    _assert_parity(ranks2.run(sgd_parity_cases, cases, timeout=600), cases)


@pytest.mark.distributed
def test_tp4_with_two_kv_heads_and_fsdp2_match_single_process(ranks4):
    """Ranks 0-1 share KV head 0 and ranks 2-3 KV head 1 (Qwen3, whose k_norm gradient is summed over TP); MQA
    Llama with its replicated k/v projections sharded by FSDP2 along dp_shard, each layer recomputed in backward."""
    from tests.experts.helpers import sgd_parity_cases

    cases = [("qwen3", {"dp_shard_cp": 1, "tp": 4}, {}, {"num_attention_heads": 4, "num_key_value_heads": 2}),
             ("llama", {"dp_shard_cp": 2, "tp": 2}, {"activation_checkpointing": "full"}, MQA)]
    _assert_parity(ranks4.run(sgd_parity_cases, cases, timeout=600), cases)


@pytest.fixture
def mesh2(fake_pg):
    meshplan.register_strategy(TensorParallelOnly)
    with fake_pg(2):
        yield tp_mesh()


def test_fitted_plan_replicates_kv_projections_and_says_so(mesh2, caplog):
    """The built-in Llama plan's column-wise k/v styles become replicated projections, the attention module gets the
    local KV head count, explain's placement prediction says Replicate; logged once at INFO."""
    model = build("llama", **MQA)
    with caplog.at_level(logging.INFO, logger="meshplan"):
        plan = meshplan.prepare(model, mesh2, strategy="tp_test").plan
    assert caplog.text.count("TP=2 exceeds the 1 key/value head(s) of 2 attention module(s)") == 1, caplog.text
    kv = {key: style for key, style in plan.styles.items() if key.endswith(("k_proj", "v_proj"))}
    assert {type(s) for s in kv.values()} == {ReplicatedKeyValueProjection}, plan.styles
    assert isinstance(plan.styles["model.layers.*.self_attn"], ReplicatedKeyValueAttention), plan.styles
    assert plan.matches["model.layers.*.self_attn"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    k_proj = model.model.layers[0].self_attn.k_proj
    assert predicted_placement(kv["model.layers.*.self_attn.k_proj"], k_proj, "weight") == str(Replicate())
    assert "model.layers.0.self_attn.k_proj" in plan.replicated_linears


def test_sequence_parallel_chains_the_attention_styles(mesh2):
    plan = meshplan.prepare(build("llama", **MQA), mesh2, strategy="tp_test", sequence_parallel=True).plan
    attention = repr(plan.styles["model.layers.*.self_attn"])
    assert attention.startswith("ChainedStyles(PrepareHiddenStates") and "ReplicatedKeyValueAttention" in attention


def test_kv_heads_that_neither_divide_nor_are_divided_are_refused(mesh2):
    message = r"num_key_value_heads \(3\) must be divisible by TP size \(2\), or divide it .* head count: \[1, 3, 6\]"
    with pytest.raises(TensorParallelSizeError, match=message):
        meshplan.prepare(build("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3), mesh2,
                         strategy="tp_test")


def test_fused_qkv_projection_is_refused(mesh2):
    """Phi-3's fused qkv_proj cannot keep whole KV heads per rank."""
    with pytest.raises(TensorParallelSizeError, match=r"self_attn \(Phi3Attention\) has 1 key/value head.*fused qkv"):
        meshplan.prepare(build("phi3", **MQA), mesh2, strategy="tp_test")


def test_a_key_norm_over_all_kv_heads_is_refused(fake_pg):
    """OLMo2's k_norm normalizes the whole k_proj output: with k_proj split by heads it would lack the other head."""
    plan = {"model.layers.*.self_attn.q_proj": ColwiseParallel(), "model.layers.*.self_attn.k_proj": ColwiseParallel(),
            "model.layers.*.self_attn.v_proj": ColwiseParallel(), "model.layers.*.self_attn.o_proj": RowwiseParallel()}
    meshplan.register_strategy(TensorParallelOnly)
    with fake_pg(4), pytest.raises(TensorParallelSizeError, match="its k_norm has parameters as wide as all 2"):
        meshplan.prepare(build("olmo2"), tp_mesh(), strategy="tp_test", tp_plan=plan)


def test_the_fitted_plan_can_be_passed_back_and_layers_are_found_inside_hybrids(mesh2):
    """The fitted plan's keys select exactly their modules, so ``prepared.plan.styles`` works as a ``tp_plan``;
    Jamba's ``JambaAttentionDecoderLayer`` is a layer, not the attention: its ``self_attn`` gets the replication."""
    from meshplan.conformance.check import build_model, tiny_config

    plan = meshplan.prepare(build("llama", **MQA), mesh2, strategy="tp_test").plan
    again = meshplan.prepare(build("llama", **MQA), mesh2, strategy="tp_test", tp_plan=dict(plan.styles)).plan
    assert again.matches == plan.matches
    config = tiny_config("jamba")
    config.num_key_value_heads, config.attn_layer_period, config.attn_layer_offset = 1, 2, 1  # layer 1: attention
    jamba = meshplan.prepare(build_model(config), mesh2, strategy="tp_test").plan
    attention = [fqn for key, found in jamba.matches.items()
                 if isinstance(jamba.styles[key], ReplicatedKeyValueAttention) for fqn in found]
    assert attention and all(fqn.endswith(".self_attn") for fqn in attention), attention


def test_gathered_keys_and_values_next_to_split_queries_are_refused(mesh2):
    plan = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise_gather_output",
            "model.layers.*.self_attn.v_proj": "colwise_gather_output", "model.layers.*.self_attn.o_proj": "rowwise"}
    with pytest.raises(TensorParallelSizeError, match="gathered while q_proj is split"):
        meshplan.prepare(build("llama", **MQA), mesh2, strategy="tp_test", tp_plan=plan)
