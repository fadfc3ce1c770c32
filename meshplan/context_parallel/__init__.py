"""Context parallelism: split every sequence over a ``cp`` mesh dim, on any attention and any device.

* :func:`shard_batch` / :func:`gather_sequence` — this rank's load-balanced share of a batch, and per-token
  outputs gathered back in the original order (:mod:`.batch`, layout in :mod:`.sequence_layout`, documents of
  packed rows in :mod:`.documents`); the shard's :class:`SequenceShard` tells the model the whole sequence's
  padding and documents.
* :func:`apply_context_parallel` / :func:`validate_context_parallel` — what the ``fsdp2`` strategy calls when
  the mesh has a ``cp`` dim (:mod:`.apply`): an all-gather-K/V attention registered in transformers'
  ``AttentionInterface`` that wraps the model's own (:mod:`.attention`, masks in :mod:`.masks`, per-forward
  state in :mod:`.forward`), or torch's ring attention on CUDA (:mod:`.ring`).

Nothing here imports transformers until a model is prepared.
"""

from __future__ import annotations

from .apply import apply_context_parallel, validate_context_parallel
from .batch import SequenceShard, gather_sequence, shard_batch
from .state import IMPLEMENTATIONS

__all__ = ["IMPLEMENTATIONS", "SequenceShard", "apply_context_parallel", "gather_sequence", "shard_batch",
           "validate_context_parallel"]
