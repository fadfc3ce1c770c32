"""The one place that reads FSDP2's private state (``FSDPModule._get_fsdp_state()``).

torch keeps a unit's parameters in one or more *parameter groups* (several when ``shard_placement_fn`` puts
some parameters on another mesh, e.g. experts on an expert-parallel mesh), each with its own
reshard-after-forward setting, and the unit's mixed-precision policy on its state. Everything here is
guarded: a torch change that moves these attributes degrades the answers to "unknown" (``None`` / empty),
never to an error. Importing this module imports nothing of FSDP.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _state(unit: nn.Module) -> Any | None:
    get_state = getattr(unit, "_get_fsdp_state", None)
    if get_state is None:
        return None
    try:
        return get_state()
    except (AttributeError, AssertionError):
        return None


def param_groups(unit: nn.Module) -> list[Any]:
    """The unit's FSDP parameter groups (every one of them; empty when unknown or none). torch < 2.12 keeps a
    single group under the singular name."""
    state = _state(unit)
    groups = getattr(state, "_fsdp_param_groups", None)
    if isinstance(groups, (list, tuple)):
        return list(groups)
    single = getattr(state, "_fsdp_param_group", None)
    return [] if single is None else [single]


def mixed_precision_policy(unit: nn.Module) -> Any | None:
    """The ``MixedPrecisionPolicy`` the unit was sharded with, or ``None`` when torch hides it."""
    return getattr(_state(unit), "_mp_policy", None)


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
