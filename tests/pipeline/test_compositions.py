"""Pipeline parallelism composed with the other axes on 4 gloo ranks, against one process on the whole batch
(3 SGD steps, fp32, every loss and gathered parameter within 1e-5): pp=4, pp x FSDP, pp x TP with sequence
parallel, pp x EP (Qwen3-MoE, no auxiliary loss), pp x CP (packed rows and interleaved schedules:
tests/pipeline/test_context_parallel.py)."""

from __future__ import annotations

import pytest

from tests.parity import ModelSpec, assert_parity
from tests.pipeline.harness import LLAMA4, pipeline_run, reference_run

QWEN3_MOE = ModelSpec("qwen3_moe", overrides={"num_hidden_layers": 4, "moe_intermediate_size": 32, "num_experts": 4,
                                              "num_experts_per_tok": 2, "norm_topk_prob": True,
                                              "tie_word_embeddings": False})

#: name -> (model, mesh, options, data-parallel dims, context parallel)
CASES = {
    "pp4-1f1b": (LLAMA4, {"pp": 4, "dp_shard": 1}, {"pp_schedule": "1F1B", "pp_microbatches": 4}, (), False),
    "pp2-dp2": (LLAMA4, {"pp": 2, "dp_shard": 2}, {"pp_schedule": "1F1B", "pp_microbatches": 2}, ("dp_shard",), False),
    "pp2-hsdp": (LLAMA4, {"pp": 2, "dp_replicate": 2, "dp_shard": 1}, {"pp_schedule": "1F1B", "pp_microbatches": 2},
                 ("dp_replicate", "dp_shard"), False),
    "pp2-tp2-sp": (LLAMA4, {"pp": 2, "dp_shard": 1, "tp": 2},
                   {"pp_schedule": "GPipe", "pp_microbatches": 2, "sequence_parallel": True}, (), False),
    "pp2-ep2": (QWEN3_MOE, {"pp": 2, "dp_shard": 2}, {"pp_schedule": "1F1B", "pp_microbatches": 2, "ep_size": 2},
                ("dp_shard",), False),
    "pp2-cp2": (LLAMA4, {"pp": 2, "dp_shard": 1, "cp": 2}, {"pp_schedule": "1F1B", "pp_microbatches": 2}, (), True),
}


def _run_all():
    return {name: pipeline_run(spec, mesh, options, data_parallel=dp, cp=cp)
            for name, (spec, mesh, options, dp, cp) in CASES.items()}


_RESULTS: list = []


@pytest.fixture
def results(ranks4):
    """Every case in one call of the rank pool (run once, for the first test that asks)."""
    if not _RESULTS:
        _RESULTS.append(ranks4.run(_run_all, timeout=1200))
    return _RESULTS[0]


@pytest.mark.parametrize("case", list(CASES))
def test_composition_matches_one_process(results, case) -> None:
    expected = reference_run(CASES[case][0])
    for rank, result in enumerate(results):
        try:
            assert_parity(result[case], expected)
        except AssertionError as exc:
            raise AssertionError(f"rank {rank}: {exc}") from exc
