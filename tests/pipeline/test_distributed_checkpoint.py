"""The distributed checkpoint of a ``PipelineModel`` with its optimizer state: saved under pp=2, loaded bitwise
under pp=2 and into the plain model under dp_shard=2 (the checkpoint does not depend on the pipeline layout)."""

from __future__ import annotations

from tests.pipeline.dcp_ranks import pipeline_checkpoint_round_trip


def test_pipeline_checkpoint_with_optimizer_reshards(ranks2, tmp_path) -> None:
    for rank, differing in enumerate(ranks2.run(pipeline_checkpoint_round_trip, str(tmp_path / "ckpt"),
                                                timeout=300)):
        assert differing == {"pp2": [], "dp_shard2": []}, f"rank {rank}: {differing}"
