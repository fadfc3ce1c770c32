"""Every torch schedule on 2 gloo ranks (interleaved / V ones with 2 stages per rank) against one process:
3 SGD steps in fp32, the loss of every step and every gathered parameter within 1e-5."""

from __future__ import annotations

import pytest

from tests.parity import assert_parity
from tests.pipeline.harness import LLAMA4, pipeline_run, reference_run

SCHEDULES = {"GPipe": 1, "1F1B": 1, "Interleaved1F1B": 2, "LoopedBFS": 2, "InterleavedZeroBubble": 2,
             "ZBVZeroBubble": 2, "DualPipeV": 2}


def _all_schedules():
    return {name: pipeline_run(LLAMA4, {"pp": 2, "dp_shard": 1},
                               {"pp_schedule": name, "pp_microbatches": 4, "pp_stages_per_rank": spr})
            for name, spr in SCHEDULES.items()}


@pytest.fixture(scope="module")
def reference():
    return reference_run(LLAMA4)


def test_every_schedule_matches_one_process(ranks2, reference) -> None:
    results = ranks2.run(_all_schedules, timeout=900)
    for rank in results:
        for name, result in rank.items():
            try:
                assert_parity(result, reference)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from exc
