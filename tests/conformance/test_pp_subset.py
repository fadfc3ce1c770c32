"""The CI subset of the conformance sweep's PP=2 column (``bench/conformance.py --pp``,
``meshplan/conformance/pipeline_check.py``): per-layer attention kinds read positionally from
``config.layer_types`` (Cohere 2, Qwen3-Next's hybrid linear attention, MiniMax, whose stage 1 raised on one rank
only and hung the other), a multimodal model split at its text config's plan (Gemma 3), hyper-connection streams
between stages (DeepSeek-V4), and a model refused before any collective (Gemma 4's per-layer inputs)."""

from __future__ import annotations

import pytest

from meshplan.conformance.check import merge_rank_results
from meshplan.conformance.pipeline_check import check_architecture_pp

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("model_type", ["cohere2", "qwen3_next", "minimax", "gemma3", "deepseek_v4"])
def test_pp2_matches_one_process_running_the_same_microbatches(ranks2, model_type):
    result = merge_rank_results(ranks2.run(check_architecture_pp, model_type, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    assert result["max_error"] < 1e-6  # 0 on the sweep machine: the pipeline adds no rounding to accumulation
    assert result["whole_batch_error"] < 1e-5


def test_modules_outside_the_pp_plan_are_refused_on_every_rank_before_the_schedule(ranks2):
    results = ranks2.run(check_architecture_pp, "gemma4_text", timeout=240)
    assert [r["stage"] for r in results] == ["PP split", "PP split"]
    assert all("PipelineSplitError" in r["reason"] and "embed_tokens_per_layer" in r["reason"] for r in results)
