"""``PARALLELIZE_FUNCTIONS``: NeMo AutoModel's ``{model class: plan function}`` dict, as a view of meshplan's registry.

NeMo code reads the dict to see which classes have an optimized plan and writes to it to add or replace one.
:class:`ParallelizeFunctions` is a ``MutableMapping`` whose state *is* the TP-plan table of the plugin registry,
so a change made through it is what :func:`meshplan.parallelize` (and ``_get_parallel_plan``) use next:

* reading lists the providers registered for a model class (built-in, plugin and runtime ones), keyed by the
  class (a provider registered by a bare class name, or for a class that cannot be imported here, is keyed
  by that name); the Hugging Face fallback is not an optimized plan and is left out;
* ``m[cls] = fn`` registers ``fn`` at runtime, replacing any provider of exactly ``cls``
  (:func:`meshplan.register_tp_plan` with ``override=True``);
* ``del m[cls]`` / ``clear()`` remove the providers of exactly that class, whatever registered them
  (:func:`meshplan.unregister_tp_plan`), until plugins are discovered again.

Lookups are exact, as in a dict; ``_get_parallel_plan`` walks the model's MRO over the mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from ..api import register_tp_plan, unregister_tp_plan
from ..core.errors import ConflictError, ImportPathError
from ..core.imports import import_class_from_path
from ..core.registry import Registration, Table, class_key
from ..plans import hf as hf_fallback
from ..plugins.manager import get_registry

PlanFunction = Callable[..., Mapping[str, Any]]


def _table() -> Table:
    return get_registry().tp_plans


def _is_fallback(registration: Registration) -> bool:
    return registration.provenance.plugin == hf_fallback.__name__


def _keys_for(model_class: type | str) -> tuple[str, ...]:
    """Registry keys that denote exactly ``model_class``: its qualified name, then its bare name."""
    if isinstance(model_class, type):
        return class_key(model_class), model_class.__name__
    return (class_key(model_class),)


def _as_function(registration: Registration) -> PlanFunction:
    """The registered provider as NeMo's ``fn(model, sequence_parallel) -> plan`` (a dict is wrapped)."""
    provider = registration.load()
    if callable(provider):
        return provider

    def fixed_plan(model: Any = None, sequence_parallel: bool = False) -> Mapping[str, Any]:
        return provider

    fixed_plan.__qualname__ = f"fixed_plan[{registration.target_name()}]"
    return fixed_plan


def _key_object(key: str) -> type | str:
    """The class a registry key names, when it is a qualified name importable here; else the key itself
    (``m[key]`` works with both)."""
    if "." not in key and ":" not in key:
        return key
    try:
        found = import_class_from_path(key)
    except ImportPathError:
        return key
    # Only a class the key really names (a module attribute may have been replaced by another class).
    return found if isinstance(found, type) and class_key(found) == class_key(key) else key


class ParallelizeFunctions(MutableMapping):
    """A live ``{model class: plan function}`` view of the registry's optimized TP plan providers."""

    def _find(self, model_class: object) -> Registration | None:
        if not isinstance(model_class, (type, str)):
            return None
        table = _table()
        for key in _keys_for(model_class):
            found = table.find(key)
            if found is not None:
                return None if _is_fallback(found) else found
        return None

    def __getitem__(self, model_class: type | str) -> PlanFunction:
        found = self._find(model_class)
        if found is None:
            raise KeyError(model_class)
        return _as_function(found)

    def __contains__(self, model_class: object) -> bool:
        return self._find(model_class) is not None

    def __setitem__(self, model_class: type | str, function: PlanFunction) -> None:
        register_tp_plan(model_class, function, override=True)

    def __delitem__(self, model_class: type | str) -> None:
        removed = False
        for key in _keys_for(model_class):
            found = _table().find(key)
            if found is not None and not _is_fallback(found):
                removed = unregister_tp_plan(key) or removed
        if not removed:
            raise KeyError(model_class)

    def __iter__(self) -> Iterator[type | str]:
        seen: set[object] = set()
        table = _table()
        for key in list(table.keys()):
            try:
                found = table.find(key)
            except ConflictError:  # listed; looking it up raises the error naming both providers
                found = None if all(_is_fallback(r) for r in table.candidates(key)) else table.candidates(key)[0]
            if found is None or _is_fallback(found):
                continue
            model_class = _key_object(key)
            if model_class not in seen:
                seen.add(model_class)
                yield model_class

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        for model_class in list(self):
            self.pop(model_class, None)

    def copy(self) -> dict[type | str, PlanFunction]:
        """A plain dict snapshot (what ``dict.copy`` gives NeMo code that saves and restores the table)."""
        return dict(self.items())

    def __repr__(self) -> str:
        names = ", ".join(k.__qualname__ if isinstance(k, type) else repr(k) for k in self)
        return f"PARALLELIZE_FUNCTIONS({{{names}}}; view of the meshplan TP plan registry)"
