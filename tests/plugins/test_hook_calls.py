"""Registration hooks are called through pluggy: hook wrappers wrap every plugin, each registration keeps
the provenance of the plugin that made it, and a plugin that raises is dropped without costing the others."""

from __future__ import annotations

import sys
import types

import pytest

import meshplan
from meshplan import RegistrationError
from meshplan.plugins.manager import PluginHost
from meshplan.plugins.policy import LoadPolicy

calls: list[str] = []


class Alpha(meshplan.Strategy):
    name = "alpha"

    def parallelize(self, model, device_mesh, plan, options):
        return model


def _module(name: str, **hooks) -> str:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    sys.modules[name] = module
    return name


@meshplan.hookimpl
def _alpha_strategies(register):
    calls.append("alpha")
    register(Alpha)


@meshplan.hookimpl(wrapper=True)
def _wrapping_strategies(register):
    calls.append("wrapper before")
    register(Alpha, name="from_wrapper")
    result = yield
    calls.append("wrapper after")
    return result


@meshplan.hookimpl(hookwrapper=True)
def _old_style_wrapping_styles(register):
    calls.append("old-style wrapper before")
    yield
    calls.append("old-style wrapper after")


@meshplan.hookimpl
def _broken_strategies(register):
    register("nowhere:Nothing", name="halfway")
    raise ValueError("boom in hook")


class StylePlugin:
    """Two instances of one plugin class share their hook's code; ``self`` tells them apart."""

    def __init__(self, style: str) -> None:
        self.style = style

    @meshplan.hookimpl
    def meshplan_register_styles(self, register):
        calls.append(self.style)
        register(self.style, "torch.distributed.tensor.parallel:ColwiseParallel")


@pytest.fixture
def host(monkeypatch):
    calls.clear()
    names = [
        _module("plug_alpha", meshplan_register_strategies=_alpha_strategies),
        _module("plug_wrap", meshplan_register_strategies=_wrapping_strategies,
                meshplan_register_styles=_old_style_wrapping_styles),
        _module("plug_broken", meshplan_register_strategies=_broken_strategies),
    ]
    for name, style in (("plug_style_one", "style_one"), ("plug_style_two", "style_two")):
        monkeypatch.setitem(sys.modules, name, StylePlugin(style))
        names.append(name)
    host = PluginHost(LoadPolicy(allow=frozenset()), builtins=tuple(names))
    host.load()
    yield host
    for name in names:
        sys.modules.pop(name, None)


def test_hook_wrappers_wrap_every_plugin_and_provenance_stays_per_plugin(host):
    strategies = host.registry.strategies
    assert strategies.find("alpha").provenance.plugin == "plug_alpha"
    assert strategies.find("from_wrapper").provenance.plugin == "plug_wrap"
    assert calls.index("wrapper before") < calls.index("alpha") < calls.index("wrapper after")
    assert calls.index("old-style wrapper before") < calls.index("style_one") < calls.index("old-style wrapper after")
    assert host.registry.styles.find("style_one").provenance.plugin == "plug_style_one"
    assert host.registry.styles.find("style_two").provenance.plugin == "plug_style_two"


def test_a_raising_plugin_is_dropped_whole_and_the_others_keep_theirs(host):
    broken = host.records["plug_broken"]
    assert broken.status == "failed" and "boom in hook" in broken.error
    assert broken.contributions == [("strategy", "halfway")]
    assert "halfway" not in host.registry.strategies and "alpha" in host.registry.strategies
    assert host.records["plug_alpha"].contributions == [("strategy", "alpha")]


def test_runtime_registration_is_typed_per_kind(host):
    reg = host.register_strategy(Alpha, "beta", aliases=("b",))
    assert (reg.kind, reg.key, reg.aliases, reg.provenance.plugin) == ("strategy", "beta", ("b",), "<runtime>")
    assert host.register_tp_plan("pkg.Model", {"proj": "colwise"}).key == "pkg.Model"
    assert host.register_style("gamma", "torch.distributed.tensor.parallel:RowwiseParallel").kind == "style"
    with pytest.raises(TypeError):
        host.register_style("delta", "x:y", aliases=("d",))  # styles have no aliases: a type error, not ignored
    assert not hasattr(host, "register_runtime")


def test_register_kept_for_later_is_refused(monkeypatch):
    kept = []

    @meshplan.hookimpl
    def keep(register):
        kept.append(register)

    name = _module("plug_keeper", meshplan_register_styles=keep)
    PluginHost(LoadPolicy(allow=frozenset()), builtins=(name,)).load()
    sys.modules.pop(name)
    with pytest.raises(RegistrationError, match="outside a plugin's hook implementation"):
        kept[0]("late", "x:y")


@meshplan.hookimpl
def _shared_styles(register):
    register("shared_style", "torch.distributed.tensor.parallel:ColwiseParallel")


def test_code_shared_by_two_plugins_falls_back_to_one_call_per_plugin():
    """One function registered as the hook of two plugins cannot be told apart by its code: the hook is then
    called plugin by plugin, each registration still credited to its own plugin."""
    names = [_module("plug_shared_one", meshplan_register_styles=_shared_styles),
             _module("plug_shared_two", meshplan_register_styles=_shared_styles),
             _module("plug_alpha", meshplan_register_strategies=_alpha_strategies)]
    try:
        host = PluginHost(LoadPolicy(allow=frozenset()), builtins=tuple(names))
        host.load()
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert {name: host.records[name].contributions for name in names[:2]} == {
        name: [("style", "shared_style")] for name in names[:2]}
    assert host.records["plug_alpha"].contributions == [("strategy", "alpha")]
    assert {r.provenance.plugin for r in host.registry.styles.registrations() if r.key == "shared_style"} == {
        "plug_shared_one", "plug_shared_two"}
