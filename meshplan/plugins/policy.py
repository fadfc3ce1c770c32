"""Which plugins load, read from the ``MESHPLAN_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..core.errors import PluginLoadError
from ..core.naming import normalize_name

LOAD_VAR = "MESHPLAN_LOAD_PLUGINS"
DISABLE_VAR = "MESHPLAN_DISABLE_PLUGINS"
ERRORS_VAR = "MESHPLAN_PLUGIN_ERRORS"


def _names(value: str) -> frozenset[str]:
    return frozenset(normalize_name(v) for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class LoadPolicy:
    """``allow=None`` loads every installed plugin; an empty set loads none (built-ins still load)."""

    allow: frozenset[str] | None = None
    disabled: frozenset[str] = frozenset()
    raise_errors: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LoadPolicy:
        env = os.environ if environ is None else environ
        errors = env.get(ERRORS_VAR, "warn").strip().lower() or "warn"
        if errors not in ("warn", "raise"):
            raise PluginLoadError(f"{ERRORS_VAR} must be 'warn' or 'raise', got {errors!r}.")
        load = env.get(LOAD_VAR)
        return cls(
            allow=None if load is None else _names(load),
            disabled=_names(env.get(DISABLE_VAR, "")),
            raise_errors=errors == "raise",
        )

    def is_disabled(self, names: Iterable[str | None]) -> bool:
        return any(n is not None and normalize_name(n) in self.disabled for n in names)

    def is_allowed(self, names: Iterable[str | None]) -> bool:
        """Whether an installed (entry-point) plugin passes the allow-list."""
        if self.allow is None:
            return True
        return any(n is not None and normalize_name(n) in self.allow for n in names)
