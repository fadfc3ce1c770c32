"""The load-balanced sequence layout of context parallelism (index arithmetic only, no communication).

A causal sequence of length ``S`` is cut into ``2 * cp`` equal chunks; CP rank ``r`` holds chunk ``r`` (a
*head* chunk, cheap: few keys before it) and chunk ``2 * cp - 1 - r`` (a *tail* chunk, expensive), so every
rank attends to the same number of (query, key) pairs. This is the layout of torch's ``_HeadTailLoadBalancer``
too, so the all-gather and the ring implementations shard a batch the same way.

Gathering the local shards of all ranks in rank order (what an all-gather returns) gives the *gathered
order*: ``gathered_indices`` maps each gathered position to its position in the original sequence.
"""

from __future__ import annotations

import torch

from ..core.errors import SequenceLengthError


def check_sequence_length(seq_len: int, cp_size: int, what: str = "sequence length") -> None:
    """Raise :class:`SequenceLengthError` unless ``seq_len`` splits into ``2 * cp_size`` equal chunks."""
    if seq_len <= 0 or seq_len % (2 * cp_size):
        raise SequenceLengthError(
            f"Context parallelism over cp={cp_size} needs a {what} divisible by 2 x cp = {2 * cp_size} (each rank "
            f"holds one head and one tail chunk of the causal sequence); got {seq_len}. Pad the sequence to a "
            f"multiple of {2 * cp_size} (label the padding -100) or change the cp size.")


def check_local_length(local_len: int, cp_size: int) -> None:
    """Raise :class:`SequenceLengthError` unless a rank's shard of ``local_len`` tokens is two equal chunks."""
    if local_len <= 0 or local_len % 2:
        raise SequenceLengthError(
            f"A context-parallel shard holds a head and a tail chunk, so its length must be even; got {local_len} "
            f"tokens on this rank (global length {local_len * cp_size} over cp={cp_size}). Shard the batch with "
            "meshplan.context_parallel.shard_batch, which checks the global length.")


def shard_indices(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions in the original sequence of the ``seq_len // cp_size`` tokens CP rank ``cp_rank`` holds."""
    check_sequence_length(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_size - 1 - cp_rank) * chunk
    tail = torch.arange(tail_start, tail_start + chunk, device=device)
    return torch.cat((head, tail))


def gathered_indices(seq_len: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Original positions of the tokens in gathered order (the local shards of ranks 0..cp-1 concatenated)."""
    return torch.cat([shard_indices(seq_len, rank, cp_size, device) for rank in range(cp_size)])


def restore_order(seq_len: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The permutation taking gathered order back to the original order (``x[:, restore_order(...)]``)."""
    return torch.argsort(gathered_indices(seq_len, cp_size, device))


def shard_sequence(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's load-balanced shard of ``tensor`` along its sequence dim ``dim`` (a copy)."""
    index = shard_indices(tensor.shape[dim], cp_rank, cp_size, tensor.device)
    return tensor.index_select(dim, index)
