"""meshplan: select a parallel strategy by name, find the tensor-parallel plan for the model's
architecture, validate both against the model and the mesh, and compose them.

>>> model = meshplan.parallelize(model, mesh, strategy="fsdp2")

``import meshplan`` is light: public names are imported on first use (PEP 562), plugins are discovered
on the first lookup, and neither ``transformers`` nor ``megatron_fsdp`` is imported until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "UntranslatableStyleError": ".core.errors", "ContextParallelError": ".core.errors",
    "SequenceLengthError": ".core.errors", "UnsupportedAttentionError": ".core.errors",
    "UnsupportedSequenceMixerError": ".core.errors",
    "UnshardedInputError": ".core.errors",
    "CheckpointLayoutError": ".core.errors",
    # dispatcher and registry
    "parallelize": ".api", "prepare": ".api", "Prepared": ".api", "get_report": ".api", "get_strategy": ".api",
    "register_strategy": ".api", "register_tp_plan": ".api", "register_style": ".api",
    "unregister_tp_plan": ".api",
    "get_tp_plan": ".api", "list_strategies": ".api", "list_tp_plans": ".api",
    "list_styles": ".api", "list_plugins": ".api",
    "import_class_from_path": ".core.imports",
    # contracts
    "Strategy": ".core.strategy", "StrategyOptions": ".core.strategy", "OptionInfo": ".core.strategy",
    "ResolvedPlan": ".core.plans", "MeshRoles": ".core.roles", "RoleDims": ".core.roles",
    "MatchedPlan": ".core.plans", "FittedPlan": ".core.plans", "PlanSet": ".core.plans",
    "ExpertParallelOptions": ".core.axis_options", "ContextParallelOptions": ".core.axis_options",
    "ComposedStrategy": ".strategies.composition", "Composition": ".strategies.composition",
    "UnsupportedAxisError": ".core.errors",
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
    "unpack_full_state_dict": ".state.packing",
    # custom parallel styles
    "PackedColwiseParallel": ".tensor_parallel.custom_styles",
    "PackedRowwiseParallel": ".tensor_parallel.custom_styles",
    "ReplicatedWithGradAllReduce": ".tensor_parallel.custom_styles", "KeepReplicated": ".tensor_parallel.custom_styles",
    "PrepareHiddenStates": ".tensor_parallel.custom_styles", "ChainedStyles": ".tensor_parallel.custom_styles",
    "ExpertsTensorParallel": ".experts.tp_styles", "ExpertParamLayout": ".experts.tp_styles",
    "IdentityExpertParallel": ".experts.tp_styles",
    # context parallelism
    "shard_batch": ".context_parallel.batch", "gather_sequence": ".context_parallel.batch",
    "apply_context_parallel": ".context_parallel.apply",
    # planning at any scale
    "explain": ".dryrun", "fake_process_group": ".core.fake_pg", "list_presets": ".cli.modelsource",
}


if TYPE_CHECKING:  # the real types for type checkers; mirrors _LAZY (tests/plugins/test_public_api.py)
    from .api import Prepared as Prepared
    from .api import get_report as get_report
    from .api import get_strategy as get_strategy
    from .api import get_tp_plan as get_tp_plan
    from .api import list_plugins as list_plugins
    from .api import list_strategies as list_strategies
    from .api import list_styles as list_styles
    from .api import list_tp_plans as list_tp_plans
    from .api import parallelize as parallelize
    from .api import prepare as prepare
    from .api import register_strategy as register_strategy
    from .api import register_style as register_style
    from .api import register_tp_plan as register_tp_plan
    from .api import unregister_tp_plan as unregister_tp_plan
    from .cli.modelsource import list_presets as list_presets
    from .context_parallel.apply import apply_context_parallel as apply_context_parallel
    from .context_parallel.batch import gather_sequence as gather_sequence
    from .context_parallel.batch import shard_batch as shard_batch
    from .core.axis_options import ContextParallelOptions as ContextParallelOptions
    from .core.axis_options import ExpertParallelOptions as ExpertParallelOptions
    from .core.errors import CheckpointLayoutError as CheckpointLayoutError
    from .core.errors import ConflictError as ConflictError
    from .core.errors import ContextParallelError as ContextParallelError
    from .core.errors import ImportPathError as ImportPathError
    from .core.errors import MeshError as MeshError
    from .core.errors import MeshplanError as MeshplanError
    from .core.errors import OptionsError as OptionsError
    from .core.errors import PlanError as PlanError
    from .core.errors import PlanNotFoundError as PlanNotFoundError
    from .core.errors import PlanSourceError as PlanSourceError
    from .core.errors import PluginLoadError as PluginLoadError
    from .core.errors import RegistrationError as RegistrationError
    from .core.errors import SequenceLengthError as SequenceLengthError
    from .core.errors import SequenceParallelUnsupportedError as SequenceParallelUnsupportedError
    from .core.errors import StrategyUnavailableError as StrategyUnavailableError
    from .core.errors import StyleModuleTypeError as StyleModuleTypeError
    from .core.errors import TensorParallelSizeError as TensorParallelSizeError
    from .core.errors import TiedParameterError as TiedParameterError
    from .core.errors import UnknownNameError as UnknownNameError
    from .core.errors import UnknownStrategyError as UnknownStrategyError
    from .core.errors import UnknownStyleError as UnknownStyleError
    from .core.errors import UnmatchedPlanKeyError as UnmatchedPlanKeyError
    from .core.errors import UnshardedInputError as UnshardedInputError
    from .core.errors import UnsupportedAttentionError as UnsupportedAttentionError
    from .core.errors import UnsupportedAxisError as UnsupportedAxisError
    from .core.errors import UnsupportedConfigurationError as UnsupportedConfigurationError
    from .core.errors import UnsupportedSequenceMixerError as UnsupportedSequenceMixerError
    from .core.errors import UntranslatableStyleError as UntranslatableStyleError
    from .core.fake_pg import fake_process_group as fake_process_group
    from .core.imports import import_class_from_path as import_class_from_path
    from .core.plans import FittedPlan as FittedPlan
    from .core.plans import MatchedPlan as MatchedPlan
    from .core.plans import PlanSet as PlanSet
    from .core.plans import ResolvedPlan as ResolvedPlan
    from .core.roles import MeshRoles as MeshRoles
    from .core.roles import RoleDims as RoleDims
    from .core.strategy import OptionInfo as OptionInfo
    from .core.strategy import Strategy as Strategy
    from .core.strategy import StrategyOptions as StrategyOptions
    from .dryrun import explain as explain
    from .experts.tp_styles import ExpertParamLayout as ExpertParamLayout
    from .experts.tp_styles import ExpertsTensorParallel as ExpertsTensorParallel
    from .experts.tp_styles import IdentityExpertParallel as IdentityExpertParallel
    from .state.distributed_checkpoint import gather_full_state_dict as gather_full_state_dict
    from .state.distributed_checkpoint import load_distributed_checkpoint as load_distributed_checkpoint
    from .state.distributed_checkpoint import save_distributed_checkpoint as save_distributed_checkpoint
    from .state.meta_init import initialize_sharded as initialize_sharded
    from .state.meta_init import materialize_meta_model as materialize_meta_model
    from .state.packing import unpack_full_state_dict as unpack_full_state_dict
    from .state.unshard import unshard_fsdp2_model as unshard_fsdp2_model
    from .strategies.composition import ComposedStrategy as ComposedStrategy
    from .strategies.composition import Composition as Composition
    from .strategies.ddp import DDPOptions as DDPOptions
    from .strategies.ddp import DDPStrategy as DDPStrategy
    from .strategies.fsdp2 import FSDP2Options as FSDP2Options
    from .strategies.fsdp2 import FSDP2Strategy as FSDP2Strategy
    from .strategies.megatron_fsdp import MegatronFSDPOptions as MegatronFSDPOptions
    from .strategies.megatron_fsdp import MegatronFSDPStrategy as MegatronFSDPStrategy
    from .strategies.megatron_fsdp import parallelize_megatron_fsdp as parallelize_megatron_fsdp
    from .tensor_parallel.custom_styles import ChainedStyles as ChainedStyles
    from .tensor_parallel.custom_styles import KeepReplicated as KeepReplicated
    from .tensor_parallel.custom_styles import PackedColwiseParallel as PackedColwiseParallel
    from .tensor_parallel.custom_styles import PackedRowwiseParallel as PackedRowwiseParallel
    from .tensor_parallel.custom_styles import PrepareHiddenStates as PrepareHiddenStates
    from .tensor_parallel.custom_styles import ReplicatedWithGradAllReduce as ReplicatedWithGradAllReduce


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
