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


def step_batches(vocab_size: int, steps: int = STEPS, batch: int = BATCH) -> list[dict[str, torch.Tensor]]:
    """The global batch of every step: random token ids, labelled with themselves."""
    return [{"input_ids": ids, "labels": ids} for ids in batches(vocab_size, steps, batch)]


def pipeline_run(spec: ModelSpec, mesh_shape: dict[str, int], options: dict[str, Any], steps: int = STEPS,
                 batch: int = BATCH, data_parallel: tuple[str, ...] = ("dp_shard",), cp: bool = False,
                 data: list[dict[str, torch.Tensor]] | None = None) -> RunResult:
    """Runs on every rank: parallelize with pp, train an SGD step on this rank's slice of every global batch of
    ``data`` (default :func:`step_batches`; sharded with ``shard_batch`` when ``cp``), gather."""
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan
    from meshplan.context_parallel import shard_batch
    from tests.context_parallel.harness import rows_of

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    pipe = meshplan.parallelize(spec.build(), mesh, **(_fp32() | options))
    index, size = 0, 1
    for name in data_parallel:
        if name in mesh_shape:
            index, size = index * mesh_shape[name] + mesh[name].get_local_rank(), size * mesh_shape[name]
    optimizer = torch.optim.SGD(pipe.parameters(), lr=LR)
    losses = []
    vocab_size = pipe.config.get_text_config().vocab_size
    for global_batch in data if data is not None else step_batches(vocab_size, steps, batch):
        inputs = rows_of(global_batch, index, size)
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


def reference_run(spec: ModelSpec, steps: int = STEPS, batch: int = BATCH,
                  data: list[dict[str, torch.Tensor]] | None = None, microbatches: int = 1) -> RunResult:
    """One process, every whole batch of ``data`` (default :func:`step_batches`), SGD; no KV cache, as the
    pipeline runs (transformers builds one in training too, and it does not keep packed documents apart). With
    ``microbatches`` > 1, gradient accumulation: each row chunk's loss divided by their number, one backward each."""
    from tests.context_parallel.harness import rows_of
    from tests.support import full_params

    model = spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for global_batch in data if data is not None else step_batches(model.config.get_text_config().vocab_size,
                                                                   steps, batch):
        total = 0.0
        for chunk in range(microbatches):
            loss = model(**rows_of(global_batch, chunk, microbatches), use_cache=False).loss / microbatches
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return RunResult(losses, full_params(model))
