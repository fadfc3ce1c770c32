"""Activation checkpointing of a model's blocks (before data-parallel wrapping).

Modes: ``True`` / ``"mlp"`` wraps each block's MLP (NeMo AutoModel's behaviour), ``"full"`` wraps whole
blocks, ``"selective"`` wraps every ``every``-th block. Wrappers strip their prefix from state-dict keys.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from .blocks import find_blocks
from .errors import UnsupportedConfigurationError

MLP_NAMES = ("mlp", "feed_forward", "ffn")
MODES = (False, True, "mlp", "full", "selective")


def _mlp_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name in MLP_NAMES:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def check_mode(mode: bool | str, every: int = 2) -> None:
    """Raise for an unknown mode or a non-positive ``every`` (runs in validation, before any work)."""
    if mode not in MODES:
        raise UnsupportedConfigurationError(
            f"activation_checkpointing must be one of {MODES}, got {mode!r}.")
    if mode == "selective" and every < 1:
        raise UnsupportedConfigurationError(f"activation_checkpointing_every must be >= 1, got {every}.")


def apply_activation_checkpointing(model: nn.Module, mode: bool | str, every: int = 2) -> list[str]:
    """Wrap modules for recomputation in backward; returns the wrapped module names."""
    check_mode(mode, every)
    if not mode:
        return []
    wrapped = []
    for index, (fqn, block) in enumerate(find_blocks(model)):
        if mode in (True, "mlp"):
            found = _mlp_of(block)
            if found is None:
                continue
            name, mlp = found
            setattr(block, name, checkpoint_wrapper(mlp))
            wrapped.append(f"{fqn}.{name}")
        elif mode == "full" or index % every == 0:
            parent_name, _, child_name = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.register_module(child_name, checkpoint_wrapper(block))
            wrapped.append(fqn)
    return wrapped
