"""``meshplan.grad_norm`` / ``meshplan.clip_grad_norm_`` of a ``PipelineModel`` (the norm sums over the pipeline
stages) against ``torch.nn.utils.clip_grad_norm_`` on the one-process model, within 1e-6 relative."""

from __future__ import annotations

from tests.pipeline.clip_ranks import pipeline_clip_parity

OPTIONS = {"pp_schedule": "1F1B", "pp_microbatches": 2}


def _check(results) -> None:
    for rank, errors in enumerate(results):
        assert max(errors.values()) <= 1e-6, f"rank {rank}: {errors}"


def test_pipeline_clip_matches_one_process(ranks2) -> None:
    _check(ranks2.run(pipeline_clip_parity, {"pp": 2, "dp_shard": 1}, OPTIONS, timeout=240))


def test_pipeline_fsdp_clip_matches_one_process(ranks4) -> None:
    _check(ranks4.run(pipeline_clip_parity, {"pp": 2, "dp_shard": 2}, OPTIONS, timeout=240))
