"""Per-forward context-parallel state: what one call of the model tells its attention about the whole sequence.

The model's input hook builds a :class:`ForwardContext` from the batch's
:class:`~meshplan.context_parallel.batch.SequenceShard` and makes it *current*; the mask interface, which
transformers calls inside the same forward, stores it in the :class:`~meshplan.context_parallel.masks.DeferredMask`
it returns, and that mask is an argument of every attention call of this forward. A backward that recomputes a
layer (activation checkpointing) therefore sees the context of the forward it recomputes, however many forwards
ran in between: nothing of it lives on the model.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from ..core.errors import ContextParallelError

#: Fewest queries in a block cut at a document start (smaller pieces of packed rows are merged: fewer calls).
MIN_QUERY_BLOCK = 128
#: Most queries per call of the wrapped attention (bounds the mask of one call to QUERY_BLOCK x sequence).
QUERY_BLOCK = 1024


@dataclass(frozen=True)
class ForwardContext:
    """One forward's view of the whole sequence (original token order) from this CP rank."""

    query_positions: torch.Tensor  # [local] original position of each local token
    restore: torch.Tensor  # permutation taking the gathered order back to the original order
    blocks: tuple[tuple[int, int], ...]  # (start, stop) of the local query blocks
    key_padding: torch.Tensor | None = None  # [batch, sequence] bool, True = real token
    documents: torch.Tensor | None = None  # [batch, sequence] document index of packed rows
    positions: torch.Tensor | None = None  # [batch, sequence] position ids the mask sees inside documents
    document_spans: tuple[torch.Tensor, torch.Tensor] | None = None  # (first, last + 1) of each token's document

    @property
    def seq_len(self) -> int:
        return len(self.restore)

    def key_span(self, start: int, stop: int) -> tuple[int, int]:
        """``(first, last + 1)`` of the keys the local queries ``start:stop`` may attend: those of their documents
        (the whole sequence for rows of one document)."""
        if self.document_spans is None:
            return 0, self.seq_len
        queries = self.query_positions[start:stop]
        first, end = self.document_spans
        return int(first[:, queries].min()), int(end[:, queries].max())


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("meshplan_cp_forward", default=None)


def set_current(context: ForwardContext | None) -> None:
    """Make ``context`` the one the masks of the running forward take (``None`` after the forward)."""
    _CURRENT.set(context)


def current() -> ForwardContext:
    """The context of the running forward of a CP model."""
    context = _CURRENT.get()
    if context is None:
        raise ContextParallelError(
            "The context-parallel attention mask was requested outside the forward of a model prepared for context "
            "parallelism; call the model itself (its input hook describes the sequence), not its layers.")
    return context


def query_blocks(local_len: int, document_starts: torch.Tensor | None = None) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of the query blocks of a local shard: each of its two chunks cut into pieces of at most
    :data:`QUERY_BLOCK` tokens, and at the local positions ``document_starts`` where a document begins once a
    block holds :data:`MIN_QUERY_BLOCK` queries (a block of one document attends only that document's keys)."""
    chunk = local_len // 2
    starts = [] if document_starts is None else sorted(set(document_starts.tolist()))
    blocks = []
    for base in (0, chunk):
        end = base + chunk
        cuts = [s for s in starts if base < s < end]
        start, i = base, 0
        while start < end:
            stop = min(start + QUERY_BLOCK, end)
            while i < len(cuts) and cuts[i] < start + MIN_QUERY_BLOCK:
                i += 1
            if i < len(cuts) and cuts[i] < stop:
                stop = cuts[i]
            blocks.append((start, stop))
            start = stop
    return tuple(blocks)
