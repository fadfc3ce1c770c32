"""A plain ``nn.Module`` (no transformers) made pipeline-able by a plan provider's ``pp`` axis, on 2 gloo ranks
against one process (3 SGD steps, fp32, losses and gathered parameters within 1e-5)."""

from __future__ import annotations

import torch

from tests.parity import RunResult, assert_parity
from tests.support import TinyStack, full_params

STEPS, LR, BATCH, DEPTH = 3, 0.1, 8, 4


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 16, generator=generator), torch.randn(BATCH, 4, generator=generator)


def _model() -> TinyStack:
    torch.manual_seed(0)
    return TinyStack(depth=DEPTH)


def _reference() -> RunResult:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return RunResult(losses, full_params(model))


def _pipelined(schedule: str, checkpoint_dir: str) -> RunResult:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from tests.pipeline.harness import gathered_params

    meshplan.register_tp_plan(TinyStack, {"pp": ["layers", "head"]})  # what a plugin's provider would return
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
    pipe = meshplan.parallelize(_model(), mesh, pp_schedule=schedule, pp_microbatches=4,
                                pp_loss_fn=torch.nn.functional.mse_loss, mp_policy=MixedPrecisionPolicy())
    optimizer = torch.optim.SGD(pipe.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = _data(step)
        losses.append(float(pipe.step(x, labels=y)))
        optimizer.step()
        optimizer.zero_grad()
    trained = gathered_params(pipe)
    meshplan.save_distributed_checkpoint(pipe, checkpoint_dir)  # original names, one entry per stage's tensors
    with torch.no_grad():
        for param in pipe.parameters():
            param.zero_()
    meshplan.load_distributed_checkpoint(pipe, checkpoint_dir)
    reloaded = gathered_params(pipe)
    assert all(torch.equal(reloaded[name], trained[name]) for name in trained), "DCP round trip changed parameters"
    report = meshplan.get_report(pipe)
    assert report["pipeline"]["stages"] == [{"stage": 0, "rank": 0, "blocks": [0, 2]},
                                            {"stage": 1, "rank": 1, "blocks": [2, 4]}], report["pipeline"]
    return RunResult(losses, trained)


def test_plain_module_with_a_pp_plan_provider_matches_one_process(ranks2, tmp_path) -> None:
    """Also: the distributed checkpoint round trip and the report of a PipelineModel."""
    expected = _reference()
    for result in ranks2.run(_pipelined, "1F1B", str(tmp_path / "checkpoint")):
        assert_parity(result, expected)
