"""Context-parallel parity harness: SGD steps in one process vs. on gloo ranks with a ``cp`` mesh dim.

``reference_sgd`` runs in the test process on the whole batch; ``cp_by_hand`` (CP applied with
``apply_context_parallel``, gradients averaged over the ranks by hand) and ``cp_parallelize`` (through
``meshplan.parallelize``) run on every rank of a RankPool. Every rank shards its data-parallel slice of
the global batch with ``shard_batch``, so losses, first-step gradients and final parameters must match.
``reference_steps`` / ``cp_steps`` do the same for batches of any shape (packed rows, padded rows) and several
micro-batches forwarded before one backward; ``cp_cases`` runs a group of such cases in one pool call.
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
    """SGD on ``data``, one batch (labels = input ids) per step: :func:`_train_steps` with one micro-batch."""
    steps = [[{"input_ids": input_ids, "labels": input_ids}] for input_ids in data]
    return _train_steps(model, steps, prepare, after_backward, reduce_loss)


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


# --- packed and padded rows, several forwards per backward ---------------------------------------------
#: Document lengths of the two rows of a packed batch, per step: 3+ documents of different lengths per row, as
#: many in both rows (the same number of labels, so that a data-parallel mean of the rows' losses is the mean
#: over the batch's tokens).
PACKED_LENGTHS = (((7, 13, 12), (5, 9, 18)), ((3, 11, 10, 8), (14, 6, 4, 8)), ((10, 4, 9, 9), (12, 12, 5, 3)))
PACKED_LEN = 32  # divisible by 2 x cp for cp = 2 and 4


def packed_batch(vocab_size: int, lengths: tuple[tuple[int, ...], ...], seed: int) -> dict[str, torch.Tensor]:
    """Rows of several documents, as ``DataCollatorWithFlattening`` packs them: position ids restart at 0 in
    every document, no attention mask, the first token of a document is not a label."""
    ids = batches(vocab_size, 1, len(lengths), sum(lengths[0]), seed=seed)[0]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return {"input_ids": ids, "position_ids": positions, "labels": ids.masked_fill(positions == 0, -100)}


def packed_steps(vocab_size: int) -> list[list[dict[str, torch.Tensor]]]:
    """Three steps of one packed batch each (different documents every step)."""
    return [[packed_batch(vocab_size, lengths, seed=step)] for step, lengths in enumerate(PACKED_LENGTHS)]


def padded_rows(vocab_size: int, side: str, real: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Rows of :data:`SEQ_LEN` tokens, padded on ``side`` ("left" / "right") to hold ``real`` tokens each; the
    labels are the input ids, padding included (the usual first attempt: padded positions are scored)."""
    ids = batches(vocab_size, 1, len(real), SEQ_LEN, seed=seed)[0]
    index = torch.arange(SEQ_LEN)
    counts = torch.tensor(real).unsqueeze(1)
    mask = (index >= SEQ_LEN - counts) if side == "left" else (index < counts)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.clone()}


def padded_steps(vocab_size: int, side: str, micro_batches: int = 1) -> list[list[dict[str, torch.Tensor]]]:
    """Three steps of ``micro_batches`` differently padded batches of two rows each."""
    real = ((16, 9), (5, 12), (11, 3), (2, 14))
    return [[padded_rows(vocab_size, side, real[(step + m) % len(real)], seed=10 * step + m)
             for m in range(micro_batches)] for step in range(STEPS)]


def _train_steps(model: nn.Module, steps: list[list[dict]], prepare, after_backward, reduce_loss) -> RunResult:
    """SGD on ``steps``: every micro-batch of a step forward first, then one backward of their summed losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step, micro_batches in enumerate(steps):
        loss = sum(model(**prepare(batch)).loss for batch in micro_batches)
        loss.backward()
        after_backward()
        if step == 0:
            grads = full_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(reduce_loss(loss.detach())))
    return RunResult(losses, full_params(model), grads)


def reference_steps(spec: ModelSpec, steps: list[list[dict]]) -> RunResult:
    """One process on the whole batches, without a KV cache (as CP runs): transformers 5.24 builds a cache whenever
    ``config.use_cache`` is set, training included, and then does not keep packed documents apart."""
    return _train_steps(spec.build(), steps, lambda b: {**b, "use_cache": False}, lambda: None, lambda loss: loss)


def rows_of(batch: dict[str, torch.Tensor], index: int, size: int) -> dict[str, torch.Tensor]:
    """Data-parallel slice ``index`` of ``size`` of every entry of ``batch``."""
    per_rank = len(batch["input_ids"]) // size
    return {key: value[index * per_rank:(index + 1) * per_rank] for key, value in batch.items()}


def cp_steps(spec: ModelSpec, steps: list[list[dict]], mesh_shape: dict[str, int] | None = None,
             kwargs: dict[str, Any] | None = None) -> RunResult:
    """Runs on every rank: ``steps`` through CP, sharded with ``shard_batch``. Without ``mesh_shape``, CP over all
    ranks applied by hand (gradients averaged with all_reduce); with it, ``meshplan.parallelize`` (fp32 FSDP2)
    and ``kwargs``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from meshplan.context_parallel import apply_context_parallel, shard_batch

    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
        model = apply_context_parallel(spec.build(), mesh["cp"])

        def after_backward() -> None:
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()
    else:
        mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
        model = meshplan.parallelize(spec.build(), mesh, mp_policy=MixedPrecisionPolicy(), **(kwargs or {}))

        def after_backward() -> None:
            pass
    index, size = data_parallel_index(mesh, ("cp", "tp"))
    return _train_steps(model, steps, lambda b: shard_batch(rows_of(b, index, size), mesh["cp"]), after_backward,
                        _mean_over_world)


def cp_cases(cases: list[tuple[ModelSpec, list[list[dict]]]], *, min_query_block: int | None = None,
             **kwargs: Any) -> list[RunResult]:
    """Runs on every rank: :func:`cp_steps` for each ``(spec, steps)`` (one pool call for a group of cases);
    ``min_query_block`` overrides where query blocks may be cut at documents (restored afterwards)."""
    from meshplan.context_parallel import forward

    default = forward.MIN_QUERY_BLOCK
    forward.MIN_QUERY_BLOCK = min_query_block or default
    try:
        return [cp_steps(spec, steps, **kwargs) for spec, steps in cases]
    finally:
        forward.MIN_QUERY_BLOCK = default
