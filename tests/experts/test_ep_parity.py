"""Expert parallelism with the fsdp2 strategy: parity with one process on gloo ranks.

Tiny Mixtral, Qwen3-MoE and DeepSeek-V3 configs (4 experts, top-2 routing, so tokens per expert are uneven and
change every step) train for 3 SGD steps in fp32; losses, first-step gradients and final parameters (gathered)
must match one process within 1e-5 relative. EP plans come from the models' own ``base_model_ep_plan`` through
the Hugging Face fallback provider.
"""

from __future__ import annotations

import functools

import pytest
from torch.distributed.fsdp import MixedPrecisionPolicy

from tests.parity import ModelSpec, RunResult, assert_grad_parity, assert_parity, distributed, reference

LR = 0.1
MOE = {
    "mixtral": ModelSpec("mixtral", overrides={"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ModelSpec("qwen3_moe", overrides={"num_experts": 4, "num_experts_per_tok": 2,
                                                   "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "deepseek_v3": ModelSpec("deepseek_v3", overrides={
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
        "moe_intermediate_size": 32, "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 16,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 4,
        "head_dim": 8}),
}


@functools.cache
def _reference(name: str) -> RunResult:
    return reference(MOE[name], lr=LR, capture_grads=True, optimizer="sgd")


def _check(pool, name: str, mesh: dict[str, int], **kwargs) -> None:
    kwargs = {"mp_policy": MixedPrecisionPolicy(), **kwargs}
    result = pool.run(distributed, MOE[name], mesh, kwargs, lr=LR, capture_grads=True, optimizer="sgd",
                      timeout=240)[0]
    expected = _reference(name)
    assert_parity(result, expected, rtol=1e-5)
    assert_grad_parity(result, expected, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(MOE))
def test_ep2(ranks2, name):
    _check(ranks2, name, {"dp_shard": 2}, ep_size=2)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_ep2_borrows_tp_ranks(ranks2, name):
    """tp=2 with the experts left whole by the TP plan: EP takes the TP ranks, each dispatching half the tokens."""
    _check(ranks2, name, {"dp_shard": 1, "tp": 2}, ep_size=2)


FOUR_RANKS = {
    "ep2-dp_shard4": ({"dp_shard": 4}, {"ep_size": 2}),
    "ep2-hsdp2x2": ({"dp_replicate": 2, "dp_shard": 2}, {"ep_size": 2}),
    "ep4-dp_shard2-tp2": ({"dp_shard": 2, "tp": 2}, {"ep_size": 4}),
    "ep2-dp_shard2-tp2": ({"dp_shard": 2, "tp": 2}, {"ep_size": 2}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_ranks(ranks4, case):
    mesh, kwargs = FOUR_RANKS[case]
    _check(ranks4, "qwen3_moe", mesh, **kwargs)
