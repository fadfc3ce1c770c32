"""Activation checkpointing of a model's blocks (after tensor parallel, before data-parallel wrapping).

Modes: ``True`` / ``"mlp"`` wraps each block's MLP (NeMo AutoModel's behaviour), ``"full"`` wraps whole
blocks, ``"selective"`` wraps every ``every``-th block (blocks 0, every, 2*every, ...).

Wrapping uses torch's non-reentrant ``checkpoint_wrapper``. The wrapper's state-dict hooks strip its
``_checkpoint_wrapped_module.`` prefix, so ``state_dict()`` and torch's distributed state-dict helpers
(``get_model_state_dict``) keep the original keys; only ``named_parameters()`` shows the prefix.
Checkpointing whole blocks of a Hugging Face model turns its KV cache off (``config.use_cache=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .core.errors import UnsupportedConfigurationError
from .core.log import get_logger, log_rank0
from .core.strategy import StrategyOptions
from .core.torch_private import checkpoint_wrapper
from .introspection.blocks import MLP_NAMES, find_blocks, mlp_name
from .introspection.config import model_configs

logger = get_logger(__name__)

MODES = (False, True, "mlp", "full", "selective")

Blocks = Sequence[tuple[str, nn.Module]]


def check_mode(mode: bool | str, every: int = 2) -> None:
    """Raise for an unknown mode or a non-positive ``every`` (runs in validation, before any work)."""
    if not (isinstance(mode, bool) or mode in ("mlp", "full", "selective")):
        raise UnsupportedConfigurationError(
            f"activation_checkpointing must be one of {MODES}, got {mode!r}.")
    if mode == "selective" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise UnsupportedConfigurationError(
            f"activation_checkpointing_every must be an int >= 1, got {every!r}.")


def checkpoint_targets(blocks: Blocks, mode: bool | str, every: int = 2) -> list[str]:
    """Names of the modules ``mode`` wraps, given the model's ``(fqn, block)`` list.

    Raises:
        UnsupportedConfigurationError: bad mode, or checkpointing was asked for but there is nothing to wrap
            (no repeated blocks, or ``"mlp"`` mode and no block has an ``mlp``/``feed_forward``/``ffn`` child).
    """
    check_mode(mode, every)
    if not mode:
        return []
    if mode in (True, "mlp"):
        targets = [f"{fqn}.{name}" if fqn else name
                   for fqn, block in blocks if (name := mlp_name(block)) is not None]
    elif mode == "full":
        targets = [fqn for fqn, _ in blocks]
    else:
        targets = [fqn for index, (fqn, _) in enumerate(blocks) if index % every == 0]
    if not targets:
        what = ("no repeated blocks were found" if not blocks else
                f"no block has a child named one of {MLP_NAMES}; use activation_checkpointing='full'")
        raise UnsupportedConfigurationError(f"activation_checkpointing={mode!r} has nothing to wrap: {what}.")
    return targets


def _disable_kv_cache(model: nn.Module) -> bool:
    """Turn off a Hugging Face model's KV cache (``config.use_cache``); True if it was on.

    Recomputing a whole decoder layer in backward would append its keys/values to the forward's cache a
    second time (transformers' own gradient checkpointing turns the cache off for the same reason).
    """
    was_on = False
    for candidate in model_configs(model):
        if getattr(candidate, "use_cache", False):
            candidate.use_cache = False
            was_on = True
    return was_on


def _wrap(model: nn.Module, fqn: str) -> None:
    parent_name, _, child_name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.register_module(child_name, checkpoint_wrapper(parent.get_submodule(child_name)))


def apply_activation_checkpointing(
    model: nn.Module, mode: bool | str, every: int = 2, blocks: Blocks | None = None,
) -> list[str]:
    """Wrap modules for recomputation in backward; returns the wrapped module names.

    ``blocks`` is the model's ``(fqn, block)`` list (default: :func:`find_blocks`). Pass the list found
    before any wrapping: once some blocks of a container are wrapped, the container no longer holds
    blocks of a single class and is not found again.
    """
    targets = checkpoint_targets(find_blocks(model) if blocks is None else blocks, mode, every)
    if mode in ("full", "selective") and _disable_kv_cache(model):
        log_rank0(logger, logging.INFO, "activation_checkpointing=%r: set config.use_cache=False (recomputed "
                  "attention must not append to the KV cache twice).", mode)
    for fqn in targets:
        _wrap(model, fqn)
    return targets


@dataclass
class CheckpointingOptions(StrategyOptions):
    """Strategy options with activation checkpointing (the built-in strategies share these).

    Attributes:
        activation_checkpointing: ``False`` (default), ``True``/``"mlp"`` (each block's MLP), ``"full"``
            (whole blocks) or ``"selective"`` (every ``activation_checkpointing_every``-th block).
        activation_checkpointing_every: stride of ``"selective"`` checkpointing (default 2).
        compile: ``torch.compile`` each block in place after checkpointing, before data-parallel wrapping
            (regional compilation: :func:`meshplan.training.compile.compile_blocks`).
    """

    activation_checkpointing: bool | str = False
    activation_checkpointing_every: int = 2
    compile: bool = False

    def check_checkpointing(self, blocks: Blocks) -> list[str]:
        """Validate the settings against the model's blocks (no side effects); the names to wrap."""
        return checkpoint_targets(blocks, self.activation_checkpointing, self.activation_checkpointing_every)

    def apply_checkpointing(self, model: nn.Module, blocks: Blocks) -> list[str]:
        """Wrap the selected modules of ``model``; the names wrapped."""
        return apply_activation_checkpointing(
            model, self.activation_checkpointing, self.activation_checkpointing_every, blocks)
