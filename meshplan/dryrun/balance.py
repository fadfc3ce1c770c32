"""How evenly the world holds the model: parameters whole on every TP rank, and where the worst rank's excess is.

Both read :class:`~meshplan.dryrun.all_ranks.AllRanks` (every rank's pieces, from placements), so they hold for
any strategy and any module type: fused 3-D expert tensors, embeddings and plain ``nn.Parameter``s alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .all_ranks import AllRanks, ParamGroup, varies_along
from .name_summary import summarize_names

#: A note is written when the worst rank holds more than this times the ideal share.
IMBALANCE_NOTE_THRESHOLD = 1.10
#: How many parameter groups the imbalance note names.
NOTE_CONTRIBUTORS = 3


def _patterns(names: list[str]) -> str:
    return ", ".join(s["pattern"] or "(root)" for s in summarize_names(names))


def replicated_parameters(spread: AllRanks, groups_by_dim: Mapping[str, tuple[int, np.ndarray]]
                          ) -> dict[str, Any] | None:
    """Parameters of 2 or more dims that every rank of a model-parallel dim holds the same piece of.

    ``groups_by_dim`` maps a dim name (``tp``, ``ep``) to its size and its process groups (rows of global
    ranks). 1-D parameters (norm scales, biases) are left out: they are replicated by design.
    ``None`` when there is no model-parallel dim larger than 1.
    """
    dims = {name: size for name, (size, _) in groups_by_dim.items() if size > 1}
    if not dims:
        return None
    rows: dict[tuple[Any, ...], list[str]] = {}
    for group in spread.groups:
        if len(group.shape) < 2:
            continue
        over = tuple(name for name in dims if not varies_along(group, groups_by_dim[name][1]))
        if over:
            rows.setdefault((group.shape, over), []).extend(group.names)
    entries = []
    for (shape, over), names in rows.items():
        entries += [{"pattern": s["pattern"], "count": s["count"], "shape": list(shape), "over": list(over)}
                    for s in summarize_names(names)]
    return {
        "dims": dims,
        "count": sum(e["count"] for e in entries),
        "elements": sum(e["count"] * math.prod(e["shape"]) for e in entries),
        "parameters": entries,
    }


def _contributors(spread: AllRanks, rank: int, shards: int) -> list[tuple[float, ParamGroup, int]]:
    """Groups holding more than their ideal share on ``rank``, largest excess first."""
    found = []
    for group in spread.groups:
        here = group.local_at(rank)
        excess = len(group.names) * (here - group.numel / shards)
        if excess > 0:
            found.append((excess, group, here))
    return sorted(found, key=lambda item: -item[0])


def imbalance_note(spread: AllRanks, total: int, shards: int, threshold: float = IMBALANCE_NOTE_THRESHOLD
                   ) -> str | None:
    """A note naming the worst rank and the parameters that put it over ``threshold`` x ideal, else ``None``."""
    ideal = total / shards
    if not ideal or spread.max_local <= threshold * ideal:
        return None
    rank = spread.max_local_rank
    parts = []
    for excess, group, here in _contributors(spread, rank, shards)[:NOTE_CONTRIBUTORS]:
        non_empty = int((group.table > 0).sum())
        shape = "x".join(map(str, group.shape))
        parts.append(f"{_patterns(group.names)} ({len(group.names)} x [{shape}]: {here:,} elements each, ideal "
                     f"{group.numel / shards:,.0f}; {non_empty} non-empty piece{'s' if non_empty != 1 else ''} "
                     f"for {shards:,} shards; +{excess:,.0f} in all)")
    return (f"The worst rank ({rank}) holds {spread.max_local:,} parameter elements, "
            f"{spread.max_local / ideal:.2f} x the ideal {ideal:,.0f} (total / {shards:,} shards). "
            f"Largest excess: " + "; ".join(parts) + ".")
