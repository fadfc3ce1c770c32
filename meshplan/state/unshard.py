"""``unshard_fsdp2_model``: hold every FSDP2 unit of a model gathered for a block of code (e.g. generation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule

from .fsdp_state import reshard_settings, restore_reshard_settings


def fsdp_units(model: nn.Module, unit_type: type = FSDPModule) -> list[FSDPModule]:
    """Every module of ``model`` that ``fully_shard`` was applied to (instances of ``unit_type``), in module
    order (root first)."""
    return [module for module in model.modules() if isinstance(module, unit_type)]


@contextlib.contextmanager
def unshard_fsdp2_model(model: nn.Module, unit_type: type = FSDPModule) -> Iterator[nn.Module]:
    """All-gather the parameters of every FSDP2 unit of ``model`` for the duration of the block.

    Inside the block the units also stop resharding after forward, so repeated forwards (generation)
    do not gather again. On exit — also when the block raises — every unit that was gathered is resharded
    and its reshard-after-forward setting restored. Collective: every rank must enter and leave together.
    A model without FSDP2 units passes through unchanged. ``unit_type`` selects the units (a stand-in type
    that is not an ``FSDPModule`` only needs ``unshard()`` and ``reshard()``).
    """
    units = fsdp_units(model, unit_type)
    saved: list[tuple[FSDPModule, list[object] | None]] = []
    try:
        for unit in units:
            settings = reshard_settings(unit) if isinstance(unit, FSDPModule) else None
            saved.append((unit, settings))
            if settings is not None:
                unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        yield model
    finally:
        for unit, settings in reversed(saved):
            unit.reshard()
            if settings is not None:
                restore_reshard_settings(unit, settings)
