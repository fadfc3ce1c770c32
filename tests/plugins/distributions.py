"""Build throwaway installed distributions (a package plus its .dist-info) in a folder for sys.path."""

from __future__ import annotations

import textwrap
from pathlib import Path

GOOD_PLUGIN = '''
from dataclasses import dataclass

import meshplan
from torch import nn


@dataclass
class EchoOptions(meshplan.StrategyOptions):
    loudness: int = 1


class EchoStrategy(meshplan.Strategy):
    name = "echo"
    aliases = ("echo-echo",)
    options_class = EchoOptions
    description = "returns the model unchanged"

    def parallelize(self, model, roles, plan, options):
        model.echoed = options.loudness
        return model


class GoodModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


GOOD_PLAN = {"proj": "colwise"}


@meshplan.hookimpl
def meshplan_register_strategies(register):
    register(EchoStrategy)


@meshplan.hookimpl
def meshplan_register_tp_plans(register):
    register("goodplug.GoodModel", "goodplug:GOOD_PLAN")
'''

IMPORT_BROKEN_PLUGIN = "raise RuntimeError('boom at import')\n"

HOOK_BROKEN_PLUGIN = '''
import meshplan


@meshplan.hookimpl
def meshplan_register_strategies(register):
    register("hookbroken:Nothing", name="halfway")
    raise ValueError("boom in hook")
'''

MISSPELLED_HOOK_PLUGIN = '''
import meshplan


class TypoStrategy(meshplan.Strategy):
    name = "typo"

    def parallelize(self, model, roles, plan, options):
        return model


@meshplan.hookimpl
def meshplan_register_strategy(register):  # the hook is meshplan_register_strategies
    register(TypoStrategy)


@meshplan.hookimpl
def meshplan_register_styles(register):  # spelled right, but the plugin fails whole
    register("typo_style", "torch.distributed.tensor.parallel:ColwiseParallel")
'''


def make_distribution(site: Path, dist: str, module: str, source: str, entry_name: str) -> None:
    """Write ``module.py`` and ``dist-0.1.dist-info`` with a ``meshplan`` entry point into ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[meshplan]\n{entry_name} = {module}\n")
