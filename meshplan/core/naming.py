"""Name normalization shared by the registry, the plugin load policy and state-dict keys."""

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


#: Module names that wrappers insert into parameter names (activation checkpointing, FSDP1, ``torch.compile``);
#: torch's distributed state-dict helpers leave them out of the keys.
WRAPPER_COMPONENTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def unwrapped_name(name: str) -> str:
    """A parameter name without the components wrappers insert (whole dotted components only, so a module called
    ``L_module`` keeps its name)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)
