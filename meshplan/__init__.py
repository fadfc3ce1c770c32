"""meshplan: select a parallel strategy by name, find the tensor-parallel plan for the model's
architecture, validate both against the model and the mesh, and compose them.

>>> model = meshplan.parallelize(model, mesh, strategy="fsdp2")

Importing meshplan loads no plugin, no ``transformers`` and no ``megatron_fsdp``; plugins are
discovered on the first lookup.
"""

from __future__ import annotations

from .core.dispatch import Prepared, get_report, get_strategy, parallelize, prepare
from .core.errors import (
    ConflictError,
    ImportPathError,
    MeshError,
    MeshplanError,
    OptionsError,
    PlanError,
    PlanNotFoundError,
    PlanSourceError,
    PluginLoadError,
    RegistrationError,
    StrategyUnavailableError,
    TensorParallelSizeError,
    UnknownNameError,
    UnknownStrategyError,
    UnknownStyleError,
    UnmatchedPlanKeyError,
    UnsupportedConfigurationError,
)
from .core.imports import import_class_from_path
from .core.plan import ResolvedPlan
from .core.strategy import OptionInfo, Strategy, StrategyOptions
from .plugins.api import (
    get_tp_plan,
    list_plugins,
    list_strategies,
    list_styles,
    list_tp_plans,
    register_strategy,
    register_style,
    register_tp_plan,
)
from .plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ConflictError", "ImportPathError", "MeshError", "MeshplanError", "OptionInfo", "OptionsError",
    "PlanError", "PlanNotFoundError", "PlanSourceError", "PluginLoadError", "Prepared", "RegistrationError",
    "ResolvedPlan", "Strategy", "StrategyOptions", "StrategyUnavailableError", "TensorParallelSizeError",
    "UnknownNameError", "UnknownStrategyError", "UnknownStyleError", "UnmatchedPlanKeyError",
    "UnsupportedConfigurationError", "get_report", "get_strategy", "get_tp_plan", "hookimpl",
    "import_class_from_path", "list_plugins", "list_strategies", "list_styles", "list_tp_plans",
    "parallelize", "prepare", "register_strategy", "register_style", "register_tp_plan",
]
