"""Built-in plugin: registers the style vocabulary (:data:`meshplan.tensor_parallel.vocabulary.BUILTIN_STYLES`)
through the same hook third-party style plugins use."""

from __future__ import annotations

from ..plugins.hookspecs import RegisterStyle, hookimpl
from ..tensor_parallel.vocabulary import BUILTIN_STYLES


@hookimpl
def meshplan_register_styles(register: RegisterStyle) -> None:
    for name, factory in BUILTIN_STYLES.items():
        register(name, factory)
