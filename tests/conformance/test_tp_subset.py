"""The CI subset of the conformance sweep (``bench/conformance.py``): the same TP=2 forward + backward parity
check, for the built-in providers and a few architectures served by the Hugging Face fallback."""

from __future__ import annotations

import pytest

from meshplan.conformance.check import check_architecture, merge_rank_results, tiny_config

pytestmark = pytest.mark.distributed

#: model type -> the plugin whose provider must serve it
BUILTIN = {"llama": "meshplan.plans.llama", "mistral": "meshplan.plans.llama", "qwen2": "meshplan.plans.qwen",
           "qwen3": "meshplan.plans.qwen", "gemma3_text": "meshplan.plans.gemma3", "phi3": "meshplan.plans.phi3",
           "mixtral": "meshplan.plans.mixtral", "qwen3_moe": "meshplan.plans.qwen3_moe",
           "deepseek_v3": "meshplan.plans.deepseek", "inkling2_text": "meshplan.plans.inkling"}
#: without a built-in provider: tied embeddings + biases, softcapping, MoE experts + shared expert, MLA + MoE with
#: identity experts (Inkling 2's built-in plan translates its transformers plan: experts whose plan says ``colwise``
#: for a concatenated ``[gate; up]`` with a softcapped SwiGLU)
FALLBACK = ("starcoder2", "gemma2", "qwen2_moe", "longcat_flash")


@pytest.mark.parametrize("model_type", [*BUILTIN, *FALLBACK])
def test_tp2_matches_single_process(ranks2, model_type):
    result = merge_rank_results(ranks2.run(check_architecture, model_type, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    provider = BUILTIN.get(model_type, "meshplan.plans.hf")
    assert provider in result["plan_source"], result["plan_source"]
    assert (provider == "meshplan.plans.hf") == ("meshplan.plans.hf" in result["plan_source"]), result["plan_source"]
    assert result["sharded_fraction"] > 0.2, "the plan shards (almost) nothing"


def test_gemma3n_keeps_the_mlps_of_sparse_layers_whole(ranks2):
    """Activation sparsity thresholds over all intermediate features: with the MLPs of sparse layers split by
    TP, logits were 0.5 off. Gradients of the per-head norms, summed over TP ranks, round to ~1e-5 here."""
    result = merge_rank_results(ranks2.run(check_architecture, "gemma3n_text", 3e-5, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    assert "meshplan.plans.gemma3n" in result["plan_source"] and result["logits_error"] < 1e-5


def test_tiny_configs_divide_by_tp_size():
    for model_type in [*BUILTIN, *FALLBACK]:
        text = tiny_config(model_type).get_text_config()
        assert text.num_attention_heads % 2 == 0 and text.num_key_value_heads % 2 == 0
        assert text.num_hidden_layers <= 4 and text.vocab_size <= 256
