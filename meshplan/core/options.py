"""Check strategy option values against the types their options dataclass declares, once, for every strategy.

Annotations are usually strings (``from __future__ import annotations``) naming types that are imported
only under ``TYPE_CHECKING`` (``MixedPrecisionPolicy``, ``Optimizer``), so they are never evaluated: each
annotation is parsed (:mod:`ast`) into a check. Names are looked up in the module that declared the field
(builtins included); a name that module does not bind at run time is matched against the class names of
the value's type and its bases (through ``import ... as`` aliases), so checking an option never imports
torch.distributed.fsdp or megatron.

Understood: ``X | Y``, ``Optional[X]``, ``Union[...]``, ``None``, ``Any``, ``Literal[...]``, classes (also
dotted, ``torch.dtype``) and generic aliases (``Sequence[str]``, ``dict[str, int]``, ``type[X]``), whose
origin only is checked. ``int`` refuses ``bool``; ``float`` takes ``int``; a ``Sequence`` refuses a ``str``
unless ``str`` is allowed too. Anything else is accepted: a check never refuses a value for an annotation
it does not understand.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import OptionsError

Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class TypeCheck:
    """One option's declared type: how it reads, and whether a value conforms."""

    text: str
    accepts: Predicate


def _any(value: Any) -> bool:
    return True


def _by_name(name: str) -> Predicate:
    """An instance of a class named ``name`` (the class itself was not imported at run time)."""
    return lambda value: any(cls.__name__ == name for cls in type(value).__mro__)


def _instance_of(cls: type) -> Predicate:
    if cls is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if cls is float:
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    if cls is type(None):
        return lambda value: value is None
    if cls is collections.abc.Sequence:
        return lambda value: isinstance(value, cls) and not isinstance(value, str)

    def accepts(value: Any) -> bool:
        try:
            return isinstance(value, cls)
        except TypeError:  # e.g. a Protocol that is not runtime-checkable: cannot be checked, so accepted
            return True

    return accepts


def _from_object(obj: Any) -> Predicate:
    """A check for a run-time annotation object (a class, ``Any``, a typing alias)."""
    if obj is Any or obj is object:
        return _any
    origin = typing.get_origin(obj)
    if origin is typing.Literal:
        allowed = typing.get_args(obj)
        return lambda value: value in allowed
    if origin in (typing.Union, types.UnionType):
        parts = [_from_object(arg) for arg in typing.get_args(obj)]
        return lambda value: any(part(value) for part in parts)
    if origin is type:
        return lambda value: isinstance(value, type)
    if origin is not None:
        return _from_object(origin)
    if obj is None:
        return lambda value: value is None
    if isinstance(obj, type):
        return _instance_of(obj)
    return _any


@functools.cache
def _import_aliases(module_name: str) -> dict[str, str]:
    """``{alias: original class name}`` of the module's ``from x import Name as Alias`` statements (also those
    under ``if TYPE_CHECKING:``), read from its source, so a name the module binds only for type checkers is
    matched by the class's real name."""
    module = sys.modules.get(module_name)
    try:
        tree = ast.parse(inspect.getsource(module)) if module is not None else None
    except (OSError, TypeError, SyntaxError):
        return {}
    return {alias.asname: alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.asname and alias.asname != alias.name} if tree else {}


class _Parser:
    """Turns one annotation string into a predicate, resolving names in the namespace of ``module_name``."""

    def __init__(self, module_name: str) -> None:
        module = sys.modules.get(module_name)
        self.module_name = module_name
        self.namespace: Mapping[str, Any] = vars(module) if module is not None else {}

    def parse(self, text: str) -> Predicate:
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError:
            return _any
        return self.node(node)

    def node(self, node: ast.expr) -> Predicate:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            parts = [self.node(node.left), self.node(node.right)]
            return lambda value: any(part(value) for part in parts)
        if isinstance(node, ast.Constant):
            if node.value is None:
                return lambda value: value is None
            return self.parse(node.value) if isinstance(node.value, str) else _any
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, (ast.Name, ast.Attribute)):
            return self.name(node)
        return _any

    def resolve(self, node: ast.expr) -> tuple[bool, Any, str]:
        """``(found, object, last name)`` of a (dotted) name, looked up without importing anything."""
        if isinstance(node, ast.Name):
            if node.id in self.namespace:
                return True, self.namespace[node.id], node.id
            return hasattr(builtins, node.id), getattr(builtins, node.id, None), node.id
        if isinstance(node, ast.Attribute):
            found, obj, _ = self.resolve(node.value)
            if found and hasattr(obj, node.attr):
                return True, getattr(obj, node.attr), node.attr
            return False, None, node.attr
        return False, None, ""

    def name(self, node: ast.expr) -> Predicate:
        found, obj, name = self.resolve(node)
        return _from_object(obj) if found else _by_name(_import_aliases(self.module_name).get(name, name))

    def subscript(self, node: ast.Subscript) -> Predicate:
        found, base, name = self.resolve(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Literal":
            try:
                allowed = [ast.literal_eval(arg) for arg in args]
            except ValueError:
                return _any
            return lambda value: value in allowed
        if name in ("Optional", "Union"):
            parts = [self.node(arg) for arg in args] + ([lambda value: value is None] if name == "Optional" else [])
            return lambda value: any(part(value) for part in parts)
        if name == "type":
            return lambda value: isinstance(value, type)
        return _from_object(base) if found else _by_name(name)


def _declaring_module(options_class: type, field_name: str) -> str:
    """The name of the module whose class in ``options_class``'s MRO declared ``field_name``."""
    for cls in options_class.__mro__:
        if field_name in cls.__dict__.get("__annotations__", {}):
            return cls.__module__
    return options_class.__module__


def _text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@functools.cache
def option_checks(options_class: type) -> dict[str, TypeCheck]:
    """``{option: TypeCheck}`` for every field of an options dataclass (computed once per class)."""
    checks = {}
    for f in dataclasses.fields(options_class):
        if isinstance(f.type, str):
            accepts = _Parser(_declaring_module(options_class, f.name)).parse(f.type)
        else:
            accepts = _from_object(f.type)
        checks[f.name] = TypeCheck(_text(f.type), accepts)
    return checks


def check_option_types(options: Any, strategy_name: str) -> None:
    """Raise :class:`OptionsError` naming the first option whose value does not have its declared type."""
    for name, check in option_checks(type(options)).items():
        value = getattr(options, name)
        if not check.accepts(value):
            raise OptionsError(
                f"Option {name!r} of strategy {strategy_name!r} must be {check.text}, got {value!r} "
                f"({type(value).__name__}).")
