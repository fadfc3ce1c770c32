"""Regional compilation: ``torch.compile`` each decoder block of a parallelized model, as torchtitan does.

A strategy with ``compile=True`` calls :func:`compile_blocks` after tensor / context / expert parallelism and
activation checkpointing and before data-parallel wrapping. Each block is compiled *in place*
(``nn.Module.compile``): parameter and state-dict names keep no ``_orig_mod.`` prefix, a checkpointed block is
compiled with its recomputation, and the hooks FSDP2 registers afterwards run around the compiled code (torch's
compiler skips FSDP hooks). A block's inputs that are a functional collective's lazy result (``AsyncCollectiveTensor``,
e.g. the output of a vocabulary-parallel embedding) are materialized by an eager forward pre-hook first: given such an
input, AOTAutograd returns no gradient for it (torch 2.13: the embedding's gradient was all zeros). Every block
has the same code, so one compilation serves all of them; the embedding, the final norm and the head stay eager.

Whole-model ``torch.compile`` of a parallelized model is not the supported path: with a vocabulary-parallel
embedding under FSDP2 torch 2.13 fails inside the compiler ("Mixing fake modes NYI"), and with the embedding's
call kept eager (``torch.compiler.disable``) it compiles but the embedding's gradient is lost, as above.
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
