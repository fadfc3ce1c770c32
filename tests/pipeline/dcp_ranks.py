"""Rank side of the pipeline distributed-checkpoint check: a ``PipelineModel`` and its AdamW state saved under pp=2,
loaded into a fresh pp=2 pipeline and into the plain model under dp_shard=2, every tensor compared bitwise."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.parity import batches
from tests.pipeline.harness import BATCH, LLAMA4, _fp32
from tests.support import clean_name, full

PIPELINE = {"pp_schedule": "1F1B", "pp_microbatches": 2}


def _mesh(shape: dict[str, int]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))


def _everything(model, optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor of the whole model, full, by original name."""
    pipe = hasattr(model, "stage_modules")
    named = [(model.original_name(n) if pipe else clean_name(n), p) for n, p in model.named_parameters()]
    local = {name: full(p) for name, p in named}
    local |= {f"{name}/{key}": full(value) for name, p in named for key, value in optimizer.state[p].items()}
    if not pipe:
        return local
    parts: list[Any] = [None] * model.pp_mesh.size()
    dist.all_gather_object(parts, local, group=model.pp_mesh.get_group())
    return {name: tensor for part in parts for name, tensor in part.items()}


def _fresh(mesh_shape: dict[str, int], options: dict[str, Any]):
    import meshplan

    model = meshplan.parallelize(LLAMA4.build(), _mesh(mesh_shape), **(_fp32() | options))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _differing(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    return sorted(actual.keys() ^ expected.keys()) + sorted(
        n for n in actual.keys() & expected.keys() if not torch.equal(actual[n], expected[n]))


def pipeline_checkpoint_round_trip(checkpoint: str) -> dict[str, list[str]]:
    import meshplan

    pipe = meshplan.parallelize(LLAMA4.build(), _mesh({"pp": 2, "dp_shard": 1}), **(_fp32() | PIPELINE))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    data = batches(LLAMA4.build().config.vocab_size, 1, BATCH)[0]
    pipe.step(input_ids=data, labels=data)
    optimizer.step()
    expected = _everything(pipe, optimizer)
    meshplan.save_distributed_checkpoint(pipe, checkpoint, optimizer)

    results = {}
    for name, shape, options in (("pp2", {"pp": 2, "dp_shard": 1}, PIPELINE), ("dp_shard2", {"dp_shard": 2}, {})):
        model, fresh_optimizer = _fresh(shape, options)
        meshplan.load_distributed_checkpoint(model, checkpoint, fresh_optimizer)
        results[name] = _differing(_everything(model, fresh_optimizer), expected)
    return results
