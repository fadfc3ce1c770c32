"""Shard a batch for context parallelism and gather per-token outputs back.

Every rank of a CP group holds the same batch; :func:`shard_batch` keeps this rank's load-balanced share of
each sequence (:mod:`meshplan.context_parallel.sequence_layout`). Labels are shifted *before* sharding (the token a
position predicts may live on another rank) and handed to transformers as ``shift_labels``; the loss is
divided by ``num_items_in_batch`` = (valid tokens of the whole sequence) / cp, so that the mean of the CP
ranks' losses, which is what data-parallel gradient averaging over ``dp_shard x cp`` computes, is the
per-token mean over the whole sequence, as in one process.

What the ranks need to know about the whole sequence (its key padding, the documents of packed rows) travels
in the shard as a :class:`SequenceShard` under :data:`SHARD_KEY`; a CP model refuses a batch without it. A
``SequenceShard`` is a pytree node of its per-row tensors, so torch splits it along the batch dim wherever it
splits a batch's tensors (pipeline microbatches: every microbatch gets the padding and documents of its rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..core import torch_private
from ..core.errors import ContextParallelError
from . import sequence_layout as layout
from .collectives import all_gather_sequence
from .documents import DOCUMENT_KEYS, document_ids

#: Batch entries split along dim 1 (the sequence); other entries are passed through unchanged.
SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "labels", "shift_labels", "position_ids", "attention_mask",
                 "token_type_ids")
IGNORE_INDEX = -100
#: The model keyword under which :func:`shard_batch` hands the CP model its :class:`SequenceShard`.
SHARD_KEY = "meshplan_cp_shard"


@dataclass(frozen=True)
class SequenceShard:
    """What every CP rank needs to know about the whole sequences of a sharded batch (original token order)."""

    cp_size: int
    seq_len: int
    #: ``[batch, sequence]`` bool, True = a real token; ``None`` when the batch had no ``attention_mask``
    key_padding: torch.Tensor | None = None
    #: ``[batch, sequence]`` document index of each token of packed rows; ``None``: one document per row
    documents: torch.Tensor | None = None
    #: ``[batch, sequence]`` position ids the mask pattern sees inside documents (set with ``documents``)
    positions: torch.Tensor | None = None


def _flatten_shard(shard: SequenceShard) -> tuple[list[torch.Tensor | None], tuple[int, int]]:
    return [shard.key_padding, shard.documents, shard.positions], (shard.cp_size, shard.seq_len)


def _unflatten_shard(rows: Any, sizes: tuple[int, int]) -> SequenceShard:
    return SequenceShard(*sizes, *rows)


torch_private.register_pytree_node(SequenceShard, _flatten_shard, _unflatten_shard)


def _tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch's ``input_ids``, else its ``inputs_embeds`` ([batch, sequence, ...])."""
    tokens = batch.get("input_ids")
    if tokens is None:
        tokens = batch.get("inputs_embeds")
    if tokens is None:
        raise ContextParallelError("shard_batch needs input_ids or inputs_embeds [batch, sequence, ...].")
    return tokens


def next_token_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` shifted left by one (position ``i`` is scored against token ``i + 1``); the last is ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shard_batch(batch: Mapping[str, Any], cp_mesh: DeviceMesh, ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """This CP rank's part of ``batch`` (a dict of model inputs), ready for ``model(**shard)``.

    Args:
        batch: ``input_ids`` (or ``inputs_embeds``) ``[batch, sequence, ...]`` and optionally ``labels``
            (unshifted, as for transformers causal LMs), ``position_ids``, a 2-D ``attention_mask`` (padding,
            left or right), ``token_type_ids``, and packed rows' ``seq_idx`` or ``cu_seq_lens_q`` (see
            :func:`meshplan.context_parallel.documents.document_ids`); other entries are kept as they are. The
            same on every rank of the CP group.
        cp_mesh: the 1-D context-parallel mesh (``mesh["cp"]``).
        ignore_index: label value that is not scored.

    Returns:
        The sequence entries sharded; ``position_ids`` (the global positions of the local tokens, created if
        absent: restarting at every document of packed rows); with labels: ``shift_labels`` and ``labels``
        (both the shifted local labels) and ``num_items_in_batch`` (see the module docstring); the
        :class:`SequenceShard` under :data:`SHARD_KEY`. Document boundaries given as ``seq_idx`` /
        ``cu_seq_lens_*`` / ``max_length_*`` are consumed (they describe the whole row). A CP size of 1 returns
        the batch unchanged.

    Raises:
        SequenceLengthError: the sequence length is not divisible by ``2 x cp`` (before any collective).
        ContextParallelError: an entry does not have the batch's ``[batch, sequence]`` shape.
    """
    size, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    if size == 1:
        return dict(batch)
    batch_size, seq_len = _tokens(batch).shape[:2]
    layout.check_sequence_length(seq_len, size)
    documents, positions = document_ids(batch, batch_size, seq_len)
    padding = batch.get("attention_mask")
    out = {key: value for key, value in batch.items() if key not in DOCUMENT_KEYS}
    if out.get("position_ids") is None:
        out["position_ids"] = (positions if positions is not None
                               else torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1))
    if out.get("labels") is not None or out.get("shift_labels") is not None:
        shifted = out.get("shift_labels")
        if shifted is None:
            shifted = next_token_labels(out["labels"], ignore_index)
        out["labels"], out["shift_labels"] = None, shifted  # sharded once, below
        out["num_items_in_batch"] = (shifted != ignore_index).sum() / size
    for key in SEQUENCE_KEYS:
        value = out.get(key)
        if value is None:
            continue
        if value.ndim < 2 or value.shape[1] != seq_len:
            raise ContextParallelError(
                f"shard_batch: {key} has shape {tuple(value.shape)}, expected [batch, {seq_len}, ...].")
        out[key] = layout.shard_sequence(value, rank, size, dim=1)
    if out.get("shift_labels") is not None:
        out["labels"] = out["shift_labels"]  # transformers computes the loss only when labels is not None
    out[SHARD_KEY] = SequenceShard(size, seq_len, None if padding is None else padding.bool(), documents, positions)
    return out


def gather_sequence(tensor: torch.Tensor, cp_mesh: DeviceMesh, dim: int = 1) -> torch.Tensor:
    """The whole sequence from every CP rank's local per-token ``tensor`` (logits, hidden states, per-token
    losses), in the original order. A collective on the CP group; differentiable."""
    if cp_mesh.size() == 1:
        return tensor
    gathered = all_gather_sequence(tensor, dim, cp_mesh.get_group())
    return gathered.index_select(dim, layout.restore_order(gathered.shape[dim], cp_mesh.size(), tensor.device))
