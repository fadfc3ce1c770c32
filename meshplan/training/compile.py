"""Regional compilation: ``torch.compile`` each decoder block of a parallelized model, as torchtitan does.

A strategy with ``compile=True`` calls :func:`compile_blocks` after tensor / context / expert parallelism and
activation checkpointing and before data-parallel wrapping. Each block is compiled *in place*
(``nn.Module.compile``): parameter and state-dict names keep no ``_orig_mod.`` prefix, a checkpointed block is
compiled with its recomputation, and the hooks FSDP2 registers afterwards run around the compiled code (torch's
compiler skips FSDP hooks). A block's inputs that are a functional collective's lazy result (``AsyncCollectiveTensor``,
e.g. the output of a vocabulary-parallel embedding) are materialized by an eager forward pre-hook first: given such an
input, AOTAutograd returns no gradient for it (torch 2.13: the embedding's gradient was all zeros). Every block
has the same code, so one compilation serves all of them; the embedding, the final norm and the head stay eager.

Whole-model ``torch.compile(model)`` of a parallelized model works too (inductor matches eager on Llama FSDP2 x TP):
the built-in vocabulary-parallel embedding (``embedding_rowwise``) looks up its local rows itself, because torch's
DTensor lookup (``RowwiseParallel`` on an ``nn.Embedding``) fails inside the compiler under FSDP2 with torch 2.13
("Mixing fake modes NYI"). A hand-written plan that uses torch's ``RowwiseParallel`` for the embedding still fails
there; use ``embedding_rowwise`` or ``compile=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.log import get_logger, log_rank0

logger = get_logger(__name__)

Blocks = Sequence[tuple[str, nn.Module]]


def compile_blocks(model: nn.Module, blocks: Blocks, **compile_kwargs: Any) -> list[str]:
    """Compile every block of ``model`` in place; returns their names.

    Args:
        model: the model, after tensor parallel and activation checkpointing, before data-parallel wrapping.
        blocks: the model's ``(fqn, block)`` list found before any wrapping
            (:func:`meshplan.introspection.find_blocks`); each name is looked up again, so a block replaced by its
            checkpoint wrapper is compiled together with the recomputation.
        compile_kwargs: passed to ``torch.compile`` (``backend``, ``fullgraph``, ``dynamic``, ``mode``, ``options``).
    """
    names = [fqn for fqn, _ in blocks]
    for fqn in names:
        block = model.get_submodule(fqn)
        block.register_forward_pre_hook(_materialize_lazy_collectives, with_kwargs=True)
        block.compile(**compile_kwargs)
    log_rank0(logger, logging.INFO, "compile: %d block(s) compiled in place (%s)", len(names),
              ", ".join(f"{k}={v!r}" for k, v in compile_kwargs.items()) or "torch.compile defaults")
    return names


@torch.compiler.disable  # the hook is part of the compiled call: this keeps it out of the graph, as FSDP2's hooks
def _materialize_lazy_collectives(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's ``AsyncCollectiveTensor`` inputs as plain tensors that keep their autograd history (a copy:
    ``wait()`` would detach them)."""
    from ..core.torch_private import AsyncCollectiveTensor  # private torch API, resolved on first use

    def plain(value: Any) -> Any:
        return value.clone() if isinstance(value, AsyncCollectiveTensor) else value

    return tuple(map(plain, args)), {key: plain(value) for key, value in kwargs.items()}
