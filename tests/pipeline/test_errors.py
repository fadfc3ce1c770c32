"""Bad pipeline inputs raise typed errors before any collective (on a fake process group, where a collective
would hang or fail), and the pure planning functions (split, placement, bubble)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.core.errors import (
    MicrobatchError,
    PipelineScheduleError,
    PipelineSplitError,
    UnsupportedAxisError,
)
from meshplan.pipeline.schedules import bubble_fraction, resolve_schedule, schedule_names, stage_indices
from meshplan.pipeline.split import balanced_split
from tests.parity import ModelSpec
from tests.support import TinyStack

LLAMA4 = ModelSpec("llama", overrides={"num_hidden_layers": 4, "tie_word_embeddings": False})


def _parallelize(model, **options):
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
    return meshplan.parallelize(model, mesh, **options)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"pp_schedule": "2F2B"}, PipelineScheduleError, "Unknown pipeline schedule '2F2B'. torch provides: 1F1B, "
     "DualPipeV, GPipe, Interleaved1F1B, InterleavedZeroBubble, LoopedBFS, ZBVZeroBubble"),
    ({"pp_schedule": "1F1B", "pp_microbatches": 1}, PipelineScheduleError, "at least as many microbatches as stages"),
    ({"pp_schedule": "GPipe", "pp_stages_per_rank": 2}, PipelineScheduleError, "one stage per rank"),
    ({"pp_schedule": "ZBVZeroBubble", "pp_stages_per_rank": 3}, PipelineScheduleError, "exactly 2 stages per rank"),
    ({"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2, "pp_microbatches": 5}, PipelineScheduleError,
     "multiple of the rounds"),
    ({"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 4, "pp_microbatches": 8}, PipelineSplitError,
     "8 pipeline stages need at least as many blocks"),
    ({"pp_split": [4]}, PipelineSplitError, "out of range"),
    ({"pp_split": [0]}, PipelineSplitError, "out of range"),
    ({"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2, "pp_split": [3, 2, 1]}, PipelineSplitError,
     "strictly increasing"),
    ({"pp_split": [1, 2]}, PipelineSplitError, "must list 1 integer block indices"),
])
def test_bad_pipeline_options_raise_before_any_collective(fake_pg, options, error, match):
    with fake_pg(2):
        with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
            _parallelize(LLAMA4.build(), **options)


def test_a_model_without_a_split_names_the_ways_to_give_one(fake_pg):
    with fake_pg(2):
        with pytest.raises(PipelineSplitError, match="TinyStack has no pipeline split.*base_model_pp_plan.*'pp'"):
            _parallelize(TinyStack(depth=4), pp_loss_fn=torch.nn.functional.mse_loss)


def test_tied_embeddings_on_different_stages_are_refused(fake_pg):
    tied = ModelSpec("llama", overrides={"num_hidden_layers": 4, "tie_word_embeddings": True}).build()
    with fake_pg(2):
        with pytest.raises(PipelineSplitError, match=r"model.embed_tokens.weight \(stage 0\) and lm_head.weight "
                                                      r"\(stage 1\) are the same parameter"):
            _parallelize(tied)


def test_a_batch_that_does_not_split_into_microbatches_is_refused_before_the_schedule_runs(fake_pg):
    from meshplan.pipeline.model import PipelineModel

    with fake_pg(2):
        pipe = _parallelize(LLAMA4.build(), pp_microbatches=4)
        assert isinstance(pipe, PipelineModel)
        ids = torch.zeros(6, 8, dtype=torch.long)
        with pytest.raises(MicrobatchError, match="A batch of 6 does not split into 4 microbatches"):
            pipe.step(input_ids=ids, labels=ids)


def test_a_batch_entry_with_per_row_tensors_torch_cannot_split_is_refused(fake_pg):
    import dataclasses

    @dataclasses.dataclass
    class RowInfo:  # not a pytree node: torch would give every microbatch all rows
        weights: torch.Tensor

    with fake_pg(2):
        pipe = _parallelize(LLAMA4.build(), pp_microbatches=2)
        ids = torch.zeros(4, 8, dtype=torch.long)
        with pytest.raises(MicrobatchError, match=r"'row_info' \(RowInfo\) holds per-row tensors \['weights'\]"):
            pipe.step(input_ids=ids, labels=ids, row_info=RowInfo(torch.ones(4)))


def test_pp_on_a_strategy_that_does_not_declare_it_is_refused(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp"))
        with pytest.raises(UnsupportedAxisError, match="'ddp' does not support pipeline parallelism"):
            meshplan.parallelize(LLAMA4.build(), mesh, strategy="ddp")


def test_schedule_names_are_torchs():
    assert schedule_names() == ["1F1B", "DualPipeV", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble",
                                "LoopedBFS", "ZBVZeroBubble"]
    assert resolve_schedule("interleaved-1f1b").name == "Interleaved1F1B"


def test_stage_placement_loops_or_folds_into_a_v():
    assert [stage_indices(resolve_schedule("Interleaved1F1B"), 2, 2, r) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [stage_indices(resolve_schedule("ZBVZeroBubble"), 2, 2, r) for r in (0, 1)] == [[0, 3], [1, 2]]


def test_bubble_fractions():
    assert bubble_fraction("1F1B", 2, 8) == pytest.approx(1 / 9)
    assert bubble_fraction("GPipe", 4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction("Interleaved1F1B", 4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction("ZBVZeroBubble", 2, 4, 2) == pytest.approx(1 / 25)


def test_balanced_split_counts_the_embedding_and_the_head():
    # 8 equal blocks; the first stage also holds an embedding of 3 blocks' size, the last a head of 1 block
    assert balanced_split([1] * 8, 3, 1, 2) == [range(0, 3), range(3, 8)]
    assert balanced_split([1] * 8, 0, 0, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_demo_puts_the_pp_dim_outermost():
    from meshplan.cli.demo import DemoConfig, mesh_dims

    assert mesh_dims(DemoConfig(pp=2, tp=2), 8) == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 2}
    assert "--pp" in DemoConfig(pp=2).to_argv() and "1F1B" in DemoConfig(pp=2).to_argv()
