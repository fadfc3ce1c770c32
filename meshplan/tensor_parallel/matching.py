"""Match plan keys to modules exactly as torch's ``parallelize_module`` does.

A key is split on ``.``; each segment is an ``fnmatch`` pattern for one child name, so ``*`` matches
exactly one path segment (``model.layers.*.mlp.up_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from fnmatch import fnmatch

from torch import nn

from ..core.naming import closest


def match_key(model: nn.Module, key: str) -> list[str]:
    """Fully qualified names of the modules ``key`` selects ("" selects the model itself)."""
    if key == "":
        return [""]
    frontier: list[tuple[str, nn.Module]] = [("", model)]
    for segment in key.split("."):
        frontier = [
            (f"{prefix}.{name}" if prefix else name, child)
            for prefix, module in frontier
            for name, child in module.named_children()
            if fnmatch(name, segment)
        ]
        if not frontier:
            return []
    return [fqn for fqn, _ in frontier]


def match_parameter_key(model: nn.Module, key: str) -> list[str]:
    """Parameter names ``key`` selects when its last segment names a parameter rather than a module
    (transformers plans may do that, e.g. ``layers.*.mlp.experts.gate_up_proj``)."""
    parent, _, name = key.rpartition(".")
    return [
        f"{fqn}.{name}" if fqn else name
        for fqn in match_key(model, parent)
        if name in dict(model.get_submodule(fqn).named_parameters(recurse=False))
    ]


def match_plan(model: nn.Module, keys: Iterable[str]) -> dict[str, list[str]]:
    """``{key: matched module names}`` for every key (empty list = no match)."""
    return {key: match_key(model, key) for key in keys}


def generalize(fqn: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp`` (the form plan keys are usually written in)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", fqn)


def covering_keys(model: nn.Module, fqns: Iterable[str]) -> list[str]:
    """Plan keys selecting exactly ``fqns``: the generalized pattern (``layers.*``) of each group of names where
    it selects no other module, else the names themselves."""
    groups: dict[str, set[str]] = {}
    for fqn in fqns:
        groups.setdefault(generalize(fqn), set()).add(fqn)
    return [key for pattern, group in sorted(groups.items())
            for key in ([pattern] if set(match_key(model, pattern)) == group else sorted(group))]


def suggest_keys(model: nn.Module, key: str, n: int = 3) -> list[str]:
    """Module patterns closest to an unmatched key."""
    patterns = dict.fromkeys(generalize(name) for name, _ in model.named_modules() if name)
    return closest(key, patterns, n=n)


def within(fqn: str, selected: Collection[str]) -> bool:
    """Whether ``fqn`` or one of its ancestors (the model itself: ``""``) is in ``selected``."""
    parts = fqn.split(".") if fqn else []
    return any(".".join(parts[:depth]) in selected for depth in range(len(parts) + 1))


def replicated_linears(model: nn.Module, matched: Iterable[str]) -> tuple[str, ...]:
    """``nn.Linear`` modules that no plan key selected, directly or through an ancestor (a module-level style such
    as a mixer style shards its descendants' parameters): they stay replicated across TP ranks."""
    covered = set(matched)
    return tuple(
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not within(name, covered)
    )
