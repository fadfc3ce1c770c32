"""Name normalization shared by the registry and the plugin load policy."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def normalize_name(name: str) -> str:
    """Case-insensitive, with ``-`` and ``.`` equal to ``_`` (``Megatron-FSDP`` == ``megatron_fsdp``)."""
    return name.strip().lower().replace("-", "_").replace(".", "_")


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates most similar to ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A sentence suggesting the closest candidate, or an empty string."""
    hits = closest(name, candidates, n=1)
    return f" Did you mean {hits[0]!r}?" if hits else ""
