"""Drop-in replacement for NeMo AutoModel's ``nemo_automodel.components.distributed.parallelizer``.

Same function names, parameter names, defaults and return types; every function delegates to
meshplan's registry and strategies. Errors are meshplan's typed errors, each also an instance of the
exception type the reference raised (``AssertionError`` / ``ValueError``), so existing handlers work.
See ``docs/migrating-from-nemo-automodel.md`` for what behaves better and why.
"""

from __future__ import annotations

import importlib.util
import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor.parallel import ParallelStyle
from torch.optim import Optimizer

from ..api import parallelize
from ..core.errors import ImportPathError, PlanNotFoundError, UnknownStyleError
from ..core.imports import import_class_from_path
from ..core.log import get_logger, log_rank0
from ..plans.hf_translation import get_hf_tp_shard_plan
from ..plugins.manager import get_registry
from ..state.unshard import unshard_fsdp2_model
from ..strategies.megatron_fsdp import parallelize_megatron_fsdp
from ..tensor_parallel.plan import resolve_plan
from ..tensor_parallel.validation import validate_tp_size
from ..tensor_parallel.vocabulary import make_style

logger = get_logger(__name__)

__all__ = [
    "HAVE_NVFSDP", "_get_parallel_plan", "apply_fsdp2_sharding_recursively", "fsdp2_strategy_parallelize",
    "get_hf_tp_shard_plan", "get_lm_ac_layers", "import_class_from_path", "import_classes_from_paths",
    "nvfsdp_strategy_parallelize", "translate_to_torch_parallel_style", "unshard_fsdp2_model",
    "validate_tp_mesh",
]

#: Whether Megatron-FSDP (``megatron_fsdp``, or the older ``nvfsdp``) is installed. Found with
#: ``importlib.util.find_spec`` so that neither package is imported to compute it.
HAVE_NVFSDP: bool = any(importlib.util.find_spec(name) is not None for name in ("megatron_fsdp", "nvfsdp"))


def apply_fsdp2_sharding_recursively(
    module: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None,
    offload_policy: OffloadPolicy | None = None,
) -> None:
    """``fully_shard`` every item of every ``nn.ModuleList`` found by recursion (not descending into them).

    Every item reshards after forward except the last of each list (FSDP2 prefetches it right away).
    """
    if isinstance(module, nn.ModuleList):
        for index, block in enumerate(module):
            fully_shard(block, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
                        reshard_after_forward=index < len(module) - 1,
                        offload_policy=offload_policy or OffloadPolicy())
        return
    for child in module.children():
        apply_fsdp2_sharding_recursively(child, mesh, mp_policy, offload_policy)


def import_classes_from_paths(class_paths: list[str]) -> list:
    """Import each dotted path; a path that cannot be imported is logged as a warning and skipped."""
    classes = []
    for path in class_paths:
        try:
            classes.append(import_class_from_path(path))
        except ImportPathError as exc:
            log_rank0(logger, logging.WARNING, "Skipping class path %r: %s", path, exc)
    return classes


def translate_to_torch_parallel_style(style: str) -> ParallelStyle:
    """A new torch ``ParallelStyle`` for a style name (every name meshplan's registry knows)."""
    if not isinstance(style, str):
        raise StyleTypeError(f"Parallel style must be a str, got {type(style).__name__} ({style!r}).")
    return make_style(style, get_registry())


class StyleTypeError(UnknownStyleError, AssertionError):
    """A style given as something other than a string (the reference asserted or raised ValueError)."""


def validate_tp_mesh(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Heads and KV heads (top level or the VLM text config) must divide by the TP size (no-op at 1)."""
    validate_tp_size(model, tp_mesh.size())


def get_lm_ac_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's repeated layers (VLM ``language_model.layers``, else ``model.model.layers``)."""
    inner = getattr(model, "model", None)
    for owner in (model, inner):
        language_model = getattr(owner, "language_model", None)
        if isinstance(getattr(language_model, "layers", None), nn.ModuleList):
            return list(language_model.layers)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    return []


def _get_parallel_plan(
    model: nn.Module, sequence_parallel: bool = False, tp_shard_plan: dict[str, ParallelStyle] | str | None = None,
) -> dict[str, ParallelStyle]:
    """The TP plan: ``tp_shard_plan`` (dict, or dotted path to a dict / function returning one), else the
    provider registered for the model's class, else the model's Hugging Face plan.

    Sequence parallel with nothing but the Hugging Face plan is an error, as in the reference.
    """
    registry = get_registry()
    if tp_shard_plan is None and sequence_parallel:
        found = registry.find_tp_plan(type(model))
        if found is not None and found[1].provenance.plugin == "meshplan.plans.hf":
            raise PlanNotFoundError(
                f"sequence_parallel is not supported with the Hugging Face TP plan of {type(model).__qualname__}: "
                "register a plan for it (meshplan.register_tp_plan) or pass tp_shard_plan."
            )
    return resolve_plan(model, registry, tp_shard_plan, sequence_parallel).styles


def fsdp2_strategy_parallelize(
    model: nn.Module,
    device_mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
    tp_shard_plan: dict[str, ParallelStyle] | str | None = None,
    dp_replicate_mesh_name: str = "dp_replicate",
    dp_shard_cp_mesh_name: str = "dp_shard_cp",
    tp_mesh_name: str = "tp",
) -> nn.Module:
    """TP (+SP) -> activation checkpointing -> FSDP2 / HSDP: ``meshplan.parallelize(strategy="fsdp2")``."""
    return parallelize(
        model, device_mesh, strategy="fsdp2", tp_plan=tp_shard_plan, mp_policy=mp_policy,
        offload_policy=offload_policy, sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing, dp_replicate_mesh_name=dp_replicate_mesh_name,
        dp_shard_cp_mesh_name=dp_shard_cp_mesh_name, tp_mesh_name=tp_mesh_name,
    )


def nvfsdp_strategy_parallelize(
    model: nn.Module,
    device_mesh: DeviceMesh,
    optimizer: Optimizer | None = None,
    nvfsdp_unit_modules: list[str] | None = None,
    tp_shard_plan: dict[str, ParallelStyle] | str | None = None,
    data_parallel_sharding_strategy: str = "optim_grads_params",
    init_nvfsdp_with_meta_device: bool = False,
    grad_reduce_in_fp32: bool = False,
    preserve_fp32_weights: bool = False,
    overlap_grad_reduce: bool = True,
    overlap_param_gather: bool = True,
    check_for_nan_in_grad: bool = True,
    average_in_collective: bool = False,
    disable_bucketing: bool = False,
    calculate_per_token_loss: bool = False,
    keep_fp8_transpose_cache_when_using_custom_fsdp: bool = False,
    nccl_ub: bool = False,
    fsdp_double_buffer: bool = False,
    dp_mesh_name: str = "dp",
    cp_mesh_name: str = "cp",
    tp_mesh_name: str = "tp",
) -> tuple[nn.Module, Optimizer | None]:
    """TP -> Megatron-FSDP: the ``megatron_fsdp`` strategy; returns ``(model, optimizer)``."""
    return parallelize_megatron_fsdp(
        model, device_mesh, optimizer, tp_plan=tp_shard_plan, nvfsdp_unit_modules=nvfsdp_unit_modules,
        data_parallel_sharding_strategy=data_parallel_sharding_strategy,
        init_nvfsdp_with_meta_device=init_nvfsdp_with_meta_device, grad_reduce_in_fp32=grad_reduce_in_fp32,
        preserve_fp32_weights=preserve_fp32_weights, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, check_for_nan_in_grad=check_for_nan_in_grad,
        average_in_collective=average_in_collective, disable_bucketing=disable_bucketing,
        calculate_per_token_loss=calculate_per_token_loss,
        keep_fp8_transpose_cache_when_using_custom_fsdp=keep_fp8_transpose_cache_when_using_custom_fsdp,
        nccl_ub=nccl_ub, fsdp_double_buffer=fsdp_double_buffer, dp_mesh_name=dp_mesh_name,
        cp_mesh_name=cp_mesh_name, tp_mesh_name=tp_mesh_name,
    )
