"""Pipeline parity: train a tiny model with meshplan's pipeline on gloo ranks and in one process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.parity import ModelSpec, RunResult, batches
from tests.support import full

STEPS, LR, BATCH = 3, 0.1, 8
LLAMA4 = ModelSpec("llama", overrides={"num_hidden_layers": 4, "tie_word_embeddings": False})


def _fp32() -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy()}


def pipeline_run(spec: ModelSpec, mesh_shape: dict[str, int], options: dict[str, Any], steps: int = STEPS,
                 batch: int = BATCH, data_parallel: tuple[str, ...] = ("dp_shard",), cp: bool = False) -> RunResult:
    """Runs on every rank: parallelize with pp, train ``steps`` SGD steps on this rank's data slice, gather."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan
    from meshplan.context_parallel import shard_batch

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    pipe = meshplan.parallelize(spec.build(), mesh, **(_fp32() | options))
    index, size = 0, 1
    for name in data_parallel:
        if name in mesh_shape:
            index, size = index * mesh_shape[name] + mesh[name].get_local_rank(), size * mesh_shape[name]
    per_rank = batch // size
    optimizer = torch.optim.SGD(pipe.parameters(), lr=LR)
    losses = []
    for data in batches(pipe.config.get_text_config().vocab_size, steps, batch):
        local = data[index * per_rank:(index + 1) * per_rank]
        inputs = {"input_ids": local, "labels": local}
        if cp:
            inputs = shard_batch(inputs, mesh["cp"])
        loss = pipe.step(**inputs)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        dist.all_reduce(value)
        losses.append(float(value) / dist.get_world_size())
    return RunResult(losses, gathered_params(pipe))


def gathered_params(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model (all stages), gathered on every rank, by original name."""
    import meshplan

    local = meshplan.gather_full_state_dict(pipe, rank0_only=False)
    return {name: full(t) for name, t in local.items()}


def reference_run(spec: ModelSpec, steps: int = STEPS, batch: int = BATCH) -> RunResult:
    """One process, the whole batch, SGD."""
    from tests.support import full_params

    model = spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for data in batches(model.config.get_text_config().vocab_size, steps, batch):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return RunResult(losses, full_params(model))
