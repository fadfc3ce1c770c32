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


def test_code_shared_by_two_plugins_is_credited_to_each():
    """One function registered as the hook of two plugins: each plugin's registrar is bound to that plugin, so
    each registration is credited to its own plugin."""
    names = ["plug_shared_one", "plug_shared_two", "plug_alpha"]
    host = _load(plug_shared_one={"meshplan_register_styles": _shared_styles},
                 plug_shared_two={"meshplan_register_styles": _shared_styles},
                 plug_alpha={"meshplan_register_strategies": _alpha_strategies})
    assert {name: host.records[name].contributions for name in names[:2]} == {
        name: [("style", "shared_style")] for name in names[:2]}
    assert host.records["plug_alpha"].contributions == [("strategy", "alpha")]
    assert {r.provenance.plugin for r in host.registry.styles.registrations() if r.key == "shared_style"} == {
        "plug_shared_one", "plug_shared_two"}


def _load(**plugins) -> PluginHost:
    """A host with these in-process plugins (module name -> hooks) and no entry points."""
    names = [_module(name, **hooks) for name, hooks in plugins.items()]
    try:
        host = PluginHost(LoadPolicy(allow=frozenset()), builtins=tuple(names))
        host.load()
    finally:
        for name in names:
            sys.modules.pop(name, None)
    return host


@meshplan.hookimpl
def meshplan_register_strategy(register):  # misspelled: the hook is meshplan_register_strategies
    register(Alpha, name="never")


def test_a_misspelled_hook_fails_its_plugin_with_the_closest_name():
    host = _load(plug_typo=dict(meshplan_register_strategy=meshplan_register_strategy,
                                meshplan_register_styles=_shared_styles),
                 plug_alpha=dict(meshplan_register_strategies=_alpha_strategies))
    typo = host.records["plug_typo"]
    assert typo.status == "failed" and typo.contributions == []
    assert typo.error.startswith("UnknownHookError: It implements 'meshplan_register_strategy'")
    assert "Did you mean 'meshplan_register_strategies'?" in typo.error
    assert "never" not in host.registry.strategies and "shared_style" not in host.registry.styles
    assert host.records["plug_alpha"].contributions == [("strategy", "alpha")]


def test_a_misspelled_hook_is_fatal_in_strict_mode():
    name = _module("plug_typo_strict", meshplan_register_strategy=meshplan_register_strategy)
    try:
        with pytest.raises(meshplan.PluginLoadError, match="plug_typo_strict.*meshplan_register_strategy"):
            PluginHost(LoadPolicy(allow=frozenset(), raise_errors=True), builtins=(name,)).load()
    finally:
        sys.modules.pop(name)


@meshplan.hookimpl(wrapper=True)
def _silent_wrapper(register):
    if register is None:  # a wrapper that yields only sometimes
        yield
    return []


@meshplan.hookimpl(wrapper=True)
def _failing_teardown(register):
    yield
    raise RuntimeError("boom after yield")


def test_a_broken_wrapper_is_blamed_on_its_plugin():
    """A wrapper that never yields, or raises in its teardown, fails its own plugin, not the ones it wraps."""
    host = _load(plug_silent=dict(meshplan_register_styles=_silent_wrapper),
                 plug_teardown=dict(meshplan_register_strategies=_failing_teardown),
                 plug_alpha=dict(meshplan_register_strategies=_alpha_strategies),
                 plug_style=dict(meshplan_register_styles=_shared_styles))
    assert host.records["plug_silent"].status == "failed"
    assert "HookWrapperError: hook wrapper _silent_wrapper did not yield" in host.records["plug_silent"].error
    assert host.records["plug_teardown"].status == "failed"
    assert "boom after yield" in host.records["plug_teardown"].error
    assert host.records["plug_alpha"].contributions == [("strategy", "alpha")]
    assert host.records["plug_style"].contributions == [("style", "shared_style")]


def test_an_error_raised_inside_a_wrapper_is_blamed_on_the_implementation_that_raised():
    host = _load(plug_wrap=dict(meshplan_register_strategies=_wrapping_strategies),
                 plug_broken=dict(meshplan_register_strategies=_broken_strategies),
                 plug_alpha=dict(meshplan_register_strategies=_alpha_strategies))
    assert host.records["plug_broken"].status == "failed"
    assert {name: host.records[name].status for name in ("plug_wrap", "plug_alpha")} == {
        "plug_wrap": "loaded", "plug_alpha": "loaded"}
    assert host.registry.strategies.find("from_wrapper").provenance.plugin == "plug_wrap"


def test_the_hooks_still_take_a_plain_callback():
    """Calling a registered plugin's hook directly through pluggy (no meshplan host call) passes the callback."""
    seen = []
    host = _load(plug_alpha=dict(meshplan_register_strategies=_alpha_strategies))
    host.pm.hook.meshplan_register_strategies(register=lambda *args, **kwargs: seen.append(args))
    assert seen == [(Alpha,)]
