"""The token-weighted loss over data-parallel ranks.

Data-parallel training averages gradients over ranks (FSDP2, HSDP, DDP, CP ranks alike), i.e. it takes the mean of
the ranks' losses. When each rank's loss is the mean over *its own* valid tokens and ranks hold different numbers of
them (padding, packing, ``-100`` labels), that mean of means weights a token on a rank with few valid tokens more than
one on a busy rank, and differs from the per-token mean over the global batch that one process computes. Dividing
each rank's *sum* of token losses by (valid tokens of all ranks) / (number of ranks) instead makes the average over
ranks exactly that per-token mean. Ranks that hold the same tokens (TP ranks) count them once each and are counted
once each, so the divisor is right for any mesh when the group is the whole world.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..core.errors import UnsupportedConfigurationError

IGNORE_INDEX = -100

Group = dist.ProcessGroup | DeviceMesh | None


def _sum_over(value: torch.Tensor, group: Group) -> tuple[torch.Tensor, int]:
    """``value`` summed over the ranks of ``group`` (the default group for ``None``; every dim of a mesh) and the
    number of those ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return value, 1
    if isinstance(group, DeviceMesh):
        for dim in range(group.ndim):
            dist.all_reduce(value, group=group.get_group(dim))
        return value, group.size()
    dist.all_reduce(value, group=group)
    return value, dist.get_world_size(group)


def _scored_labels(batch: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
    """The labels that are scored: a tensor as given, a batch's ``shift_labels`` (already shifted, e.g. by
    :func:`meshplan.context_parallel.shard_batch`), else its ``labels`` without the first position of each row
    (a causal LM scores position ``i`` against token ``i + 1``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    if batch.get("labels") is None:
        raise UnsupportedConfigurationError("num_items_in_batch needs labels: a tensor, or a batch with "
                                            "'labels' or 'shift_labels'.")
    return batch["labels"][..., 1:]


def num_items_in_batch(batch: Mapping[str, Any] | torch.Tensor, group: Group = None,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The divisor that makes the data-parallel mean of the ranks' losses the per-token mean over the global batch:
    the valid labels of every rank of ``group``, summed, divided by its number of ranks. Pass it to a Hugging Face
    model (``model(**batch, num_items_in_batch=n)``: its loss becomes the sum over tokens divided by ``n``), or
    divide your own summed loss by it. A collective over ``group``: every rank calls it.

    Args:
        batch: this rank's batch (``shift_labels``, else ``labels`` of a causal LM, which are shifted here) or the
            scored labels themselves.
        group: the ranks whose losses data-parallel training averages: the default group (``None``, right for any
            mesh of TP, CP, EP, FSDP, HSDP and DDP dims, since ranks with the same tokens cancel out), a process
            group, or a device mesh (all its ranks).
        ignore_index: the label that is not scored.

    Returns:
        A float32 scalar on the labels' device.
    """
    count = (_scored_labels(batch) != ignore_index).sum().to(torch.float32)
    total, ranks = _sum_over(count, group)
    return total / ranks


def token_weighted_loss(loss_sum: torch.Tensor, num_tokens: int | torch.Tensor, group: Group = None) -> torch.Tensor:
    """This rank's share of the per-token mean over the global batch: ``loss_sum`` (the *sum* of this rank's token
    losses) divided by (the ``num_tokens`` of every rank of ``group``, summed) / (its number of ranks); averaging it
    over the data-parallel ranks, as gradient averaging does, gives the global per-token mean. A collective.

    >>> losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    >>> loss = meshplan.token_weighted_loss(losses.sum(), (labels != -100).sum())
    """
    count = torch.as_tensor(num_tokens, dtype=torch.float32, device=loss_sum.device).clone()
    total, ranks = _sum_over(count, group)
    return loss_sum * ranks / total
