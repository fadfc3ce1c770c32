"""The CI subset of the conformance sweep's EP=2 column (``bench/conformance.py``,
``meshplan/conformance/expert_check.py``):
EP plans read from transformers' ``base_model_ep_plan`` by the Hugging Face fallback, for MoE variants the parity
tests do not cover: expert biases (GPT-OSS), a shared expert beside the routed ones (Qwen2-MoE), Granite's own
experts class, a hybrid Mamba/attention stack (Jamba) and a dense-by-default config switched to its MoE variant
(Gemma 4)."""

from __future__ import annotations

import pytest

from meshplan.conformance.check import merge_rank_results
from meshplan.conformance.expert_check import check_architecture_ep

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen2_moe", "granitemoe", "jamba", "gemma4_text"])
def test_ep2_matches_single_process(ranks2, model_type):
    result = merge_rank_results(ranks2.run(check_architecture_ep, model_type, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    assert "hf_ep_plan" in result["plan_source"], result["plan_source"]
    assert result["sharded_fraction"] > 0.2, "EP splits (almost) nothing"
