"""Drop-in replacement for NeMo AutoModel's ``nemo_automodel.components.distributed.parallelizer``.

Same function names, parameter names, defaults, return types and module-level names as the reference (commit
e8412546e); every function is an adapter over meshplan's registry and strategies. ``meshplan.parallelizer`` is
this module object, so code that patches a global here (``fully_shard``, ``FSDPModule``, ``parallelize_module``,
``HAVE_NVFSDP``, ``nvfsdp_fully_shard``, ``import_class_from_path``, ``get_hf_tp_shard_plan``,
``PARALLELIZE_FUNCTIONS``, ...) changes what the functions that call it do, as with the reference.

* ``PARALLELIZE_FUNCTIONS`` is a live view of the registry's TP plan providers
  (:mod:`meshplan.compat.parallelize_functions`): writing to it registers providers ``parallelize`` uses.
* Errors are meshplan's typed errors; each also subclasses the built-in type the reference raised
  (``AssertionError`` / ``ValueError``, :mod:`meshplan.compat.errors`) and contains the reference's message, so
  handlers and message matching keep working.
* ``fsdp2_strategy_parallelize`` runs meshplan's ``fsdp2`` strategy; ``nvfsdp_strategy_parallelize`` keeps the
  reference's steps, and the default ``parallelize_module`` / ``nvfsdp_fully_shard`` behind them are meshplan's
  validated tensor parallelism and Megatron-FSDP strategy.

See ``docs/migrating-from-nemo-automodel.md`` for what behaves better and why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle
from torch.distributed.tensor.parallel import parallelize_module as torch_parallelize_module
from torch.optim import Optimizer

from ..api import parallelize
from ..core.errors import (
    ImportPathError,
    MeshError,
    PlanNotFoundError,
    PlanSourceError,
    SequenceParallelUnsupportedError,
    StrategyUnavailableError,
)
from ..core.imports import import_class_from_path
from ..core.log import get_logger, log_rank0
from ..core.torch_private import checkpoint_wrapper  # noqa: F401 - patched
from ..introspection.config import config_value
from ..introspection.embeddings import are_tied, embedding_modules, module_name
from ..planning.build import build_plan
from ..planning.resolve import resolve_plan
from ..plans.hf_translation import complete_embeddings, merged_hf_plan
from ..plugins.manager import get_registry
from ..state.unshard import unshard_fsdp2_model as unshard_units
from ..tensor_parallel.apply import apply_tensor_parallel
from ..tensor_parallel.plan import call_plan_function
from ..tensor_parallel.validation import validate_tp_size
from ..tensor_parallel.vocabulary import copy_style, make_style
from .errors import StyleTypeError, raises_reference_errors
from .nvfsdp import MegatronFSDPShim, megatron_fsdp_shim
from .parallelize_functions import ParallelizeFunctions

logger = get_logger(__name__)

__all__ = [
    "HAVE_NVFSDP", "PARALLELIZE_FUNCTIONS", "_get_parallel_plan", "apply_fsdp2_sharding_recursively",
    "fsdp2_strategy_parallelize", "get_hf_tp_shard_plan", "get_lm_ac_layers", "import_class_from_path",
    "import_classes_from_paths", "nvfsdp_fully_shard", "nvfsdp_strategy_parallelize", "parallelize_module",
    "translate_to_torch_parallel_style", "unshard_fsdp2_model", "validate_tp_mesh",
]

#: ``{model class: plan function}`` of the optimized plans: a live view of meshplan's registry.
PARALLELIZE_FUNCTIONS: ParallelizeFunctions = ParallelizeFunctions()

#: Whether Megatron-FSDP (``megatron_fsdp``, successor of the ``nvfsdp`` the reference imports) is installed.
#: Found with ``importlib.util.find_spec``, so neither package is imported to compute it.
HAVE_NVFSDP: bool = any(importlib.util.find_spec(name) is not None for name in ("megatron_fsdp", "nvfsdp"))

#: The legacy ``nvfsdp.fully_shard`` keyword API, served by meshplan's ``megatron_fsdp`` strategy.
nvfsdp_fully_shard: Callable[..., tuple[nn.Module, Optimizer | None]] = megatron_fsdp_shim

#: Plan values NeMo gives a non-tied ``lm_head`` whose logits it keeps vocab-sharded (transformers 5 spelling too).
GATHERED_HEAD_STYLES = ("colwise_rep", "colwise_gather_output")
#: Attributes holding a layer stack, in the order the reference looks for them: ``(owner path, attribute)``.
LAYER_OWNERS = (("", "language_model"), ("model", "language_model"), ("", "model"))
LAYER_CONTAINERS = (nn.ModuleList, nn.Sequential, list, tuple)


def apply_fsdp2_sharding_recursively(
    module: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None,
    offload_policy: OffloadPolicy | None = None,
) -> None:
    """``fully_shard`` every item of every ``nn.ModuleList`` found by recursion (not descending into them).

    Every item reshards after forward except the last of each list (FSDP2 prefetches it right away).
    ``offload_policy`` is passed through as given (``None``: no offload); ``mp_policy=None`` means
    ``MixedPrecisionPolicy()`` (torch's ``fully_shard`` needs a policy object).
    """
    if isinstance(module, nn.ModuleList):
        for index, block in enumerate(module):
            fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy() if mp_policy is None else mp_policy,
                        reshard_after_forward=index < len(module) - 1, offload_policy=offload_policy)
        return
    for child in module.children():
        apply_fsdp2_sharding_recursively(child, mesh, mp_policy, offload_policy)


def import_classes_from_paths(class_paths: Sequence[str]) -> list:
    """Import each dotted path; a path that cannot be imported is logged as a warning and skipped."""
    classes = []
    for path in class_paths:
        try:
            classes.append(import_class_from_path(path))
        except ImportPathError as exc:
            log_rank0(logger, logging.WARNING, "Skipping class path %r: %s", path, exc)
    return classes


def translate_to_torch_parallel_style(style: str) -> ParallelStyle:
    """A new torch ``ParallelStyle`` for a style name (every name meshplan's registry knows);
    :class:`UnknownStyleError` ("Unknown parallel style ...", a ``ValueError``) otherwise."""
    if not isinstance(style, str):
        raise StyleTypeError(f"parallel style type should be str, but got {type(style).__name__} ({style!r}).")
    return make_style(style, get_registry())


@raises_reference_errors
def validate_tp_mesh(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Heads (top level or the VLM text config) must divide by the TP size, and KV heads divide it or be divided by
    it (no-op at 1). Fewer KV heads than the TP size work only through meshplan's ``parallelize_module`` /
    ``parallelize``, which replicate them (torch's ``parallelize_module`` does not)."""
    validate_tp_size(model, tp_mesh.size())


def get_lm_ac_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The language model's layer container itself: ``language_model.layers`` (VLMs, also under ``model``),
    else ``model.layers``; ``[]`` if there is none. Any list, tuple, ``ModuleList`` or ``Sequential`` counts."""
    for owner_path, attribute in LAYER_OWNERS:
        owner = getattr(model, owner_path, None) if owner_path else model
        layers = getattr(getattr(owner, attribute, None), "layers", None)
        if isinstance(layers, LAYER_CONTAINERS):
            return layers
    return []


def _inner_model_prefix(model: nn.Module) -> str:
    """The reference's name for the inner model: the first of ``language_model`` / ``model`` with a ``_tp_plan``."""
    return next((name for name in ("language_model", "model") if hasattr(getattr(model, name, None), "_tp_plan")),
                "model")


def _config_ties(model: nn.Module) -> bool:
    return bool(config_value(model, "tie_word_embeddings"))


@raises_reference_errors
def get_hf_tp_shard_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The model's Hugging Face TP plan translated to torch styles, as the reference returns it (not matched).

    Merged from ``config.base_model_tp_plan``, inner models' ``_tp_plan`` (prefixed with their path, e.g.
    ``language_model.``), the class and the instance ``_tp_plan``. An untied input embedding the plan lacks
    becomes vocab-parallel (``<inner model>.embed_tokens`` when the model exposes no input embedding); a
    tied pair is sharded together or not at all; an untied ``lm_head`` declared ``colwise_rep`` keeps its
    logits vocab-sharded, ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` (train with
    ``loss_parallel``). Keys are matched against the model by ``parallelize``, not here.

    Raises :class:`PlanNotFoundError` ("Hugging Face tp plan is not supported", an ``AssertionError``) when the
    model declares no plan, :class:`UnknownStyleError` ("Unknown parallel style", a ``ValueError``) for a
    style with no torch equivalent.
    """
    plan = merged_hf_plan(model)
    if not plan:
        raise PlanNotFoundError(
            f"Hugging Face tp plan is not supported for {type(model).__qualname__}: it declares no `_tp_plan` or "
            "`config.base_model_tp_plan`. Set the TP size to 1, pass tp_shard_plan=..., or register a plan "
            "(PARALLELIZE_FUNCTIONS[cls] = fn, or meshplan.register_tp_plan)."
        )
    embedding, head = embedding_modules(model)
    embed = module_name(model, embedding) or f"{_inner_model_prefix(model)}.embed_tokens"
    lm_head = module_name(model, head) or "lm_head"
    tied = are_tied(embedding, head) if embedding is not None and head is not None else _config_ties(model)
    complete_embeddings(plan, embed, lm_head if head is not None else None, tied)
    styles: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        if key == lm_head and style in GATHERED_HEAD_STYLES and not tied:
            styles[key] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        else:
            styles[key] = copy_style(style) if isinstance(style, ParallelStyle) else translate_to_torch_parallel_style(
                style)
    return styles


def _custom_plan(model: nn.Module, sequence_parallel: bool, tp_shard_plan: Any) -> dict[str, Any]:
    """An explicit plan: a dict (returned as is), a dotted path to a dict or to a function returning one, or
    such a function; anything else is a :class:`PlanSourceError` (a ``ValueError``) with the reference's text."""
    if isinstance(tp_shard_plan, dict):
        log_rank0(logger, logging.INFO, "Using provided parallel plan (dictionary).")
        return tp_shard_plan
    try:
        source = tp_shard_plan if callable(tp_shard_plan) else import_class_from_path(tp_shard_plan)
        if callable(source) and not isinstance(source, (Mapping, type)):
            source = call_plan_function(source, model, sequence_parallel)
        if not isinstance(source, Mapping):
            raise PlanSourceError(f"Parallel plan must be a dictionary, got {type(source).__name__}")
    except Exception as exc:  # noqa: BLE001 - every failure is reported as the reference reports it
        raise PlanSourceError(
            f"Custom parallel plan '{tp_shard_plan}' is not valid. Please ensure it is one of the following:\n"
            "1. A dictionary mapping module names to parallel styles\n2. A path to a dictionary\n"
            f"3. A path to a function that returns a dictionary\nError: {exc}"
        ) from exc
    log_rank0(logger, logging.INFO, "Using provided parallel plan (from path).")
    return source if isinstance(source, dict) else dict(source)


def _optimized_plan(model: nn.Module, sequence_parallel: bool) -> dict[str, Any] | None:
    """The plan of the ``PARALLELIZE_FUNCTIONS`` entry for the model's class (or its nearest base), or ``None``
    when there is none or it fails (logged; the caller falls back to the Hugging Face plan)."""
    functions = PARALLELIZE_FUNCTIONS  # looked up at call time: callers may replace it with a plain dict
    for cls in type(model).__mro__:
        if cls in functions:
            try:
                plan = functions[cls](model, sequence_parallel)
            except Exception as exc:  # noqa: BLE001 - the reference falls back on any failure
                log_rank0(logger, logging.WARNING, "Optimized parallel plan for %s is not available: %s. "
                          "Falling back to the Hugging Face tp plan.", type(model).__qualname__, exc)
                return None
            log_rank0(logger, logging.INFO, "Using optimized parallel plan (%s).", cls.__qualname__)
            return plan
    return None


@raises_reference_errors
def _get_parallel_plan(
    model: nn.Module, sequence_parallel: bool = False, tp_shard_plan: dict[str, ParallelStyle] | str | None = None,
) -> dict[str, ParallelStyle]:
    """The TP plan, by the reference's priority: ``tp_shard_plan`` (dict, or dotted path to a dict / function)
    -> the ``PARALLELIZE_FUNCTIONS`` entry of the model's class (or nearest base) -> ``get_hf_tp_shard_plan``.

    Sequence parallel with nothing but the Hugging Face plan raises
    :class:`SequenceParallelUnsupportedError` (an ``AssertionError``), as in the reference.
    """
    if tp_shard_plan is not None:
        return _custom_plan(model, sequence_parallel, tp_shard_plan)
    plan = _optimized_plan(model, sequence_parallel)
    if plan is not None:
        return plan
    if sequence_parallel:
        raise SequenceParallelUnsupportedError(
            f"sequence_parallel is not supported in HF tp plan (no optimized plan for {type(model).__qualname__}). "
            "Add one (PARALLELIZE_FUNCTIONS[cls] = fn or meshplan.register_tp_plan), pass tp_shard_plan=..., or "
            "use meshplan.parallelize, which derives sequence parallel for standard decoders."
        )
    return get_hf_tp_shard_plan(model)


@raises_reference_errors
def parallelize_module(
    module: nn.Module, device_mesh: DeviceMesh, parallelize_plan: Any = None, **kwargs: Any,
) -> nn.Module:
    """torch's ``parallelize_module`` signature, with meshplan's tensor parallelism behind it.

    A plan (dict of key patterns, dotted path, callable, or ``None`` for the model's registered / Hugging Face
    plan) is resolved, matched strictly and checked for tied parameters, head counts and the mesh size before
    anything is sharded, then
    applied keeping tied parameters tied. A single ``ParallelStyle`` goes straight to torch.
    """
    if isinstance(parallelize_plan, ParallelStyle):
        return torch_parallelize_module(module, device_mesh, parallelize_plan, **kwargs)
    plan = build_plan(module, resolve_plan(module, get_registry(), parallelize_plan), "tp", device_mesh.size())
    return apply_tensor_parallel(module, device_mesh, plan)


@raises_reference_errors
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
    """TP (+SP) -> activation checkpointing -> FSDP2 / HSDP: ``meshplan.parallelize(strategy="fsdp2")``.

    The plan comes from the same registry ``PARALLELIZE_FUNCTIONS`` shows (explicit plan, then the provider of
    the model's class, then the Hugging Face plan). A ``cp`` dim shards parameters only: NeMo AutoModel's
    training loop runs context parallelism itself (``cp_implementation="external"``). A ``tp_shard_plan`` that
    is not a dict is resolved as the reference does (:class:`PlanSourceError`, a ``ValueError``, if it fails).
    """
    plan = tp_shard_plan if tp_shard_plan is None else _custom_plan(model, sequence_parallel, tp_shard_plan)
    return parallelize(
        model, device_mesh, strategy="fsdp2", tp_plan=plan, mp_policy=mp_policy,
        offload_policy=offload_policy, sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing, dp_replicate_mesh_name=dp_replicate_mesh_name,
        dp_shard_cp_mesh_name=dp_shard_cp_mesh_name, tp_mesh_name=tp_mesh_name, cp_implementation="external",
    )


def _named_mesh(device_mesh: DeviceMesh, name: str, option: str) -> DeviceMesh:
    try:
        return device_mesh[name]
    except (KeyError, RuntimeError, ValueError) as exc:
        raise MeshError(f"The device mesh has no dimension {name!r} ({option}={name!r}): {exc}. Name the mesh "
                        "dims with init_device_mesh(..., mesh_dim_names=...) or pass the *_mesh_name options.") from exc


@raises_reference_errors
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
    """TP (``parallelize_module``) -> nvFSDP (``nvfsdp_fully_shard``), the reference's steps; returns
    ``(model, optimizer)``.

    With the default ``nvfsdp_fully_shard`` (Megatron-FSDP through meshplan's ``megatron_fsdp`` strategy) every
    option, the mesh and the installation are checked before the model is touched. ``nvfsdp_unit_modules=None``
    lets the strategy pick the model's units (``_no_split_modules``, else its repeated blocks).
    """
    if not HAVE_NVFSDP:
        raise StrategyUnavailableError(
            "nvFSDP is not installed: meshplan runs it on Megatron-FSDP, pip install 'meshplan[megatron]' "
            "(PyPI package megatron-fsdp)."
        )
    units = None if nvfsdp_unit_modules is None else import_classes_from_paths(nvfsdp_unit_modules)
    settings = dict(
        fsdp_unit_modules=units, device_mesh=device_mesh, dp_mesh_name=dp_mesh_name, cp_mesh_name=cp_mesh_name,
        tp_mesh_name=tp_mesh_name, data_parallel_sharding_strategy=data_parallel_sharding_strategy,
        init_model_with_meta_device=init_nvfsdp_with_meta_device, grad_reduce_in_fp32=grad_reduce_in_fp32,
        preserve_fp32_weights=preserve_fp32_weights, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, check_for_nan_in_grad=check_for_nan_in_grad,
        average_in_collective=average_in_collective, disable_bucketing=disable_bucketing,
        calculate_per_token_loss=calculate_per_token_loss,
        keep_fp8_transpose_cache_when_using_custom_fsdp=keep_fp8_transpose_cache_when_using_custom_fsdp,
        nccl_ub=nccl_ub, fsdp_double_buffer=fsdp_double_buffer,
    )
    shard = nvfsdp_fully_shard  # looked up at call time: callers may replace it
    if isinstance(shard, MegatronFSDPShim):
        shard.prepare(model, optimizer=optimizer, **settings)  # every check before anything is modified
    cp_mesh = _named_mesh(device_mesh, cp_mesh_name, "cp_mesh_name")
    tp_mesh = _named_mesh(device_mesh, tp_mesh_name, "tp_mesh_name")
    _named_mesh(device_mesh, dp_mesh_name, "dp_mesh_name")  # must exist (the reference looked it up too)
    if tp_mesh.size() > 1:
        parallelize_module(model, tp_mesh, tp_shard_plan)
    dp_cp_mesh_name = "dp_cp" if cp_mesh.size() > 1 else "dp"
    return shard(module=model, optimizer=optimizer, dp_cp_mesh_name=dp_cp_mesh_name, **settings)


@contextlib.contextmanager
def unshard_fsdp2_model(model: nn.Module) -> Iterator[nn.Module]:
    """All-gather every FSDP2 unit (``FSDPModule`` instance) of ``model`` for the block, then reshard them,
    also when the block raises (:func:`meshplan.state.unshard.unshard_fsdp2_model`)."""
    with unshard_units(model, unit_type=FSDPModule) as unsharded:
        yield unsharded
