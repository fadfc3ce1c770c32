"""Packed rows: which document each token belongs to, found the way one process finds it.

transformers keeps the documents of a packed row apart (without a cache) when the model gets ``position_ids``
that restart and no ``attention_mask``: a new document starts wherever the position does not grow by one, and
the mask pattern is evaluated on the positions inside each document. Packed-sequence collators
(``DataCollatorWithFlattening``) can also say it explicitly, with per-token ``seq_idx`` or FlashAttention's
``cu_seq_lens_q``; under context parallelism those separate the documents too, with any attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.errors import ContextParallelError

#: Batch entries that describe document boundaries of the whole row; ``shard_batch`` consumes them.
DOCUMENT_KEYS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _rows(tensor: torch.Tensor, batch_size: int, seq_len: int, key: str) -> torch.Tensor:
    """``tensor`` as ``[batch_size, seq_len]`` (a single row is broadcast, as transformers does)."""
    if tensor.ndim != 2 or tensor.shape[1] != seq_len or tensor.shape[0] not in (1, batch_size):
        raise ContextParallelError(
            f"shard_batch: {key} has shape {tuple(tensor.shape)}, expected [{batch_size} or 1, {seq_len}].")
    return tensor.expand(batch_size, -1)


def _from_cumulative_lengths(cu_seq_lens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Document ids ``[1, seq_len]`` of a flattened row from FlashAttention's cumulative lengths ``[0, ..., S]``."""
    if batch_size != 1 or cu_seq_lens.ndim != 1 or int(cu_seq_lens[0]) != 0 or int(cu_seq_lens[-1]) != seq_len:
        raise ContextParallelError(
            f"shard_batch: cu_seq_lens_q must be the cumulative document lengths [0, ..., {seq_len}] of one "
            f"flattened row (batch size 1, as DataCollatorWithFlattening makes it); got {cu_seq_lens.tolist()} "
            f"for a batch of {batch_size} x {seq_len} tokens. Pass seq_idx [batch, sequence] instead.")
    return torch.searchsorted(cu_seq_lens[1:].to(torch.long), torch.arange(seq_len), right=True).unsqueeze(0)


def document_spans(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, last + 1)``: where the document of every token of ``documents`` ``[batch, sequence]`` starts and
    ends (documents are runs of equal ids)."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    changes = documents[:, 1:] != documents[:, :-1]
    starts = torch.cat((torch.ones_like(documents[:, :1], dtype=torch.bool), changes), dim=1)
    ends = torch.cat((changes, torch.ones_like(documents[:, :1], dtype=torch.bool)), dim=1)
    first = torch.where(starts, index, 0).cummax(dim=1).values
    last = torch.where(ends, index, documents.shape[1]).flip(1).cummin(dim=1).values.flip(1)
    return first, last + 1


def document_ids(batch: Mapping[str, Any], batch_size: int, seq_len: int
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(documents, positions)`` of a whole batch, both ``[batch, sequence]``, or ``(None, None)`` when every
    row is one document.

    ``documents`` numbers the documents of each row; ``positions`` are the position ids the mask pattern sees
    within a document (the batch's, or restarting at every document when only ``seq_idx`` / ``cu_seq_lens_q``
    mark them). From, in this order: ``seq_idx``, ``cu_seq_lens_q``, or ``position_ids`` that restart when there is
    no ``attention_mask`` (transformers' own rule and its ``find_packed_sequence_indices``).
    """
    positions = batch.get("position_ids")
    if positions is not None and positions.ndim == 2:
        positions = _rows(positions, batch_size, seq_len, "position_ids")
    if batch.get("seq_idx") is not None:
        documents = _rows(batch["seq_idx"], batch_size, seq_len, "seq_idx")
    elif batch.get("cu_seq_lens_q") is not None:
        documents = _from_cumulative_lengths(batch["cu_seq_lens_q"], batch_size, seq_len)
    elif positions is not None and positions.ndim == 2 and batch.get("attention_mask") is None:
        from transformers.masking_utils import find_packed_sequence_indices  # function level: transformers is heavy

        documents = find_packed_sequence_indices(positions)
        return (None, None) if documents is None else (documents, positions)
    else:
        return None, None
    documents = documents.to(torch.long)
    if positions is None or positions.ndim != 2:
        index = torch.arange(seq_len, device=documents.device)
        positions = index - document_spans(documents)[0]  # restarting at 0 in every document
    return documents, positions
