"""Context-parallel parity harness: SGD steps in one process vs. on gloo ranks with a ``cp`` mesh dim.

``reference_sgd`` runs in the test process on the whole batch; ``cp_by_hand`` (CP applied with
``apply_context_parallel``, gradients averaged over the ranks by hand) and ``cp_parallelize`` (through
``meshplan.parallelize``) run on every rank of a RankPool. Every rank shards its data-parallel slice of
the global batch with ``shard_batch``, so losses, first-step gradients and final parameters must match.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.parity import ModelSpec, RunResult, _mean_over_world, batches, data_parallel_index
from tests.support import full_grads, full_params

STEPS, LR, GLOBAL_BATCH, SEQ_LEN = 3, 0.5, 2, 16


def _train(model: nn.Module, data: list[torch.Tensor], prepare, after_backward, reduce_loss) -> RunResult:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step, input_ids in enumerate(data):
        loss = model(**prepare({"input_ids": input_ids, "labels": input_ids})).loss
        loss.backward()
        after_backward()
        if step == 0:
            grads = full_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(reduce_loss(loss.detach())))
    return RunResult(losses, full_params(model), grads)


def reference_sgd(spec: ModelSpec, global_batch: int = GLOBAL_BATCH) -> RunResult:
    model = spec.build()
    data = batches(model.config.vocab_size, STEPS, global_batch, SEQ_LEN)
    return _train(model, data, lambda b: b, lambda: None, lambda loss: loss)


def _data_slice(mesh, vocab_size: int, global_batch: int, sequence_dims: tuple[str, ...]) -> list[torch.Tensor]:
    """This rank's data-parallel slice of every global batch (CP and TP ranks share their data)."""
    index, size = data_parallel_index(mesh, sequence_dims)
    per_rank = global_batch // size
    return [b[index * per_rank:(index + 1) * per_rank] for b in batches(vocab_size, STEPS, global_batch, SEQ_LEN)]


def cp_by_hand(spec: ModelSpec, implementation: str = "allgather", query_block: int = 1024) -> RunResult:
    """Runs on every rank: CP over all ranks applied by hand, gradients averaged with all_reduce."""
    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.context_parallel import apply_context_parallel, forward, shard_batch

    forward.QUERY_BLOCK = query_block

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    model = apply_context_parallel(spec.build(), mesh["cp"], implementation)
    data = _data_slice(mesh, model.config.vocab_size, GLOBAL_BATCH, ("cp",))

    def average_grads() -> None:
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()

    return _train(model, data, lambda b: shard_batch(b, mesh["cp"]), average_grads, _mean_over_world)


def cp_parallelize(spec: ModelSpec, mesh_shape: dict[str, int], kwargs: dict[str, Any],
                   global_batch: int = GLOBAL_BATCH) -> RunResult:
    """Runs on every rank: ``meshplan.parallelize`` on a mesh with a ``cp`` dim, fp32 FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from meshplan.context_parallel import shard_batch

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    model = meshplan.parallelize(spec.build(), mesh, mp_policy=MixedPrecisionPolicy(), **kwargs)
    data = _data_slice(mesh, model.config.vocab_size, global_batch, ("cp", "tp"))
    return _train(model, data, lambda b: shard_batch(b, mesh["cp"]), lambda: None, _mean_over_world)


def padded_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two sequences of 16 tokens, the second right-padded after 11 (padding not attended, not scored)."""
    ids = batches(vocab_size, 1, 2, SEQ_LEN, seed=7)[0]
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def padded_reference(spec: ModelSpec) -> dict[str, torch.Tensor]:
    model = spec.build()
    out = model(**padded_batch(model.config.vocab_size))
    out.loss.backward()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), **full_grads(model)}


def padded_cp(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Runs on every rank: one padded batch through CP; loss, logits gathered back, averaged gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.context_parallel import apply_context_parallel, gather_sequence, shard_batch

    cp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))["cp"]
    model = apply_context_parallel(spec.build(), cp_mesh)
    out = model(**shard_batch(padded_batch(model.config.vocab_size), cp_mesh))
    out.loss.backward()
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()
    logits = gather_sequence(out.logits.detach(), cp_mesh)
    return {"loss": _mean_over_world(out.loss.detach()), "logits": logits, **full_grads(model)}
