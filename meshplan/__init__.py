"""meshplan: select a parallel strategy by name, find the tensor-parallel plan for the model's
architecture, validate both against the model and the mesh, and compose them.

>>> model = meshplan.parallelize(model, mesh, strategy="fsdp2")

``import meshplan`` is light: public names are imported on first use (PEP 562), plugins are discovered
on the first lookup, and neither ``transformers`` nor ``megatron_fsdp`` is imported until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors as _errors
from ._version import __version__ as __version__
from .plugins.hookspecs import hookimpl as hookimpl

#: The public API besides the errors: module -> the names it exports (imported on first access). The
#: ``TYPE_CHECKING`` block below is generated from this table: after editing it, run
#: ``python tests/test_public_api.py --write`` (tests/test_public_api.py checks they agree).
_EXPORTS: dict[str, tuple[str, ...]] = {
    # dispatcher and registry
    ".api": (
        "parallelize", "prepare", "Prepared", "get_report", "get_strategy", "register_strategy", "register_tp_plan",
        "register_style", "unregister_tp_plan", "get_tp_plan", "list_strategies", "list_tp_plans", "list_styles",
        "list_plugins", "parallelize_megatron_fsdp",
    ),
    ".core.imports": ("import_class_from_path",),
    # contracts
    ".core.strategy": ("Strategy", "StrategyOptions", "OptionInfo"),
    ".core.plans": ("ResolvedPlan", "MatchedPlan", "FittedPlan", "PlanSet"),
    ".core.axis_options": ("ExpertParallelOptions", "ContextParallelOptions"),
    ".core.roles": ("MeshRoles", "RoleDims"),
    # built-in strategies
    ".strategies.fsdp2": ("FSDP2Strategy", "FSDP2Options"),
    ".strategies.ddp": ("DDPStrategy", "DDPOptions"),
    ".strategies.megatron_fsdp": ("MegatronFSDPStrategy", "MegatronFSDPOptions"),
    ".strategies.composition": ("ComposedStrategy", "Composition"),
    # model and checkpoint helpers
    ".state.meta_init": ("materialize_meta_model", "initialize_sharded"),
    ".state.unshard": ("unshard_fsdp2_model",),
    ".state.packing": ("full_tensor", "unpack_full_state_dict"),
    ".state.hf_load": ("load_pretrained", "LoadReport"),
    ".pretrained": ("from_pretrained",),
    ".state.hf_save": ("save_pretrained",),
    ".state.distributed_checkpoint": (
        "gather_full_state_dict", "save_distributed_checkpoint", "load_distributed_checkpoint",
    ),
    # custom parallel styles
    ".tensor_parallel.styles.protocol": ("Style", "StyleTraits", "ParamSplit"),
    ".tensor_parallel.styles.packed": ("PackedColwiseParallel", "PackedRowwiseParallel"),
    ".tensor_parallel.styles.local_parameters": ("ReplicatedWithGradAllReduce",),
    ".tensor_parallel.styles.composition": ("KeepReplicated", "ChainedStyles"),
    ".tensor_parallel.styles.hidden_states": ("PrepareHiddenStates",),
    ".experts.tp_styles": ("ExpertsTensorParallel", "ExpertParamLayout", "IdentityExpertParallel"),
    # pipeline parallelism
    ".pipeline.model": ("PipelineModel",),
    ".pipeline.options": ("PipelineParallelOptions",),
    # context parallelism
    ".context_parallel.batch": ("shard_batch", "gather_sequence"),
    ".context_parallel.apply": ("apply_context_parallel",),
    # the training loop
    ".training.grad_norm": ("clip_grad_norm_", "grad_norm"),
    ".training.loss": ("token_weighted_loss", "num_items_in_batch"),
    ".training.compile": ("compile_blocks",),
    # planning at any scale
    ".dryrun": ("explain",),
    ".core.fake_pg": ("fake_process_group",),
    ".dryrun.modelsource": ("list_presets",),
}

#: public name -> module it lives in: every name of ``_EXPORTS`` and every error of :mod:`meshplan.errors`.
_LAZY: dict[str, str] = {
    **{name: ".errors" for name in _errors.__all__},
    **{name: module for module, names in _EXPORTS.items() for name in names},
}

if TYPE_CHECKING:  # generated from _EXPORTS (see above): the real types for type checkers
    # --- generated: begin ---
    from .api import Prepared as Prepared
    from .api import get_report as get_report
    from .api import get_strategy as get_strategy
    from .api import get_tp_plan as get_tp_plan
    from .api import list_plugins as list_plugins
    from .api import list_strategies as list_strategies
    from .api import list_styles as list_styles
    from .api import list_tp_plans as list_tp_plans
    from .api import parallelize as parallelize
    from .api import parallelize_megatron_fsdp as parallelize_megatron_fsdp
    from .api import prepare as prepare
    from .api import register_strategy as register_strategy
    from .api import register_style as register_style
    from .api import register_tp_plan as register_tp_plan
    from .api import unregister_tp_plan as unregister_tp_plan
    from .context_parallel.apply import apply_context_parallel as apply_context_parallel
    from .context_parallel.batch import gather_sequence as gather_sequence
    from .context_parallel.batch import shard_batch as shard_batch
    from .core.axis_options import ContextParallelOptions as ContextParallelOptions
    from .core.axis_options import ExpertParallelOptions as ExpertParallelOptions
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
    from .dryrun.modelsource import list_presets as list_presets
    from .errors import *  # noqa: F403 - every error class
    from .experts.tp_styles import ExpertParamLayout as ExpertParamLayout
    from .experts.tp_styles import ExpertsTensorParallel as ExpertsTensorParallel
    from .experts.tp_styles import IdentityExpertParallel as IdentityExpertParallel
    from .pipeline.model import PipelineModel as PipelineModel
    from .pipeline.options import PipelineParallelOptions as PipelineParallelOptions
    from .pretrained import from_pretrained as from_pretrained
    from .state.distributed_checkpoint import gather_full_state_dict as gather_full_state_dict
    from .state.distributed_checkpoint import load_distributed_checkpoint as load_distributed_checkpoint
    from .state.distributed_checkpoint import save_distributed_checkpoint as save_distributed_checkpoint
    from .state.hf_load import LoadReport as LoadReport
    from .state.hf_load import load_pretrained as load_pretrained
    from .state.hf_save import save_pretrained as save_pretrained
    from .state.meta_init import initialize_sharded as initialize_sharded
    from .state.meta_init import materialize_meta_model as materialize_meta_model
    from .state.packing import full_tensor as full_tensor
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
    from .tensor_parallel.styles.composition import ChainedStyles as ChainedStyles
    from .tensor_parallel.styles.composition import KeepReplicated as KeepReplicated
    from .tensor_parallel.styles.hidden_states import PrepareHiddenStates as PrepareHiddenStates
    from .tensor_parallel.styles.local_parameters import ReplicatedWithGradAllReduce as ReplicatedWithGradAllReduce
    from .tensor_parallel.styles.packed import PackedColwiseParallel as PackedColwiseParallel
    from .tensor_parallel.styles.packed import PackedRowwiseParallel as PackedRowwiseParallel
    from .tensor_parallel.styles.protocol import ParamSplit as ParamSplit
    from .tensor_parallel.styles.protocol import Style as Style
    from .tensor_parallel.styles.protocol import StyleTraits as StyleTraits
    from .training.compile import compile_blocks as compile_blocks
    from .training.grad_norm import clip_grad_norm_ as clip_grad_norm_
    from .training.grad_norm import grad_norm as grad_norm
    from .training.loss import num_items_in_batch as num_items_in_batch
    from .training.loss import token_weighted_loss as token_weighted_loss
    # --- generated: end ---


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
