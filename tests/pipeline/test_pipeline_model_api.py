"""``PipelineModel`` behaviour the parity harness does not show: ``step`` returns the same loss on every rank of the
pipeline (compared bitwise per rank, not averaged over ranks), ``eval_step`` returns one process's loss and leaves
gradients and parameters alone (also between two steps that accumulate), or is refused before any collective
where torch cannot run the schedule forward only (V schedules); an explicit ``pp_split`` is what the stages hold
and train."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

import meshplan
from meshplan.core.errors import PipelineScheduleError
from tests.parity import batches
from tests.pipeline.harness import BATCH, LLAMA4
from tests.pipeline.lockstep_ranks import FLOOR, RTOL, assert_lockstep_parity, build_pipeline, lockstep_parity
from tests.support import full, relative_error

PP2 = {"pp": 2, "dp_shard": 1}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``, compared without a collective (``torch.equal`` of two DTensors reduces over
    the default group)."""
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else _local(p.grad) for name, p in model.named_parameters()}


def _params(model) -> dict[str, torch.Tensor]:
    return {name: _local(p) for name, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> bool:
    return a.keys() == b.keys() and all(
        (a[n] is None and b[n] is None) or (a[n] is not None and b[n] is not None and torch.equal(a[n], b[n]))
        for n in a)


def step_and_eval(options: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank of pp=2, without an optimizer (gradients accumulate): ``eval_step`` on a fresh pipeline,
    ``step`` on one batch, ``eval_step`` twice on another, ``step`` on that one. The raw per-rank losses, one
    process's losses on the same batches, whether each ``eval_step`` kept gradients and parameters as they were,
    and the relative error of the accumulated gradients of this rank's stages."""
    reference = LLAMA4.build()
    pipe = build_pipeline(LLAMA4, PP2, options)
    first, second = batches(reference.config.vocab_size, 2, BATCH)
    result: dict[str, Any] = {"losses": [], "reference": []}

    def reference_loss(data: torch.Tensor, backward: bool) -> None:
        with torch.set_grad_enabled(backward):
            loss = reference(input_ids=data, labels=data, use_cache=False).loss
        if backward:
            loss.backward()
        result["reference"].append(float(loss.detach()))

    params = _params(pipe)
    result["losses"].append(float(pipe.eval_step(input_ids=first, labels=first)))
    reference_loss(first, backward=False)
    result["fresh_untouched"] = all(p.grad is None for p in pipe.parameters()) and _same(_params(pipe), params)

    result["losses"].append(float(pipe.step(input_ids=first, labels=first)))
    reference_loss(first, backward=True)

    grads, params = _grads(pipe), _params(pipe)
    for _ in range(2):  # the schedule switches to forward only, then runs forward only again
        result["losses"].append(float(pipe.eval_step(input_ids=second, labels=second)))
        reference_loss(second, backward=False)
    result["trained_untouched"] = all(g is not None for g in grads.values()) and _same(_grads(pipe), grads) and (
        _same(_params(pipe), params))

    result["losses"].append(float(pipe.step(input_ids=second, labels=second)))
    reference_loss(second, backward=True)
    expected = dict(reference.named_parameters())
    result["grad_error"] = max(relative_error(full(p.grad), expected[pipe.original_name(n)].grad, floor=FLOOR)
                               for n, p in pipe.named_parameters())
    return result


@pytest.mark.parametrize("options", [{"pp_schedule": "1F1B", "pp_microbatches": 2},
                                     {"pp_schedule": "Interleaved1F1B", "pp_microbatches": 4, "pp_stages_per_rank": 2}],
                         ids=["1F1B", "Interleaved1F1B"])
def test_step_loss_is_bitwise_the_same_on_every_rank_and_eval_step_keeps_gradients(ranks2, options) -> None:
    results = ranks2.run(step_and_eval, options, timeout=300)
    assert results[0]["losses"] == results[1]["losses"], "the ranks of the pipeline return different losses"
    for got, want in zip(results[0]["losses"], results[0]["reference"]):
        assert abs(got - want) <= RTOL * abs(want), (results[0]["losses"], results[0]["reference"])
    for rank, result in enumerate(results):
        assert result["fresh_untouched"], f"rank {rank}: eval_step on a fresh pipeline made gradients or moved weights"
        assert result["trained_untouched"], f"rank {rank}: eval_step changed the gradients or weights of a step"
        assert result["grad_error"] <= RTOL, (f"rank {rank}: gradients accumulated over step, eval_step, step: "
                                              f"relative error {result['grad_error']:.3g}")


def test_loss_of_the_last_stage_on_rank_0_reaches_every_rank_bitwise(ranks2) -> None:
    """ZBVZeroBubble folds the stages into a V: the last stage (3) is on rank 0, with the first."""
    results = ranks2.run(lockstep_parity, LLAMA4, PP2,
                         {"pp_schedule": "ZBVZeroBubble", "pp_microbatches": 4, "pp_stages_per_rank": 2}, timeout=300)
    assert [r["held"] for r in results] == [[[0], [3]], [[1], [2]]]
    assert_lockstep_parity(results)


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_eval_step_of_a_v_schedule_is_refused_before_any_collective(fake_pg, schedule) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    ids = torch.zeros(4, 8, dtype=torch.long)
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
        pipe = meshplan.parallelize(LLAMA4.build(), mesh, pp_schedule=schedule, pp_stages_per_rank=2)
        with pytest.raises(PipelineScheduleError, match=f"eval_step cannot run the {schedule} schedule"):
            pipe.eval_step(input_ids=ids, labels=ids)


def test_explicit_pp_split_is_what_the_stages_hold_and_train(ranks2) -> None:
    results = ranks2.run(lockstep_parity, LLAMA4, PP2,
                         {"pp_schedule": "1F1B", "pp_microbatches": 2, "pp_split": [1]}, timeout=300)
    assert [r["held"] for r in results] == [[[0]], [[1, 2, 3]]]  # not the balanced split's [0, 1] / [2, 3]
    assert results[0]["stages"] == [{"stage": 0, "rank": 0, "blocks": [0, 1]},
                                    {"stage": 1, "rank": 1, "blocks": [1, 4]}]
    assert_lockstep_parity(results)
