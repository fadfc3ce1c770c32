"""TP=2 and TP=2+SP against one process: logits, every gradient, and the model after one SGD step."""

from __future__ import annotations

import pytest

from tests.plans.helpers import BUILTIN, Parity, parity_cases

pytestmark = pytest.mark.distributed

RTOL = 1e-5
PROVIDERS = {"llama": "llama_plan", "mistral": "llama_plan", "qwen2": "llama_plan", "qwen3": "qwen3_plan",
             "gemma3": "gemma3_plan", "gemma3_vlm": "gemma3_plan", "phi3": "phi3_plan",
             "gemma3_odd_vocab": "gemma3_plan"}
FALLBACK = [("starcoder2", False), ("starcoder2", True), ("gpt_neox", False), ("gpt_neox", True),
            ("olmo2", False), ("gemma2", False)]


def check(results: dict, case: tuple[str, bool], provider: str) -> None:
    result = results[case]
    assert isinstance(result, Parity), f"{case}: {result}"
    assert provider in result.source, f"{case}: planned by {result.source}"
    assert result.logits <= RTOL, f"{case}: logits relative error {result.logits:.2e}"
    assert result.grads <= RTOL, f"{case}: gradient of {result.worst_grad} relative error {result.grads:.2e}"
    assert result.params_after_step <= RTOL, f"{case}: parameters after SGD step {result.params_after_step:.2e}"
    assert result.logits_after_step <= RTOL, f"{case}: logits after SGD step {result.logits_after_step:.2e}"
    assert result.same_parameters, f"{case}: parameter set changed (a tie broke?)"


def test_builtin_providers_match_single_process(ranks2):
    """Every built-in provider, plus a tied vocabulary of 255 rows (uneven vocab-parallel shards on 2 ranks)."""
    cases = [(name, sp) for name in (*BUILTIN, "gemma3_odd_vocab") for sp in (False, True)]
    results = ranks2.run(parity_cases, cases, timeout=600)[0]
    for case in cases:
        check(results, case, PROVIDERS[case[0]])


def test_hugging_face_fallback_matches_single_process(ranks2):
    """Architectures without a built-in provider (two with tied embeddings, one with fused per-head qkv);
    sequence parallel derived from their transformers plans."""
    results = ranks2.run(parity_cases, FALLBACK, timeout=600)[0]
    for case in FALLBACK:
        check(results, case, "hf_tp_plan")
