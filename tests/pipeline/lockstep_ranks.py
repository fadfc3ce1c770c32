"""Rank side of the lockstep pipeline checks: on every rank, a pipeline and the one-process model train side by
side on the whole batch, so each rank compares its own stages' gradients every step (the harness compares only
averaged losses and final parameters), and returns its raw losses for a bitwise comparison between ranks."""

from __future__ import annotations

from typing import Any

import torch

from tests.parity import ModelSpec, batches
from tests.pipeline.harness import BATCH, LR, STEPS, _fp32, gathered_params
from tests.support import full, full_params, relative_error

RTOL = 1e-5
FLOOR = 1e-12  # relative errors are taken against a tensor's largest value, at least this


def build_pipeline(spec: ModelSpec, mesh_shape: dict[str, int], options: dict[str, Any]):
    """``meshplan.parallelize`` of ``spec``'s model on a CPU mesh of ``mesh_shape``, fp32."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    return meshplan.parallelize(spec.build(), mesh, **(_fp32() | options))


def lockstep_parity(spec: ModelSpec, mesh_shape: dict[str, int], options: dict[str, Any],
                    steps: int = STEPS) -> dict[str, Any]:
    """Runs on every rank: ``steps`` SGD steps of the pipeline and of one process side by side. Returns the worst
    relative errors (``loss``, this rank's stage ``grad`` of every step, gathered ``param`` at the end), this
    rank's raw ``losses``, the blocks its stages hold (``held``: indices under the block container, per stage)
    and the report's stages."""
    import meshplan

    reference = spec.build()
    pipe = build_pipeline(spec, mesh_shape, options)
    layout = pipe.pipeline_plan.layout
    held = [sorted(int(name) for name, _ in stage.get_submodule(layout.blocks).named_children())
            for stage in pipe.stage_modules]
    optimizers = [torch.optim.SGD(model.parameters(), lr=LR) for model in (pipe, reference)]
    ref_params = dict(reference.named_parameters())
    errors = {"loss": 0.0, "grad": 0.0}
    losses = []
    for data in batches(reference.config.get_text_config().vocab_size, steps, BATCH):
        loss = float(pipe.step(input_ids=data, labels=data))
        ref_loss = reference(input_ids=data, labels=data, use_cache=False).loss
        ref_loss.backward()
        losses.append(loss)
        errors["loss"] = max(errors["loss"], abs(loss - float(ref_loss.detach())) / abs(float(ref_loss.detach())))
        for name, param in pipe.named_parameters():
            expected = ref_params[pipe.original_name(name)].grad
            errors["grad"] = max(errors["grad"], relative_error(full(param.grad), expected, floor=FLOOR))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    gathered, expected = gathered_params(pipe), full_params(reference)
    if gathered.keys() != expected.keys():
        raise AssertionError(f"gathered parameters differ by name: {sorted(gathered.keys() ^ expected.keys())}")
    errors["param"] = max(relative_error(gathered[n], expected[n], floor=FLOOR) for n in expected)
    return {"errors": errors, "losses": losses, "held": held,
            "stages": meshplan.get_report(pipe)["pipeline"]["stages"]}


def assert_lockstep_parity(results: list[dict[str, Any]]) -> None:
    """Every rank within :data:`RTOL`, and the same losses, bitwise, on every rank."""
    for rank, result in enumerate(results):
        assert max(result["errors"].values()) <= RTOL, f"rank {rank}: {result['errors']}"
    assert all(r["losses"] == results[0]["losses"] for r in results), [r["losses"] for r in results]
