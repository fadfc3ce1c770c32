"""Rank-side check of the token-weighted loss: data-parallel ranks whose slices of the global batch hold different
numbers of valid labels, against one process on the whole batch."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tests.parity import data_parallel_index
from tests.plans.helpers import build
from tests.support import full_grads, relative_error

GLOBAL_BATCH, SEQ_LEN = 4, 16


def uneven_batch(vocab_size: int = 250) -> dict[str, torch.Tensor]:
    """Row ``i`` has ``[1, 12, 4, 2][i]`` leading labels masked (``-100``): 15, 4, 12 and 14 scored tokens."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    labels = ids.clone()
    for row, masked in enumerate([1, 12, 4, 2]):
        labels[row, :masked] = -100
    return {"input_ids": ids, "labels": labels}


def token_weighted_parity(mesh_shape: dict[str, int], own_loss: bool = False) -> dict[str, Any]:
    """Runs on every rank: one backward of a tiny Llama (fp32, fsdp2) on this rank's data-parallel slice with the
    loss divided by ``meshplan.num_items_in_batch`` (or, ``own_loss``, a summed cross-entropy through
    ``meshplan.token_weighted_loss``); the mean of the ranks' losses and the gathered gradients against one process
    on the global batch, and the error of the naive mean of per-rank means."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from meshplan.context_parallel import shard_batch

    reference = build("llama")
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy())
    batch = uneven_batch()
    expected = reference(**batch).loss
    expected.backward()
    index, size = data_parallel_index(mesh, ("tp", "cp"))
    per_rank = GLOBAL_BATCH // size
    local = {k: v[index * per_rank:(index + 1) * per_rank] for k, v in batch.items()}
    shard = shard_batch(local, mesh["cp"]) if "cp" in mesh_shape else local
    naive = model(**shard).loss.detach()  # each rank's own per-token mean
    if own_loss:
        labels = shard.get("shift_labels")
        logits = model(input_ids=shard["input_ids"], position_ids=shard.get("position_ids")).logits
        if labels is None:
            logits, labels = logits[:, :-1], shard["labels"][:, 1:]
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
        loss = meshplan.token_weighted_loss(losses.sum(), (labels != -100).sum())
    else:
        loss = model(**{**shard, "num_items_in_batch": meshplan.num_items_in_batch(shard)}).loss
    loss.backward()
    means = torch.stack([loss.detach(), naive])
    dist.all_reduce(means)
    means /= dist.get_world_size()
    grads = full_grads(model)
    return {"loss": abs(float(means[0]) - float(expected.detach())) / float(expected.detach()),
            "naive_loss": abs(float(means[1]) - float(expected.detach())) / float(expected.detach()),
            "grad": max(relative_error(grads[n], p.grad) for n, p in reference.named_parameters())}
