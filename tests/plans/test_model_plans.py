"""TP=2 forward + backward parity of the built-in plans for Gemma 4, Inkling and ZAYA (tiny configs of
``meshplan/conformance/check.py``), with the share of parameter elements each plan must shard."""

from __future__ import annotations

import pytest

from meshplan.conformance.check import check_architecture, merge_rank_results

pytestmark = pytest.mark.distributed

#: model type -> (the plugin whose provider must serve it, the least sharded fraction of parameter elements)
PLANS = {
    "gemma4_text": ("meshplan.plans.gemma4", 0.95),
    "gemma4": ("meshplan.plans.gemma4", 0.8),
    "zaya": ("meshplan.plans.zaya", 0.9),
    # attention split by heads; a vocab-parallel embedding that normalizes its lookup (VocabParallelEmbedding); shared
    # experts weighted by the router's gammas
    "inkling_text": ("meshplan.plans.inkling", 0.85),
    "inkling2_text": ("meshplan.plans.inkling", 0.85),
    # the MoE block adds the routed output in place to the shared expert's (row-wise) output
    "llama4_text": ("meshplan.plans.llama4", 0.95),
}


@pytest.mark.parametrize("model_type", PLANS)
def test_tp2_matches_single_process(ranks2, model_type):
    provider, least_sharded = PLANS[model_type]
    result = merge_rank_results(ranks2.run(check_architecture, model_type, timeout=240))
    assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
    assert provider in result["plan_source"], result["plan_source"]
    assert result["sharded_fraction"] >= least_sharded, result["sharded_fraction"]


@pytest.mark.parametrize(("model_type", "plan", "why"), [
    ("gemma4_text", "meshplan.plans.gemma4:gemma4_plan", "per-layer inputs"),
    ("inkling2_text", "meshplan.plans.inkling:inkling_plan", "short convolutions"),
    ("zaya", "meshplan.plans.zaya:zaya_plan", "attention stays whole"),
])
def test_sequence_parallel_is_refused_with_the_reason(model_type, plan, why):
    from meshplan.conformance.check import build_model, tiny_config
    from meshplan.core.errors import SequenceParallelUnsupportedError
    from meshplan.core.imports import import_class_from_path

    with pytest.raises(SequenceParallelUnsupportedError, match=why):
        import_class_from_path(plan)(build_model(tiny_config(model_type)), sequence_parallel=True)


def test_head_styles_refuse_counts_that_do_not_divide_before_any_collective():
    from torch import nn

    from meshplan.core.errors import PlanError, TensorParallelSizeError
    from meshplan.tensor_parallel.styles.composition import ChainedStyles
    from meshplan.tensor_parallel.styles.local_parameters import LocalShardedParameters
    from meshplan.tensor_parallel.styles.module_state import LocalHeadCount

    module = nn.Module()
    module.num_heads = 3
    module.conv1d = nn.Conv1d(6, 6, 2, groups=6, bias=False)
    with pytest.raises(TensorParallelSizeError, match="num_heads = 3"):
        ChainedStyles(LocalHeadCount(), LocalShardedParameters({"conv1d.weight": 0})).check(module, 2)
    LocalShardedParameters({"conv1d.weight": 0}).check(module, 2)  # 6 channels split in 2
    with pytest.raises(TensorParallelSizeError, match="cannot be split in 4"):
        LocalShardedParameters({"conv1d.weight": 0}).check(module, 4)
    with pytest.raises(PlanError, match="no parameter 'conv1d.bias'"):
        LocalShardedParameters({"conv1d.bias": 0}).check(module, 2)
