"""Which plugin's hook implementation is running: provenance for registrations made in one pluggy call.

meshplan calls each registration hook once, through pluggy (``pm.hook.<name>(register=...)``), so hook
wrappers (``wrapper=True`` / ``hookwrapper=True``) wrap every plugin's implementation as in any pluggy
application. The one ``register`` callback then has to know who called it: :class:`HookOwners` maps the
code of every implementation (decorated ones unwrapped too) to its plugin and finds the innermost such frame
on the stack, or in an exception's traceback. Methods of several instances of one plugin class are told
apart by their ``self``. :class:`RegisterCallback` is that callback.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType, TracebackType
from typing import Any

from pluggy import HookImpl

from ..core.errors import RegistrationError
from ..core.registry import Provenance, Registration


class HookOwners:
    """The plugins behind one hook's implementations, found by their code objects."""

    def __init__(self, impls: Iterable[HookImpl]) -> None:
        self._owners: dict[CodeType, list[tuple[str, Any]]] = {}
        for impl in impls:
            for function in {impl.function, inspect.unwrap(impl.function)}:
                code = getattr(function, "__code__", None)
                if code is not None:
                    self._owners.setdefault(code, []).append((impl.plugin_name, impl.plugin))

    def _owner(self, frame: FrameType) -> str | None:
        candidates = self._owners.get(frame.f_code)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0][0]
        instance = frame.f_locals.get("self")
        return next((name for name, plugin in candidates if plugin is instance), None)

    def calling_plugin(self) -> str | None:
        """The plugin whose implementation is (innermost) on the current stack, else ``None``."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = self._owner(frame)
            if owner is not None:
                return owner
            frame = frame.f_back
        return None

    def raising_plugin(self, exc: BaseException) -> str | None:
        """The plugin whose implementation raised ``exc`` (innermost in its traceback), else ``None``."""
        owners = [owner for owner in map(self._owner, _frames(exc.__traceback__)) if owner is not None]
        return owners[-1] if owners else None


class RegisterCallback:
    """The ``register`` callback of one hook call: builds registrations, each credited to the plugin that
    ``caller()`` names (``collected``: ``{plugin: registrations}``)."""

    def __init__(self, hook_name: str, build: Callable[..., Registration], caller: Callable[[], str | None],
                 provenance: Callable[[str], Provenance]) -> None:
        self.hook_name, self.build, self.caller, self.provenance = hook_name, build, caller, provenance
        self.collected: dict[str, list[Registration]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        plugin = self.caller()
        if plugin is None:
            raise RegistrationError(f"The register callback of {self.hook_name} was called outside a plugin's "
                                    "hook implementation (or by code shared by several plugins); call it while "
                                    "the hook runs.")
        self.collected.setdefault(plugin, []).append(self.build(self.provenance(plugin), *args, **kwargs))


def _frames(tb: TracebackType | None) -> Iterator[FrameType]:
    """The frames of a traceback, outermost first."""
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next
