"""``meshplan.from_pretrained`` / ``load_pretrained`` / ``save_pretrained`` of a ``PipelineModel``: every stage
loads only its own layers, the saved folder holds every stage; both bitwise equal to transformers' own
``from_pretrained`` of the folder."""

from __future__ import annotations

from tests.pipeline.harness import LLAMA4
from tests.pipeline.hf_ranks import pipeline_hf_round_trip

OPTIONS = {"pp_schedule": "1F1B", "pp_microbatches": 2}


def _check(results) -> None:
    for rank, differing in enumerate(results):
        assert differing == {"loaded": [], "saved": []}, f"rank {rank}: {differing}"


def _folder(tmp_path) -> str:
    folder = tmp_path / "llama"
    LLAMA4.build().save_pretrained(folder)
    return str(folder)


def test_pipeline_loads_and_saves_hf_folder(ranks2, tmp_path) -> None:
    _check(ranks2.run(pipeline_hf_round_trip, _folder(tmp_path), str(tmp_path / "out"), {"pp": 2, "dp_shard": 1},
                      OPTIONS, timeout=240))


def test_pipeline_tp_loads_and_saves_hf_folder(ranks4, tmp_path) -> None:
    _check(ranks4.run(pipeline_hf_round_trip, _folder(tmp_path), str(tmp_path / "out"),
                      {"pp": 2, "dp_shard": 1, "tp": 2}, OPTIONS, timeout=240))
