"""Registrars bound to each plugin: who registered what, without inspecting the stack.

meshplan calls each registration hook once, through pluggy (``pm.hook.<name>(register=...)``), so hook
wrappers (``wrapper=True`` / ``hookwrapper=True``) wrap every plugin's implementation as in any pluggy
application. What pluggy registers for a plugin is a :class:`BoundPlugin`: the plugin's hook implementations,
each wrapped so that it receives a ``register`` callback bound to its own plugin (the pattern of tox's typed
registrars) and so that an exception it raises is blamed on that plugin. :class:`HookCall` is one call of one
hook: it hands out those callbacks, collects the registrations per plugin and remembers who raised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pluggy

from ..core.errors import HookWrapperError, RegistrationError
from ..core.registry import Provenance, Registration
from .hookspecs import PROJECT_NAME

#: The argument of every registration hook that receives the plugin's registrar.
REGISTER_ARGUMENT = "register"
IMPL_MARKER = f"{PROJECT_NAME}_impl"


class HookCall:
    """One call of one registration hook: a registrar per plugin, the registrations collected per plugin
    (``collected``), and the plugin whose implementation raised (:meth:`culprit`)."""

    def __init__(self, hook_name: str, build: Callable[..., Registration],
                 provenance: Callable[[str], Provenance]) -> None:
        self.hook_name, self.build, self.provenance = hook_name, build, provenance
        self.collected: dict[str, list[Registration]] = {}
        self.open = True
        self._raised_by: dict[int, str] = {}  # id(exception) -> plugin, the innermost implementation's

    def registrar(self, plugin: str) -> Callable[..., None]:
        """The ``register`` callback ``plugin``'s implementations receive; it works while the hook runs."""

        def register(*args: Any, **kwargs: Any) -> None:
            if not self.open:
                raise RegistrationError(f"The register callback of {self.hook_name} was called outside a plugin's "
                                        "hook implementation (after the hook returned); call it while the hook runs.")
            self.collected.setdefault(plugin, []).append(self.build(self.provenance(plugin), *args, **kwargs))

        return register

    @contextlib.contextmanager
    def blaming(self, plugin: str) -> Iterator[None]:
        """Credit an exception leaving the block to ``plugin``, unless an inner implementation raised it."""
        try:
            yield
        except BaseException as exc:
            self._raised_by.setdefault(id(exc), plugin)
            raise

    def culprit(self, exc: BaseException) -> str | None:
        return self._raised_by.get(id(exc))


class BoundPlugin:
    """What pluggy registers for one plugin: each of its hook implementations (marked with ``@hookimpl``,
    known hook or not, so ``check_pending`` sees misspelled ones), bound to the plugin's name."""

    def __init__(self, pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
        self.plugin, self.name = plugin, name
        for attribute in dir(plugin):
            opts = pm.parse_hookimpl_opts(plugin, attribute)
            if opts is not None:
                setattr(self, attribute, _bind(getattr(plugin, attribute), opts, name))

    def __repr__(self) -> str:
        return f"<meshplan plugin {self.name!r}: {self.plugin!r}>"


def _bind(function: Callable[..., Any], opts: Any, plugin: str) -> Callable[..., Any]:
    """``function`` receiving ``plugin``'s registrar in place of the hook call's ``register`` and blamed for what
    it raises; a generator function (a hook wrapper) stays one, so pluggy drives it as before."""

    def prepared(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[HookCall | None, tuple, dict[str, Any]]:
        call = next((value for value in (*args, *kwargs.values()) if isinstance(value, HookCall)), None)
        if call is None:  # called with a plain callback, not by meshplan's host
            return None, args, kwargs
        own = call.registrar(plugin)
        return (call, tuple(own if value is call else value for value in args),
                {key: own if value is call else value for key, value in kwargs.items()})

    def blame(call: HookCall | None) -> contextlib.AbstractContextManager[None]:
        return call.blaming(plugin) if call is not None else contextlib.nullcontext()

    if inspect.isgeneratorfunction(inspect.unwrap(function)):

        def bound(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            call, args, kwargs = prepared(args, kwargs)
            with blame(call):
                return (yield from _one_yield(function(*args, **kwargs), function))
    else:

        def bound(*args: Any, **kwargs: Any) -> Any:
            call, args, kwargs = prepared(args, kwargs)
            with blame(call):
                return function(*args, **kwargs)

    functools.update_wrapper(bound, function, updated=())
    setattr(bound, IMPL_MARKER, opts)
    return bound


def _one_yield(wrapper: Generator[Any, Any, Any], function: Callable[..., Any]) -> Generator[Any, Any, Any]:
    """Drive a hook wrapper through pluggy's protocol (exactly one ``yield``), so a wrapper that breaks it raises
    inside its plugin's blame (pluggy would raise outside any plugin)."""
    name = getattr(function, "__qualname__", repr(function))
    try:
        value = next(wrapper)
    except StopIteration:
        raise HookWrapperError(f"hook wrapper {name} did not yield") from None
    try:
        sent = yield value
    except GeneratorExit:
        wrapper.close()
        raise
    except BaseException as thrown:  # what the wrapped implementations raised: the wrapper sees it
        resume = functools.partial(wrapper.throw, thrown)
    else:
        resume = functools.partial(wrapper.send, sent)
    try:
        resume()
    except StopIteration as stop:
        return stop.value
    wrapper.close()
    raise HookWrapperError(f"hook wrapper {name} has a second yield")
