"""Import objects from dotted paths with errors that say which part failed."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ImportPathError


def split_path(path: str) -> tuple[str, str]:
    """Split ``pkg.mod:Name`` or ``pkg.mod.Name`` into (module, attribute path)."""
    if not isinstance(path, str) or not path.strip():
        raise ImportPathError(f"Expected a dotted path like 'pkg.module.Name', got {path!r}.")
    path = path.strip()
    if ":" in path:
        module, _, attr = path.partition(":")
        if not module or not attr:
            raise ImportPathError(f"Malformed path {path!r}: expected 'pkg.module:Name'.")
        return module, attr
    module, dot, attr = path.rpartition(".")
    if not dot or not module:
        raise ImportPathError(f"Malformed path {path!r}: expected 'pkg.module.Name' (a module and a name).")
    return module, attr


def import_class_from_path(name: str) -> Any:
    """Import ``pkg.mod.Name`` (or ``pkg.mod:Name``; nested ``pkg.mod:Outer.Inner``) and return it."""
    module_name, attr_path = split_path(name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if ":" not in name:
            # ``pkg.mod.Outer.Inner``: the module may end earlier than the last dot.
            head, dot, tail = module_name.rpartition(".")
            if dot:
                try:
                    return import_class_from_path(f"{head}:{tail}.{attr_path}")
                except ImportPathError:
                    pass
        raise ImportPathError(f"Cannot import module {module_name!r} (from {name!r}): {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportPathError(
                f"Module {module_name!r} has no attribute {attr_path!r} (from {name!r})."
            ) from exc
    return obj
