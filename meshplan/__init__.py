"""meshplan: select a parallel strategy by name, find the tensor-parallel plan for the model's
architecture, validate both against the model and the mesh, and compose them.

>>> model = meshplan.parallelize(model, mesh, strategy="fsdp2")

``import meshplan`` is light: public names are imported on first use (PEP 562), plugins are discovered
on the first lookup, and neither ``transformers`` nor ``megatron_fsdp`` is imported until needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__ as __version__
from .plugins.hookspecs import hookimpl as hookimpl

#: public name -> module it lives in (imported on first access)
_LAZY: dict[str, str] = {
    # errors (one hierarchy under MeshplanError)
    "ConflictError": ".core.errors", "ImportPathError": ".core.errors", "MeshError": ".core.errors",
    "MeshplanError": ".core.errors", "OptionsError": ".core.errors", "PlanError": ".core.errors",
    "PlanNotFoundError": ".core.errors", "PlanSourceError": ".core.errors", "PluginLoadError": ".core.errors",
    "RegistrationError": ".core.errors", "SequenceParallelUnsupportedError": ".core.errors",
    "StrategyUnavailableError": ".core.errors", "TensorParallelSizeError": ".core.errors",
    "StyleModuleTypeError": ".core.errors", "TiedParameterError": ".core.errors", "UnknownNameError": ".core.errors",
    "UnknownStrategyError": ".core.errors", "UnknownStyleError": ".core.errors",
    "UnmatchedPlanKeyError": ".core.errors", "UnsupportedConfigurationError": ".core.errors",
    "UntranslatableStyleError": ".core.errors",
    # dispatcher and registry
    "parallelize": ".api", "prepare": ".api", "Prepared": ".api", "get_report": ".api", "get_strategy": ".api",
    "register_strategy": ".api", "register_tp_plan": ".api", "register_style": ".api",
    "unregister_tp_plan": ".api",
    "get_tp_plan": ".api", "list_strategies": ".api", "list_tp_plans": ".api",
    "list_styles": ".api", "list_plugins": ".api",
    "import_class_from_path": ".core.imports",
    # contracts
    "Strategy": ".core.strategy", "StrategyOptions": ".core.strategy", "OptionInfo": ".core.strategy",
    "ResolvedPlan": ".tensor_parallel.plan", "MeshRoles": ".core.roles", "RoleDims": ".core.roles",
    # built-in strategies
    "FSDP2Strategy": ".strategies.fsdp2", "FSDP2Options": ".strategies.fsdp2",
    "DDPStrategy": ".strategies.ddp", "DDPOptions": ".strategies.ddp",
    "MegatronFSDPStrategy": ".strategies.megatron_fsdp", "MegatronFSDPOptions": ".strategies.megatron_fsdp",
    "parallelize_megatron_fsdp": ".strategies.megatron_fsdp",
    # model and checkpoint helpers
    "materialize_meta_model": ".state.meta_init", "initialize_sharded": ".state.meta_init",
    "unshard_fsdp2_model": ".state.unshard",
    "gather_full_state_dict": ".state.distributed_checkpoint",
    "save_distributed_checkpoint": ".state.distributed_checkpoint",
    "load_distributed_checkpoint": ".state.distributed_checkpoint",
    # custom parallel styles
    "PackedColwiseParallel": ".tensor_parallel.custom_styles",
    "PackedRowwiseParallel": ".tensor_parallel.custom_styles",
    "ReplicatedWithGradAllReduce": ".tensor_parallel.custom_styles", "KeepReplicated": ".tensor_parallel.custom_styles",
    "PrepareHiddenStates": ".tensor_parallel.custom_styles", "ChainedStyles": ".tensor_parallel.custom_styles",
    "unpack_full_state_dict": ".tensor_parallel.custom_styles",
    # planning at any scale
    "explain": ".dryrun", "fake_process_group": ".core.fake_pg", "list_presets": ".cli.modelsource",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshplan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted({"hookimpl", *_LAZY})
