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
    # expert biases; the down-projection bias is a summand under TP (each TP rank adds half)
    "gpt_oss": ModelSpec("gpt_oss", overrides={"num_local_experts": 4, "num_experts_per_tok": 2,
                                               "layer_types": ["sliding_attention", "full_attention"]}),
}


#: TP plans that leave the experts whole, so EP borrows the TP ranks whatever the built-in providers do with them.
ATTENTION_TP = {**{f"model.layers.*.self_attn.{name}": "colwise" for name in ("q_proj", "k_proj", "v_proj")},
                "model.layers.*.self_attn.o_proj": "rowwise"}
QK_NORMS = {"model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
            "model.layers.*.self_attn.k_norm": "replicated_with_grad_allreduce"}
DEEPSEEK_MLP_TP = {"model.layers.0.mlp.gate_proj": "colwise", "model.layers.0.mlp.up_proj": "colwise",
                   "model.layers.0.mlp.down_proj": "rowwise", "model.layers.*.mlp.shared_experts.gate_proj": "colwise",
                   "model.layers.*.mlp.shared_experts.up_proj": "colwise",
                   "model.layers.*.mlp.shared_experts.down_proj": "rowwise"}
EXPERTS_WHOLE_TP = {"mixtral": ATTENTION_TP, "qwen3_moe": ATTENTION_TP | QK_NORMS, "deepseek_v3": DEEPSEEK_MLP_TP}


#: GPT-OSS's transformers TP plan leaves its (transposed, biased) experts whole: split them explicitly.
EXPERTS_SPLIT_TP = {"gpt_oss": {"tp_plan": {"model.layers.*.mlp.experts": "moe_tp_experts"}}}


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
    _check(ranks2, name, {"dp_shard": 1, "tp": 2}, ep_size=2, tp_plan=EXPERTS_WHOLE_TP[name])


FOUR_RANKS = {
    "ep2-dp_shard4": ({"dp_shard": 4}, {"ep_size": 2}),
    "ep2-hsdp2x2": ({"dp_replicate": 2, "dp_shard": 2}, {"ep_size": 2}),
    "ep4-dp_shard2-tp2": ({"dp_shard": 2, "tp": 2}, {"ep_size": 4, "tp_plan": ATTENTION_TP | QK_NORMS}),
    "ep2-dp_shard2-tp2": ({"dp_shard": 2, "tp": 2}, {"ep_size": 2, "tp_plan": ATTENTION_TP | QK_NORMS}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_ranks(ranks4, case):
    mesh, kwargs = FOUR_RANKS[case]
    _check(ranks4, "qwen3_moe", mesh, **kwargs)


def experts_layout(mesh_shape: dict[str, int], name: str, kwargs: dict) -> tuple:
    """Runs on every rank: the mesh dims and placements of the first experts module's ``gate_up_proj``."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    model = meshplan.parallelize(MOE[name].build(), mesh, **kwargs)
    param = model.model.layers[-1].mlp.experts.gate_up_proj
    return param.device_mesh.mesh_dim_names, tuple(map(repr, param.placements))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(MOE))
def test_ep2_x_tp2_with_experts_split_by_tp(ranks4, name):
    """ep=2 from dp_shard=2, and TP=2 splitting every expert along its intermediate size (the built-in TP plans
    shard the experts), so each rank holds half of the experts' intermediate features of half of the experts."""
    pytest.importorskip("meshplan.experts.tp_styles", reason="needs the expert TP styles (moe_tp_experts)")
    mesh = {"dp_shard": 2, "tp": 2}
    options = {"ep_size": 2, **EXPERTS_SPLIT_TP.get(name, {})}
    dims, placements = ranks4.run(experts_layout, mesh, name, options)[0]
    assert dims == ("expert_dp_shard", "ep", "tp") and placements[1] == "Shard(dim=0)", (dims, placements)
    # the intermediate dim: down_proj's, or gate_up_proj's [gate; up] (equal packed parts: a _StridedShard)
    assert placements[2] in ("Shard(dim=2)", "_StridedShard(dim=1, sf=2)"), placements
    _check(ranks4, name, mesh, **options)


@pytest.mark.distributed
def test_ep2_with_activation_checkpointing(ranks2):
    """Recomputing a block in backward repeats its token exchange; the results stay those of one process."""
    _check(ranks2, "qwen3_moe", {"dp_shard": 2}, ep_size=2, activation_checkpointing="full",
           activation_checkpointing_every=1)


@pytest.mark.distributed
def test_ep2_bf16_default_policy_tracks_fp32(ranks2):
    """The default policy (bf16 compute, fp32 reduction) with EP: losses within 1e-3 relative of fp32, and not
    bitwise equal (bf16 was in effect)."""
    result = ranks2.run(distributed, MOE["mixtral"], {"dp_shard": 2}, {"ep_size": 2}, lr=LR, optimizer="sgd",
                        timeout=240)[0]
    for got, want in zip(result.losses, _reference("mixtral").losses):
        assert got != want and abs(got - want) <= 1e-3 * abs(want), (got, want)


@pytest.mark.distributed
def test_ep2_x_tp2_with_sequence_parallel(ranks4):
    """Sequence parallel on top: the MoE block gathers the sequence before its experts exchange tokens."""
    _check(ranks4, "qwen3_moe", {"dp_shard": 2, "tp": 2}, ep_size=2, sequence_parallel=True)
