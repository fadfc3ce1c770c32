"""TP=2 forward + backward parity of the built-in plans for Gemma 4, Inkling and ZAYA (tiny configs of
``tests/conformance_check.py``), with the share of parameter elements each plan must shard."""

from __future__ import annotations

import pytest

from tests.conformance_check import check_architecture, merge_rank_results

pytestmark = pytest.mark.distributed

#: model type -> (the plugin whose provider must serve it, the least sharded fraction of parameter elements)
PLANS = {
    "gemma4_text": ("meshplan.plans.gemma4", 0.95),
    "gemma4": ("meshplan.plans.gemma4", 0.8),
    "zaya": ("meshplan.plans.zaya", 0.8),
    # attention split by heads; a vocab-parallel embedding that normalizes its lookup (VocabParallelEmbedding)
    "inkling_text": ("meshplan.plans.inkling", 0.75),
    "inkling2_text": ("meshplan.plans.inkling", 0.85),
}


@pytest.mark.parametrize("model_type", PLANS)
def test_tp2_matches_single_process(ranks2, model_type):
    provider, least_sharded = PLANS[model_type]
    result = merge_rank_results(ranks2.run(check_architecture, model_type, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    assert provider in result["plan_source"], result["plan_source"]
    assert result["sharded_fraction"] >= least_sharded, result["sharded_fraction"]
