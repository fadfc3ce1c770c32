"""Keep tied parameters (e.g. input/output embeddings) tied through tensor parallelism.

``parallelize_module`` gives every module it shards a new ``Parameter``, so a weight shared by two modules
(HF ``tie_word_embeddings``) silently becomes two. Record the sharing before TP with
:func:`find_tied_parameters` and restore it afterwards with :func:`retie_parameters`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from .errors import PlanError


def find_tied_parameters(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of parameter names (two or more) that share one ``Parameter`` object, in module order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _placements(param: nn.Parameter) -> tuple | None:
    return tuple(param.placements) if isinstance(param, DTensor) else None


def retie_parameters(model: nn.Module, groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Point every name of each group back at the group's first parameter; returns the groups re-tied.

    Raises:
        PlanError: the TP plan gave tied parameters different layouts (e.g. it sharded ``lm_head`` but not
            the embedding it is tied to), which cannot be re-tied.
    """
    retied = []
    for names in groups:
        first_owner, first_attr = _split(names[0])
        keep = getattr(model.get_submodule(first_owner), first_attr)
        changed = False
        for name in names[1:]:
            owner_name, attr = _split(name)
            owner = model.get_submodule(owner_name)
            other = getattr(owner, attr)
            if other is keep:
                continue
            if _placements(other) != _placements(keep) or other.shape != keep.shape:
                raise PlanError(
                    f"Tied parameters {names[0]!r} ({_placements(keep) or 'not sharded'}) and {name!r} "
                    f"({_placements(other) or 'not sharded'}) got different tensor-parallel layouts. Shard both "
                    "(embedding rowwise + lm_head colwise, both Shard(0) on the vocab dim) or neither."
                )
            owner.register_parameter(attr, keep)
            changed = True
        if changed:
            retied.append(names)
    return retied
