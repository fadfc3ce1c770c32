"""The plugin manager: discovers plugins once, lazily, and fills the registry through the hooks.

Built-in plugins and third-party ones (entry-point group ``meshplan``) go through exactly the same
hooks. A plugin is registered with pluggy as a :class:`~meshplan.plugins.registrar.BoundPlugin`, whose hook
implementations each receive a ``register`` callback bound to that plugin, and is checked at once
(``check_pending``): a hook implementation no specification knows (a misspelled hook name) fails the plugin.
Each hook is called once through pluggy, so hook wrappers work; a plugin that raises is skipped whole (its
partial registrations are dropped). Registration is typed: one
builder per hook kind (:mod:`meshplan.plugins.registrations`), and one method per kind for runtime
registration (``register_strategy``, ``register_tp_plan``, ``register_style``).
"""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import importlib_metadata
import pluggy

from .._version import __version__
from ..core.errors import PluginLoadError, RegistrationError, UnknownHookError
from ..core.log import get_logger, log_rank0
from ..core.naming import did_you_mean
from ..core.registry import Provenance, Registration, Registry, Tier
from . import hookspecs
from .policy import LoadPolicy
from .registrar import BoundPlugin, HookCall
from .registrations import HOOKS, strategy_registration, style_registration, tp_plan_registration

logger = get_logger(__name__)

ENTRY_POINT_GROUP = "meshplan"

#: Built-in plugin modules, registered exactly like third-party plugins. ``hf`` comes last in the
#: listing; plan precedence comes from the model's MRO, not from this order.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "meshplan.plans.builtin_styles",
    "meshplan.strategies.fsdp2",
    "meshplan.strategies.ddp",
    "meshplan.strategies.megatron_fsdp",
    "meshplan.plans.llama",
    "meshplan.plans.llama4",
    "meshplan.plans.qwen",
    "meshplan.plans.gemma3",
    "meshplan.plans.gemma3n",
    "meshplan.plans.gemma4",
    "meshplan.plans.phi3",
    "meshplan.plans.mixtral",
    "meshplan.plans.qwen3_moe",
    "meshplan.plans.deepseek",
    "meshplan.plans.inkling",
    "meshplan.plans.zaya",
    "meshplan.plans.hf",
)

RUNTIME_PLUGIN = "<runtime>"


@dataclass
class PluginRecord:
    """What happened to one plugin: loaded, failed, disabled or not in the allow-list."""

    name: str
    source: str  # "builtin" | "entry_point" | "runtime"
    status: str = "loaded"  # "loaded" | "failed" | "disabled" | "not_allowed"
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    traceback: str | None = None
    contributions: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "status": self.status,
            "distribution": self.distribution, "version": self.version, "error": self.error,
            "contributions": [{"kind": k, "key": key} for k, key in self.contributions],
        }


class PluginHost:
    """Owns the pluggy manager, the plugin records and the registry they fill."""

    def __init__(self, policy: LoadPolicy | None = None, builtins: tuple[str, ...] = BUILTIN_PLUGINS) -> None:
        self.policy = policy or LoadPolicy.from_env()
        self.builtins = builtins
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.records: dict[str, PluginRecord] = {}

    # ---------------------------------------------------------------------------------- loading
    def load(self) -> None:
        for module in self.builtins:
            self._load_builtin(module)
        for entry_point in _unique_entry_points():
            self._load_entry_point(entry_point)
        self._collect_registrations()

    def _load_builtin(self, module_name: str) -> None:
        short = module_name.rsplit(".", 1)[-1]
        record = PluginRecord(module_name, "builtin", distribution="meshplan", version=__version__)
        self.records[module_name] = record
        if self.policy.is_disabled((module_name, short)):
            record.status = "disabled"
            return
        self._register_plugin(record, lambda: importlib.import_module(module_name))

    def _load_entry_point(self, ep: importlib_metadata.EntryPoint) -> None:
        dist = ep.dist.name if ep.dist is not None else None
        record = PluginRecord(ep.name, "entry_point", distribution=dist,
                              version=ep.dist.version if ep.dist is not None else None)
        if ep.name in self.records:  # a second distribution reusing the name
            record.name = f"{ep.name}@{dist}"
        self.records[record.name] = record
        if self.policy.is_disabled((ep.name, dist)):
            record.status = "disabled"
        elif not self.policy.is_allowed((ep.name, dist)):
            record.status = "not_allowed"
        else:
            self._register_plugin(record, ep.load)

    def _register_plugin(self, record: PluginRecord, load: Callable[[], Any]) -> None:
        try:
            self.pm.register(BoundPlugin(self.pm, load(), record.name), name=record.name)
            self._check_hook_names(record.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            self._fail(record, exc, "failed to load")

    def _check_hook_names(self, name: str) -> None:
        """pluggy's ``check_pending`` for the plugin just registered (the ones before it passed): a hook
        implementation that no specification knows is an error naming the hook and the closest known one."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            known = [hook for hook in vars(self.pm.hook) if not hook.startswith("_")
                     and getattr(self.pm.hook, hook).has_spec()]
            unknown = [caller.name for caller in self.pm.get_hookcallers(self.pm.get_plugin(name)) or ()
                       if not caller.has_spec()]
            raise UnknownHookError(" ".join(
                f"It implements {hook!r}, which is no meshplan hook.{did_you_mean(hook, known)}" for hook in unknown
            ) + f" (meshplan's hooks: {', '.join(sorted(known))})") from None

    def _collect_registrations(self) -> None:
        pending: dict[str, list[Registration]] = {}
        for hook_name, build in HOOKS:
            for plugin, registrations in self._call_hook(hook_name, build).items():
                pending.setdefault(plugin, []).extend(registrations)
        for name, registrations in pending.items():
            record = self.records[name]
            if record.status == "loaded":
                for reg in registrations:
                    self.registry.table(reg.kind).add(reg)
                record.contributions = [(r.kind, r.key) for r in registrations]

    def _call_hook(self, hook_name: str, build: Callable[..., Registration]) -> dict[str, list[Registration]]:
        """Call one registration hook through pluggy (hook wrappers included); ``{plugin: registrations}``.

        A plugin whose implementation raises is failed and unregistered, and the hook is called again without
        it, so one broken plugin never costs the others their registrations.
        """
        while True:
            call = HookCall(hook_name, build, self._provenance_of)
            try:
                getattr(self.pm.hook, hook_name)(register=call)
                return call.collected
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
                culprit = call.culprit(exc)
                if culprit is None:  # no plugin code raised it: meshplan's own bug, not a plugin's
                    raise
                record = self.records[culprit]
                record.contributions = [(r.kind, r.key) for r in call.collected.get(culprit, [])]
                self._fail(record, exc, f"raised in {hook_name}")
            finally:
                call.open = False

    def _provenance_of(self, name: str) -> Provenance:
        return self._provenance(self.records[name])

    def _provenance(self, record: PluginRecord) -> Provenance:
        tier = {"builtin": Tier.BUILTIN, "entry_point": Tier.PLUGIN}.get(record.source, Tier.RUNTIME)
        return Provenance(record.name, tier, record.distribution, record.version)

    def _fail(self, record: PluginRecord, exc: BaseException, what: str) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.traceback = traceback.format_exc()
        if record.name in (p for p, _ in self.pm.list_name_plugin()):
            self.pm.unregister(name=record.name)
        where = f" (distribution {record.distribution} {record.version})" if record.distribution else ""
        message = f"meshplan plugin {record.name!r}{where} {what}: {record.error}"
        if self.policy.raise_errors:
            raise PluginLoadError(message) from exc
        log_rank0(logger, logging.WARNING, "%s; skipping it (set MESHPLAN_PLUGIN_ERRORS=raise to fail).",
                  message)

    # ------------------------------------------------------------------------- runtime registration
    def register_strategy(
        self, strategy: Any, name: str | None = None, *, aliases: Sequence[str] = (), priority: int = 0,
        override: bool = False,
    ) -> Registration:
        """``meshplan.register_strategy``: a strategy class, instance or dotted path, above every plugin."""
        return self._add_runtime(strategy_registration(
            self._runtime_provenance(), strategy, name, aliases=aliases, priority=priority, override=override))

    def register_tp_plan(
        self, model_class: type | str, provider: Any, *, priority: int = 0, override: bool = False,
    ) -> Registration:
        """``meshplan.register_tp_plan``: a TP plan provider for a model class, above every plugin."""
        return self._add_runtime(tp_plan_registration(
            self._runtime_provenance(), model_class, provider, priority=priority, override=override))

    def register_style(
        self, name: str, factory: Any, *, priority: int = 0, override: bool = False,
    ) -> Registration:
        """``meshplan.register_style``: a parallel-style name, above every plugin."""
        return self._add_runtime(style_registration(
            self._runtime_provenance(), name, factory, priority=priority, override=override))

    def _runtime_provenance(self) -> Provenance:
        return self._provenance(self.records.setdefault(RUNTIME_PLUGIN, PluginRecord(RUNTIME_PLUGIN, "runtime")))

    def _add_runtime(self, reg: Registration) -> Registration:
        """The highest tier; replacing an existing name needs ``override=True``."""
        table = self.registry.table(reg.kind)
        for key in (reg.key, *reg.aliases):
            existing = [r for r in table.candidates(key) if r.target_id != reg.target_id]
            if existing and not reg.override:
                raise RegistrationError(
                    f"{table.kind} {key!r} is already provided by {existing[0].provenance.describe()}; "
                    "pass override=True to replace it."
                )
            if reg.override:
                table.discard(key, Tier.RUNTIME)
        table.add(reg)
        self.records[RUNTIME_PLUGIN].contributions.append((reg.kind, reg.key))
        return reg

    def unregister(self, kind: str, key: str) -> list[Registration]:
        """Remove every registration of ``kind`` under ``key``, whatever its tier, until plugins are discovered
        again (:func:`reset`); returns the removed registrations (empty if there were none)."""
        removed = self.registry.table(kind).remove(key)
        for reg in removed:
            record = self.records.get(reg.provenance.plugin)
            if record is not None and (reg.kind, reg.key) in record.contributions:
                record.contributions.remove((reg.kind, reg.key))
        return removed

    # ------------------------------------------------------------------------------ diagnostics
    def failure_hint(self, kind: str, key: str) -> str:
        """A sentence naming failed plugins that provide (or might provide) ``key``."""
        failed = [r for r in self.records.values() if r.status == "failed"]
        exact = [r for r in failed if (kind, key) in r.contributions]
        pool = exact or failed
        if not pool:
            return ""
        names = "; ".join(f"{r.name!r} ({r.error})" for r in pool)
        verb = "provides it but failed" if exact else "failed to load and may provide it"
        return f" Plugin {names} {verb}; see `meshplan plugins`."


def _unique_entry_points() -> list[importlib_metadata.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            unique.append(ep)
    return unique


_host: PluginHost | None = None
_lock = threading.RLock()


def get_host() -> PluginHost:
    """The process-wide plugin host, loading plugins on first use."""
    global _host
    with _lock:
        if _host is None:
            host = PluginHost()
            host.load()
            _host = host
        return _host


def get_registry() -> Registry:
    """The loaded registry (plugins are discovered on the first call)."""
    return get_host().registry


def reset() -> None:
    """Forget all plugins and registrations; the next lookup discovers them again."""
    global _host
    with _lock:
        _host = None
