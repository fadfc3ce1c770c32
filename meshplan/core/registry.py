"""The registry of strategies, TP plan providers and parallel styles, with provenance.

Precedence never depends on the order plugins were loaded in. For a name, every registration is
ranked by ``(tier, priority)`` where the tier is runtime > plugin > built-in:

* registrations of the *same* target are one registration (an identical duplicate is a no-op);
* the highest-ranked target wins, but it may only shadow other targets if it was registered with
  ``override=True``; otherwise asking for that name raises :class:`ConflictError` naming both;
* two different targets at the same highest rank are a :class:`ConflictError` naming both plugins.

Conflicts are raised when the name is requested, so one bad plugin never breaks unrelated lookups.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ConflictError, RegistrationError, UnknownNameError
from .imports import import_class_from_path
from .naming import did_you_mean, normalize_name


class Tier(enum.IntEnum):
    """Where a registration came from; higher tiers win."""

    BUILTIN = 0
    PLUGIN = 1
    RUNTIME = 2


@dataclass(frozen=True)
class Provenance:
    """Which plugin contributed a registration."""

    plugin: str
    tier: Tier
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        where = f" from {self.distribution} {self.version or ''}".rstrip() if self.distribution else ""
        return f"{self.tier.name.lower()} plugin {self.plugin!r}{where}"


@dataclass(frozen=True)
class Registration:
    """One thing registered under one key by one plugin."""

    kind: str
    key: str
    target: Any
    provenance: Provenance
    priority: int = 0
    override: bool = False
    aliases: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def rank(self) -> tuple[int, int]:
        return (int(self.provenance.tier), self.priority)

    @property
    def target_id(self) -> Any:
        """Identity used to recognise identical duplicates."""
        return self.target if isinstance(self.target, str) else id(self.target)

    def load(self) -> Any:
        """The registered object, importing it first when it was registered by dotted path."""
        return import_class_from_path(self.target) if isinstance(self.target, str) else self.target

    def target_name(self) -> str:
        if isinstance(self.target, str):
            return self.target
        qual = getattr(self.target, "__qualname__", type(self.target).__qualname__)
        return f"{getattr(self.target, '__module__', '?')}.{qual}"


class Table:
    """Registrations of one kind, looked up by (normalized) key."""

    def __init__(self, kind: str, normalize: Callable[[str], str] = normalize_name) -> None:
        self.kind = kind
        self.normalize = normalize
        self._by_key: dict[str, list[Registration]] = {}

    def add(self, registration: Registration) -> None:
        for key in (registration.key, *registration.aliases):
            self._by_key.setdefault(self.normalize(key), []).append(registration)

    def discard(self, key: str, tier: Tier) -> None:
        """Drop the registrations of ``tier`` for ``key`` (a runtime override replaces earlier ones)."""
        normalized = self.normalize(key)
        self._by_key[normalized] = [r for r in self._by_key.get(normalized, []) if r.provenance.tier != tier]

    def remove(self, key: str) -> list[Registration]:
        """Drop every registration for ``key`` (any tier, aliases included); returns what was dropped."""
        removed = self._by_key.pop(self.normalize(key), [])
        for reg in removed:
            for other in {reg.key, *reg.aliases} - {key}:
                normalized = self.normalize(other)
                kept = [r for r in self._by_key.get(normalized, []) if r is not reg]
                if kept:
                    self._by_key[normalized] = kept
                else:
                    self._by_key.pop(normalized, None)
        return removed

    def candidates(self, key: str) -> list[Registration]:
        """Every registration for ``key``, identical duplicates folded into the highest-ranked one."""
        best: dict[Any, Registration] = {}
        for reg in self._by_key.get(self.normalize(key), []):
            kept = best.get(reg.target_id)
            if kept is None or reg.rank > kept.rank:
                best[reg.target_id] = reg
        return sorted(best.values(), key=lambda r: r.rank, reverse=True)

    def __contains__(self, key: str) -> bool:
        return self.normalize(key) in self._by_key

    def find(self, key: str) -> Registration | None:
        """The winning registration for ``key``; ``None`` if nothing is registered; raises on conflicts."""
        found = self.candidates(key)
        if not found:
            return None
        winner, *others = found
        tied = [r for r in others if r.rank == winner.rank]
        if tied:
            names = ", ".join(r.provenance.describe() for r in (winner, *tied))
            raise ConflictError(
                f"{self.kind} {key!r} is claimed at the same precedence by {names}. "
                "Give one registration a higher priority, or disable one plugin with MESHPLAN_DISABLE_PLUGINS."
            )
        if others and not winner.override:
            raise ConflictError(
                f"{self.kind} {key!r} from {winner.provenance.describe()} would replace the one from "
                f"{others[0].provenance.describe()}; register it with override=True to replace it."
            )
        return winner

    def get(self, key: str, hint: str = "") -> Registration:
        """Like :meth:`find` but raises :class:`UnknownNameError` when nothing is registered."""
        found = self.find(key)
        if found is None:
            raise UnknownNameError(
                f"Unknown {self.kind} {key!r}. Known: {', '.join(sorted(self.keys())) or 'none'}."
                f"{did_you_mean(key, self.keys())}{hint}"
            )
        return found

    def keys(self) -> list[str]:
        """Primary keys as registered (aliases excluded)."""
        seen: dict[str, None] = {}
        for regs in self._by_key.values():
            for reg in regs:
                seen.setdefault(reg.key, None)
        return list(seen)

    def registrations(self) -> Iterator[Registration]:
        """Every registration once (aliases folded)."""
        seen: set[int] = set()
        for regs in self._by_key.values():
            for reg in regs:
                if id(reg) not in seen:
                    seen.add(id(reg))
                    yield reg

    def copy(self) -> Table:
        clone = Table(self.kind, self.normalize)
        clone._by_key = {k: list(v) for k, v in self._by_key.items()}
        return clone


def _class_key(key: str) -> str:
    """Model-class keys are exact (qualified ``pkg.mod.Class`` or bare ``Class``)."""
    return key


def class_key(model_class: type | str) -> str:
    """The registry key for a model class given as a class object or a (qualified or bare) name."""
    if isinstance(model_class, str):
        if not model_class.strip():
            raise RegistrationError("A TP plan must be registered for a class or a non-empty class name.")
        return model_class.strip()
    if isinstance(model_class, type):
        return f"{model_class.__module__}.{model_class.__qualname__}"
    raise RegistrationError(f"Expected a model class or its qualified name, got {model_class!r}.")


def mro_keys(model_class: type) -> Iterable[tuple[type, str]]:
    """Lookup keys for a class, most specific first: each class of the MRO, qualified then bare name."""
    for cls in model_class.__mro__:
        yield cls, class_key(cls)
        yield cls, cls.__name__


@dataclass
class Registry:
    """All registrations meshplan knows, plus the plugins they came from."""

    strategies: Table = field(default_factory=lambda: Table("strategy"))
    tp_plans: Table = field(default_factory=lambda: Table("TP plan", _class_key))
    styles: Table = field(default_factory=lambda: Table("parallel style"))

    def table(self, kind: str) -> Table:
        return {"strategy": self.strategies, "tp_plan": self.tp_plans, "style": self.styles}[kind]

    def copy(self) -> Registry:
        return Registry(self.strategies.copy(), self.tp_plans.copy(), self.styles.copy())

    def find_tp_plan(self, model_class: type) -> tuple[type, Registration] | None:
        """The provider for the most specific class in ``model_class``'s MRO that has one."""
        return next(self.tp_plan_providers(model_class), None)

    def tp_plan_providers(self, model_class: type) -> Iterator[tuple[type, Registration]]:
        """Every plan provider along ``model_class``'s MRO, most specific first (one per class)."""
        seen: set[type] = set()
        for cls, key in mro_keys(model_class):
            found = self.tp_plans.find(key) if cls not in seen else None
            if found is not None:
                seen.add(cls)
                yield cls, found
