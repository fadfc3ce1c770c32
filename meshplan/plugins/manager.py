"""The plugin manager: discovers plugins once, lazily, and fills the registry through the hooks.

Built-in plugins and third-party ones (entry-point group ``meshplan``) go through exactly the same
hooks. Each plugin's hooks are called one plugin at a time so every registration carries its
provenance, and a plugin that raises is skipped whole (its partial registrations are dropped).
"""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import importlib_metadata
import pluggy

from .._version import __version__
from ..core.errors import PluginLoadError, RegistrationError
from ..core.log import get_logger, log_rank0
from ..core.registry import Provenance, Registration, Registry, Tier, class_key
from . import hookspecs
from .policy import LoadPolicy

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
    "meshplan.plans.qwen",
    "meshplan.plans.gemma3",
    "meshplan.plans.phi3",
    "meshplan.plans.mixtral",
    "meshplan.plans.qwen3_moe",
    "meshplan.plans.deepseek",
    "meshplan.plans.hf",
)

RUNTIME_PLUGIN = "<runtime>"

HOOKS: tuple[tuple[str, str], ...] = (
    ("meshplan_register_styles", "style"),
    ("meshplan_register_strategies", "strategy"),
    ("meshplan_register_tp_plans", "tp_plan"),
)


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


def _make_registration(kind: str, provenance: Provenance, *args: Any, **kwargs: Any) -> Registration:
    """Build a registration from a ``register(...)`` call of the given kind."""
    priority = int(kwargs.pop("priority", 0))
    override = bool(kwargs.pop("override", False))
    if kind == "strategy":
        strategy, *rest = args
        name = kwargs.pop("name", None) or (rest[0] if rest else None)
        aliases = tuple(kwargs.pop("aliases", ()) or ())
        if name is None:
            if isinstance(strategy, str):
                raise RegistrationError(f"Registering strategy {strategy!r} by path needs name=...")
            name = getattr(strategy, "name", None)
            aliases = aliases or tuple(getattr(strategy, "aliases", ()))
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"Strategy {strategy!r} has no name; pass name=... to register().")
        reg = Registration(kind, name, strategy, provenance, priority, override, aliases)
    elif kind == "tp_plan":
        model_class, provider = args
        reg = Registration(kind, class_key(model_class), provider, provenance, priority, override)
    else:
        name, factory = args
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"A parallel style needs a non-empty name, got {name!r}.")
        reg = Registration(kind, name, factory, provenance, priority, override)
    if kwargs:
        raise RegistrationError(f"Unknown arguments to register a {kind}: {sorted(kwargs)}.")
    return reg


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
            plugin = load()
            self.pm.register(plugin, name=record.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            self._fail(record, exc, "failed to load")

    def _collect_registrations(self) -> None:
        pending: dict[str, list[Registration]] = {}
        for hook_name, kind in HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                record = self.records[impl.plugin_name]
                if record.status != "loaded":
                    continue
                provenance = self._provenance(record)
                collected = pending.setdefault(record.name, [])

                def register(*args: Any, _kind: str = kind, _prov: Provenance = provenance,
                             _into: list[Registration] = collected, **kwargs: Any) -> None:
                    _into.append(_make_registration(_kind, _prov, *args, **kwargs))

                try:
                    impl.function(register) if impl.argnames else impl.function()
                except Exception as exc:  # noqa: BLE001
                    record.contributions = [(r.kind, r.key) for r in collected]
                    self._fail(record, exc, f"raised in {hook_name}")
        for name, registrations in pending.items():
            record = self.records[name]
            if record.status == "loaded":
                for reg in registrations:
                    self.registry.table(reg.kind).add(reg)
                record.contributions = [(r.kind, r.key) for r in registrations]

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
    def register_runtime(self, kind: str, *args: Any, **kwargs: Any) -> Registration:
        """``meshplan.register_*``: the highest tier; replacing an existing name needs override=True."""
        record = self.records.setdefault(RUNTIME_PLUGIN, PluginRecord(RUNTIME_PLUGIN, "runtime"))
        reg = _make_registration(kind, self._provenance(record), *args, **kwargs)
        table = self.registry.table(kind)
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
        record.contributions.append((reg.kind, reg.key))
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
