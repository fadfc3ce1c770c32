"""End to end: installed distributions with a ``meshplan`` entry point, seen through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.plugins.distributions import (
    GOOD_PLUGIN,
    HOOK_BROKEN_PLUGIN,
    IMPORT_BROKEN_PLUGIN,
    MISSPELLED_HOOK_PLUGIN,
    make_distribution,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = tmp_path_factory.mktemp("site")
    make_distribution(path, "meshplan-goodplug", "goodplug", GOOD_PLUGIN, "good")
    make_distribution(path, "meshplan-importbroken", "importbroken", IMPORT_BROKEN_PLUGIN, "importbroken")
    make_distribution(path, "meshplan-hookbroken", "hookbroken", HOOK_BROKEN_PLUGIN, "hookbroken")
    return path


def cli(site, *args, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESHPLAN_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(site), environment.get("PYTHONPATH", "")])
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "meshplan", *args], capture_output=True, text=True,
                          env=environment, timeout=120)


def by(rows, key):
    return {row[key]: row for row in rows}


def test_listings_show_plugin_contributions_with_provenance(site):
    result = cli(site, "strategies", "--json")
    assert result.returncode == 0, result.stderr
    echo = by(json.loads(result.stdout), "name")["echo"]
    assert echo["plugin"] == "good" and echo["distribution"] == "meshplan-goodplug"
    assert echo["version"] == "0.1" and echo["aliases"] == ["echo-echo"]
    assert {"name": "loudness", "type": "int", "default": "1"} in echo["options"]
    plans = by(json.loads(cli(site, "plans", "--json").stdout), "model_class")
    assert plans["goodplug.GoodModel"]["target"] == "goodplug:GOOD_PLAN"
    assert plans["goodplug.GoodModel"]["plugin"] == "good"


def test_broken_plugins_are_reported_and_skipped(site):
    result = cli(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = by(json.loads(result.stdout), "name")
    assert plugins["good"]["status"] == "loaded"
    assert plugins["importbroken"]["status"] == "failed"
    assert "boom at import" in plugins["importbroken"]["error"]
    assert plugins["importbroken"]["distribution"] == "meshplan-importbroken"
    assert plugins["hookbroken"]["status"] == "failed" and "boom in hook" in plugins["hookbroken"]["error"]
    # the half-done registration of the failing hook is dropped
    assert "halfway" not in by(json.loads(cli(site, "strategies", "--json").stdout), "name")
    table = cli(site, "plugins").stdout
    assert "importbroken" in table and "failed" in table


def test_strategy_from_failed_plugin_says_so(site):
    code = "import meshplan; meshplan.get_strategy('halfway')"
    environment = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    assert "UnknownStrategyError" in result.stderr
    assert "'hookbroken'" in result.stderr and "provides it but failed" in result.stderr


def test_load_plugins_allow_list_and_empty(site):
    names = by(json.loads(cli(site, "plugins", "--json", MESHPLAN_LOAD_PLUGINS="").stdout), "name")
    assert names["good"]["status"] == "not_allowed"
    assert names["meshplan.strategies.fsdp2"]["status"] == "loaded"  # built-ins always load
    # allow-list by distribution name, normalized
    names = by(json.loads(cli(site, "plugins", "--json", MESHPLAN_LOAD_PLUGINS="Meshplan_GoodPlug").stdout),
               "name")
    assert names["good"]["status"] == "loaded" and names["importbroken"]["status"] == "not_allowed"


def test_disable_plugins_including_builtins(site):
    result = cli(site, "strategies", "--json", MESHPLAN_DISABLE_PLUGINS="good,fsdp2")
    strategies = by(json.loads(result.stdout), "name")
    assert "echo" not in strategies and "fsdp2" not in strategies
    plugins = by(json.loads(cli(site, "plugins", "--json", MESHPLAN_DISABLE_PLUGINS="good").stdout), "name")
    assert plugins["good"]["status"] == "disabled"


def test_raise_mode_is_fatal_and_names_the_plugin(site):
    result = cli(site, "strategies", MESHPLAN_PLUGIN_ERRORS="raise")
    assert result.returncode != 0
    assert "importbroken" in result.stderr and "boom at import" in result.stderr
    result = cli(site, "strategies", MESHPLAN_PLUGIN_ERRORS="raise", MESHPLAN_DISABLE_PLUGINS="importbroken")
    assert result.returncode != 0 and "hookbroken" in result.stderr
    ok = cli(site, "strategies", MESHPLAN_PLUGIN_ERRORS="raise", MESHPLAN_LOAD_PLUGINS="good")
    assert ok.returncode == 0 and "echo" in ok.stdout


def test_invalid_error_mode_is_rejected(site):
    result = cli(site, "strategies", MESHPLAN_PLUGIN_ERRORS="explode")
    assert result.returncode != 0 and "MESHPLAN_PLUGIN_ERRORS" in result.stderr


@pytest.fixture(scope="module")
def misspelled_site(tmp_path_factory):
    path = tmp_path_factory.mktemp("misspelled_site")
    make_distribution(path, "meshplan-goodplug", "goodplug", GOOD_PLUGIN, "good")
    make_distribution(path, "meshplan-typo", "typoplug", MISSPELLED_HOOK_PLUGIN, "typo")
    return path


def test_a_misspelled_hook_fails_the_plugin_and_the_listings_say_why(misspelled_site):
    result = cli(misspelled_site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = by(json.loads(result.stdout), "name")
    typo = plugins["typo"]
    assert typo["status"] == "failed" and typo["distribution"] == "meshplan-typo"
    assert typo["error"].startswith("UnknownHookError: It implements 'meshplan_register_strategy', which is no")
    assert "Did you mean 'meshplan_register_strategies'?" in typo["error"]
    assert typo["contributions"] == []  # its correctly spelled hook contributes nothing either
    assert plugins["good"]["status"] == "loaded"
    table = cli(misspelled_site, "plugins").stdout
    assert "typo" in table and "failed" in table and "meshplan_register_strategy" in table


def test_a_misspelled_hook_is_fatal_in_raise_mode(misspelled_site):
    result = cli(misspelled_site, "strategies", MESHPLAN_PLUGIN_ERRORS="raise")
    assert result.returncode != 0
    assert "'typo'" in result.stderr and "meshplan_register_strategy" in result.stderr
