"""What meshplan reads of FSDP2's private state (through :mod:`meshplan.core.torch_private`).

torch keeps a unit's parameters in one or more *parameter groups* (several when ``shard_placement_fn`` puts
some parameters on another mesh, e.g. experts on an expert-parallel mesh), each with its own
reshard-after-forward setting, and the unit's mixed-precision policy on its state. Everything here is
guarded: a torch change that moves these attributes degrades the answers to "unknown" (``None`` / empty),
never to an error. Importing this module imports nothing of FSDP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.torch_private import fsdp_mixed_precision as mixed_precision_policy
from ..core.torch_private import fsdp_param_groups as param_groups

__all__ = ["mixed_precision_policy", "param_groups", "reshard_settings", "reshards_after_forward",
           "restore_reshard_settings"]


def reshard_settings(unit: nn.Module) -> list[Any]:
    """Each parameter group's reshard-after-forward setting (``post_forward_mesh_info``), in group order."""
    return [getattr(group, "post_forward_mesh_info", None) for group in param_groups(unit)]


def restore_reshard_settings(unit: nn.Module, settings: list[Any]) -> None:
    """Put back settings read by :func:`reshard_settings`."""
    for group, setting in zip(param_groups(unit), settings):
        group.post_forward_mesh_info = setting


def reshards_after_forward(unit: nn.Module) -> bool | None:
    """Whether the unit reshards after forward: ``True`` / ``False`` when all its groups agree, else (groups
    that differ, or none known) ``None``."""
    groups = param_groups(unit)
    if not groups or not all(hasattr(group, "post_forward_mesh_info") for group in groups):
        return None
    answers = {group.post_forward_mesh_info is not None for group in groups}
    return answers.pop() if len(answers) == 1 else None
