"""The ``megatron_fsdp`` strategy (aliases ``nvfsdp``, ``mfsdp``, ``megatron-fsdp``).

Tensor parallel -> activation checkpointing -> Megatron-FSDP (``megatron_fsdp.fully_shard``), on CUDA.

Megatron-FSDP comes from the PyPI package ``megatron-fsdp`` (``pip install 'meshplan[megatron]'``). It is
imported lazily: never by ``import meshplan``, plugin discovery or ``meshplan strategies``. It imports on a
CPU machine but cannot run there (``MegatronFSDP.__init__`` calls ``torch.cuda.current_device()``), so
:meth:`MegatronFSDPStrategy.unavailable_reason` refuses non-CUDA meshes before any work is done.

The options keep the names of NeMo AutoModel's ``nvfsdp_strategy_parallelize``. Each one is mapped onto
the installed ``fully_shard`` API in one place: :data:`TRANSLATIONS` (flag -> keyword or
``MixedPrecisionPolicy`` field) plus :data:`STRUCTURAL_TARGETS` (unit modules, mesh names, optimizer),
both applied by :func:`build_call`. :func:`option_mapping` lists the whole mapping. A flag whose target
the installed version lacks is an error when set to a non-default value, and a logged warning otherwise;
it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..activation_checkpointing import CheckpointingOptions
from ..core.errors import (
    ImportPathError,
    MeshError,
    OptionsError,
    StrategyUnavailableError,
    UnsupportedConfigurationError,
)
from ..core.imports import import_class_from_path
from ..core.log import get_logger, log_rank0
from ..core.mesh import dim_names, submesh
from ..core.naming import did_you_mean
from ..core.plans import PlanSet
from ..core.roles import MeshRoles, RoleDims, role_dims
from ..core.strategy import StrategyOptions
from ..core.torch_private import flatten
from ..introspection.blocks import find_blocks
from ..plugins.hookspecs import hookimpl
from .composition import ComposedStrategy, Composition

logger = get_logger(__name__)

PACKAGE = "megatron_fsdp"
DISTRIBUTION = "megatron-fsdp"
EXTRA = "meshplan[megatron]"
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
POLICY_PREFIX = "mixed_precision_policy."


@dataclass
class MegatronFSDPOptions(CheckpointingOptions):
    """Options of the ``megatron_fsdp`` strategy (NeMo AutoModel's ``nvfsdp_strategy_parallelize`` names).

    Attributes:
        nvfsdp_unit_modules: classes or dotted class paths of the FSDP units. ``None``: the model's
            ``_no_split_modules`` classes, else the class of its detected repeated blocks.
        data_parallel_sharding_strategy: ``no_shard`` | ``optim`` | ``optim_grads`` | ``optim_grads_params``.
        init_nvfsdp_with_meta_device: the model is on the meta device; Megatron-FSDP materializes it
            (needs ``reset_parameters``; not with ``no_shard``).
        grad_reduce_in_fp32: accumulate and reduce gradients in fp32 (``MixedPrecisionPolicy.main_grads_dtype``).
        preserve_fp32_weights: keep fp32 main weights for the optimizer (``main_params_dtype``; ``False``
            lets the model's own weights be the main weights).
        overlap_grad_reduce / overlap_param_gather: overlap communication with compute.
        check_for_nan_in_grad: check every parameter's gradient for NaN (``report_nan_in_param_grad``;
            costs time on every step).
        average_in_collective, disable_bucketing, calculate_per_token_loss, nccl_ub, fsdp_double_buffer:
            passed to ``fully_shard`` under the same name (``nccl_ub`` also turns double buffering on).
        keep_fp8_transpose_cache_when_using_custom_fsdp: ``fully_shard(keep_fp8_transpose_cache=...)``.
        sync_model_each_microbatch: synchronize gradients on every backward (``False``: the optimizer step
            does it; faster with gradient accumulation).
        dp_mesh_name / cp_mesh_name: data- and context-parallel mesh dims; with cp > 1 parameters are sharded
            over the flattened ``<dp>_<cp>`` dim (created when the mesh lacks it).
        optimizer: wrapped in place by ``fully_shard`` (its parameter groups become one group over the
            Megatron-FSDP parameters, with the optimizer's defaults). ``None``: only the model is wrapped;
            build the optimizer from the returned model's parameters, then call
            ``megatron_fsdp.fully_shard_optimizer(optimizer)``.
        activation_checkpointing / activation_checkpointing_every: see
            :class:`meshplan.activation_checkpointing.CheckpointingOptions`; applied after TP and before wrapping.
    """

    nvfsdp_unit_modules: Sequence[str | type] | None = None
    data_parallel_sharding_strategy: str = "optim_grads_params"
    init_nvfsdp_with_meta_device: bool = False
    grad_reduce_in_fp32: bool = False
    preserve_fp32_weights: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    check_for_nan_in_grad: bool = True
    average_in_collective: bool = False
    disable_bucketing: bool = False
    calculate_per_token_loss: bool = False
    keep_fp8_transpose_cache_when_using_custom_fsdp: bool = False
    nccl_ub: bool = False
    fsdp_double_buffer: bool = False
    sync_model_each_microbatch: bool = True
    dp_mesh_name: str = "dp"
    cp_mesh_name: str = "cp"
    optimizer: Optimizer | None = None

    def mesh_roles(self) -> dict[str, RoleDims]:
        # without a dp dim, dp_replicate and dp_shard are flattened into one shard dim (no HSDP here)
        return {"tp": super().mesh_roles()["tp"], "cp": role_dims("cp_mesh_name", self.cp_mesh_name),
                "dp_shard": role_dims("dp_mesh_name", self.dp_mesh_name, ("dp_replicate", "dp_shard"))}


# --------------------------------------------------------------------------------------- the mapping
def _fp32_if(flag: bool) -> torch.dtype | None:
    return torch.float32 if flag else None


@dataclass(frozen=True)
class Translation:
    """One flag option -> one ``fully_shard`` keyword (or ``mixed_precision_policy.<field>``)."""

    option: str
    target: str
    convert: Callable[[Any], Any] | None = None

    @property
    def policy_field(self) -> str | None:
        """The ``MixedPrecisionPolicy`` field this option sets, if it sets one."""
        return self.target[len(POLICY_PREFIX):] if self.target.startswith(POLICY_PREFIX) else None

    def value(self, options: MegatronFSDPOptions) -> Any:
        raw = getattr(options, self.option)
        return self.convert(raw) if self.convert else raw


#: Flag options and their targets in ``megatron_fsdp.fully_shard`` (0.6.x).
TRANSLATIONS: tuple[Translation, ...] = (
    Translation("data_parallel_sharding_strategy", "zero_dp_strategy"),
    Translation("init_nvfsdp_with_meta_device", "init_model_with_meta_device"),
    Translation("grad_reduce_in_fp32", POLICY_PREFIX + "main_grads_dtype", _fp32_if),
    Translation("preserve_fp32_weights", POLICY_PREFIX + "main_params_dtype", _fp32_if),
    Translation("overlap_grad_reduce", "overlap_grad_reduce"),
    Translation("overlap_param_gather", "overlap_param_gather"),
    Translation("check_for_nan_in_grad", "report_nan_in_param_grad"),
    Translation("average_in_collective", "average_in_collective"),
    Translation("disable_bucketing", "disable_bucketing"),
    Translation("calculate_per_token_loss", "calculate_per_token_loss"),
    Translation("keep_fp8_transpose_cache_when_using_custom_fsdp", "keep_fp8_transpose_cache"),
    Translation("nccl_ub", "nccl_ub"),
    Translation("fsdp_double_buffer", "fsdp_double_buffer"),
    Translation("sync_model_each_microbatch", "sync_model_each_microbatch"),
)

#: Options whose value depends on the model or the mesh, and what :func:`build_call` makes of them.
STRUCTURAL_TARGETS: dict[str, str] = {
    "nvfsdp_unit_modules": "fsdp_unit_modules (classes: imported paths, else _no_split_modules, else block class)",
    "dp_mesh_name": "device_mesh + dp_shard_dim (when cp == 1)",
    "cp_mesh_name": "dp_shard_dim = flattened '<dp>_<cp>' dim (when cp > 1)",
    "tp_mesh_name": "tp_dim",
    "optimizer": "fully_shard(module, optimizer) (None: fully_shard_model(module))",
}

#: Options consumed by meshplan itself before Megatron-FSDP is called.
MESHPLAN_OPTIONS: dict[str, str] = {
    "sequence_parallel": "meshplan: TP plan variant",
    "strict": "meshplan: TP plan key matching",
    "activation_checkpointing": "meshplan: activation_checkpointing before wrapping",
    "activation_checkpointing_every": "meshplan: activation_checkpointing before wrapping",
    "compile": "meshplan: regional compilation of each block before wrapping",
}

#: Keywords the strategy always passes; an installed version lacking one of them is unsupported.
REQUIRED_KEYWORDS = ("device_mesh", "dp_shard_dim", "tp_dim", "fsdp_unit_modules", "mixed_precision_policy")


def option_mapping() -> dict[str, str]:
    """Every option of :class:`MegatronFSDPOptions` -> where it goes (for docs, listings and tests)."""
    mapping = {t.option: t.target for t in TRANSLATIONS} | STRUCTURAL_TARGETS | MESHPLAN_OPTIONS
    return {f.name: mapping[f.name] for f in dataclasses.fields(MegatronFSDPOptions)}


# ---------------------------------------------------------------------------- the installed package
def is_installed() -> bool:
    """Whether ``megatron_fsdp`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def _not_installed_message() -> str:
    return f"Megatron-FSDP is not installed: pip install '{EXTRA}' (PyPI package {DISTRIBUTION})"


@dataclass(frozen=True)
class MegatronFSDPAPI:
    """The parts of the installed ``megatron_fsdp`` that the strategy calls, resolved at call time."""

    version: str
    fully_shard: Callable[..., Any]
    fully_shard_model: Callable[..., Any]
    mixed_precision_policy: type

    @classmethod
    def load(cls) -> MegatronFSDPAPI:
        """Import ``megatron_fsdp`` now; a missing package raises :class:`StrategyUnavailableError`."""
        try:
            module = importlib.import_module(PACKAGE)
        except ImportError as exc:
            raise StrategyUnavailableError(f"{_not_installed_message()}. ({exc})") from exc
        missing = [name for name in ("fully_shard", "fully_shard_model", "MixedPrecisionPolicy")
                   if not hasattr(module, name)]
        version = str(getattr(module, "__version__", "unknown"))
        if missing:
            raise StrategyUnavailableError(
                f"The installed megatron-fsdp {version} lacks {missing}; meshplan needs megatron-fsdp >= 0.6: "
                f"pip install -U '{EXTRA}'."
            )
        return cls(version, module.fully_shard, module.fully_shard_model, module.MixedPrecisionPolicy)

    def function(self, name: str) -> Callable[..., Any]:
        return self.fully_shard if name == "fully_shard" else self.fully_shard_model

    def accepts(self, function: str, keyword: str) -> bool:
        """Whether ``fully_shard`` / ``fully_shard_model`` takes ``keyword``."""
        try:
            params = inspect.signature(self.function(function)).parameters
        except (TypeError, ValueError):
            return True  # not introspectable: let the call itself decide
        return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def policy_fields(self) -> set[str]:
        cls = self.mixed_precision_policy
        if dataclasses.is_dataclass(cls):
            return {f.name for f in dataclasses.fields(cls)}
        return set(inspect.signature(cls).parameters)


# ----------------------------------------------------------------------------------- unit modules
def _unique(classes: Sequence[type]) -> list[type]:
    return list(dict.fromkeys(classes))


def _no_split_classes(model: nn.Module) -> list[type]:
    """The classes of ``model`` named in its Hugging Face ``_no_split_modules`` (absent names skipped)."""
    names = getattr(model, "_no_split_modules", None) or ()
    names = sorted(names) if isinstance(names, (set, frozenset)) else list(names)
    present: dict[str, type] = {}
    for module in model.modules():
        present.setdefault(type(module).__name__, type(module))
    return _unique([present[name] for name in names if name in present])


def resolve_unit_modules(model: nn.Module, spec: Sequence[str | type] | str | type | None) -> list[type]:
    """The FSDP unit classes: ``spec`` resolved (paths imported), or the model's default units.

    Raises :class:`ImportPathError` naming a path that cannot be imported and :class:`OptionsError` for an
    entry that is not an ``nn.Module`` class. An empty result means "the whole model is one unit".
    """
    if spec is None:
        return _no_split_classes(model) or _unique([type(block) for _, block in find_blocks(model)])
    entries = [spec] if isinstance(spec, (str, type)) else list(spec)
    classes = []
    for entry in entries:
        if isinstance(entry, str):
            try:
                entry = import_class_from_path(entry)
            except ImportPathError as exc:
                raise ImportPathError(
                    f"nvfsdp_unit_modules entry {entry!r} cannot be imported: {exc} "
                    "Give a class or an importable dotted path such as "
                    "'transformers.models.llama.modeling_llama.LlamaDecoderLayer'."
                ) from exc
        if not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise OptionsError(
                f"nvfsdp_unit_modules entries must be nn.Module classes or dotted paths to them; got {entry!r}."
            )
        classes.append(entry)
    return _unique(classes)


# ------------------------------------------------------------------------------------- the call
@dataclass(frozen=True)
class MegatronFSDPCall:
    """The ``fully_shard`` call the strategy makes, decided before the model is touched.

    Attributes:
        function: ``"fully_shard"`` (with an optimizer) or ``"fully_shard_model"``.
        kwargs: every keyword argument except ``module`` and ``optimizer``.
        optimizer: the optimizer to wrap in place, or ``None``.
        flatten: ``((dp, cp), "<dp>_<cp>")`` when that flattened dim must be created before the call.
        ignored: warnings for options at their default whose target the installed version lacks.
        notes: other warnings to log once when the call is made.
    """

    function: str
    kwargs: dict[str, Any]
    optimizer: Optimizer | None = None
    flatten: tuple[tuple[str, str], str] | None = None
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def run(self, api: MegatronFSDPAPI, model: nn.Module) -> tuple[nn.Module, Optimizer | None]:
        """Call Megatron-FSDP; returns the wrapped model and the (in-place wrapped) optimizer."""
        if self.function == "fully_shard":
            wrapped, optimizer = api.fully_shard(module=model, optimizer=self.optimizer, **self.kwargs)
            return wrapped, optimizer
        wrapped = api.fully_shard_model(module=model, **self.kwargs)
        # Expose the distributed parameters, so an optimizer built from wrapped.parameters() can later be
        # given to megatron_fsdp.fully_shard_optimizer (what fully_shard does before wrapping one).
        replace = getattr(wrapped, "_replace_param_with_distributed_if_needed", None)
        if callable(replace):
            replace()
        else:
            log_rank0(logger, logging.WARNING, "megatron-fsdp %s has no MegatronFSDP._replace_param_with_"
                      "distributed_if_needed(); pass the optimizer to parallelize instead of wrapping it later.",
                      api.version)
        return wrapped, None


def _check_values(model: nn.Module, options: MegatronFSDPOptions) -> None:
    strategy = options.data_parallel_sharding_strategy
    if strategy not in SHARDING_STRATEGIES:
        hint = did_you_mean(str(strategy), SHARDING_STRATEGIES)
        raise UnsupportedConfigurationError(
            f"data_parallel_sharding_strategy must be one of {list(SHARDING_STRATEGIES)}, got {strategy!r}.{hint}"
        )
    if options.init_nvfsdp_with_meta_device and strategy == "no_shard":
        raise UnsupportedConfigurationError(
            "init_nvfsdp_with_meta_device=True needs a sharded data_parallel_sharding_strategy: Megatron-FSDP "
            "does not support meta-device initialization with 'no_shard'."
        )
    if options.optimizer is not None and not isinstance(options.optimizer, Optimizer):
        raise OptionsError(f"optimizer must be a torch.optim.Optimizer or None, got {type(options.optimizer)}.")
    options.check_checkpointing(find_blocks(model))


def _mesh_arguments(roles: MeshRoles) -> tuple[dict[str, Any], Any]:
    """``device_mesh``/``dp_shard_dim``/``tp_dim`` and the flattening needed; raises :class:`MeshError`.

    Coverage of every rank is checked by the roles; Megatron-FSDP also wants the dims named.
    """
    names = list(dim_names(roles.mesh)) or "no named dims"
    if "dp_shard" not in roles.dims:
        raise MeshError(
            f"Megatron-FSDP shards over a data-parallel mesh dim (dp_mesh_name, default 'dp'), but the mesh has "
            f"{names}. Build it with init_device_mesh('cuda', (dp, cp, tp), mesh_dim_names=('dp', 'cp', 'tp')) "
            "or pass dp_mesh_name=...."
        )
    if "tp" not in roles.dims:
        raise MeshError(
            f"Megatron-FSDP needs a tensor-parallel mesh dim (tp_mesh_name) even without TP; the mesh has {names}. "
            "Add a dim of size 1, e.g. init_device_mesh('cuda', (dp, 1), mesh_dim_names=('dp', 'tp'))."
        )
    shard_dims = roles.dims["dp_shard"] + (roles.dims["cp"] if roles.size("cp") > 1 else ())
    shard_dim = "_".join(shard_dims)
    flatten = None if submesh(roles.mesh, shard_dim) is not None else (shard_dims, shard_dim)
    return {"device_mesh": roles.mesh, "dp_shard_dim": shard_dim, "tp_dim": roles.dims["tp"][0]}, flatten


def _optimizer_notes(optimizer: Optimizer | None) -> tuple[str, ...]:
    """A warning when wrapping will collapse the optimizer's parameter groups into one."""
    if optimizer is None:
        return ()
    groups = optimizer.param_groups
    differing = [
        key for group in groups for key, value in group.items()
        if key != "params" and key in optimizer.defaults and value != optimizer.defaults[key]
    ]
    if len(groups) <= 1 and not differing:
        return ()
    return (
        f"megatron_fsdp.fully_shard replaces the optimizer's {len(groups)} parameter group(s) with one group "
        f"over the Megatron-FSDP parameters using optimizer.defaults; per-group settings "
        f"({sorted(set(differing)) or 'group layout'}) are lost.",
    )


def build_call(
    model: nn.Module, roles: MeshRoles, options: MegatronFSDPOptions, api: MegatronFSDPAPI
) -> MegatronFSDPCall:
    """Map ``options`` onto the installed ``fully_shard`` API. Pure: no collective, the model is untouched.

    Raises a typed error for a bad value, a bad mesh, an unimportable unit path, or a non-default option
    whose target the installed version lacks.
    """
    _check_values(model, options)
    function = "fully_shard" if options.optimizer is not None else "fully_shard_model"
    missing = [k for k in REQUIRED_KEYWORDS if not api.accepts(function, k)]
    if missing:
        raise StrategyUnavailableError(
            f"The installed megatron-fsdp {api.version} has no {missing} in {function}(); meshplan needs "
            f"megatron-fsdp >= 0.6: pip install -U '{EXTRA}'."
        )
    kwargs, flatten = _mesh_arguments(roles)
    units = resolve_unit_modules(model, options.nvfsdp_unit_modules)
    kwargs["fsdp_unit_modules"] = units or None

    defaults = MegatronFSDPOptions()
    policy_fields = api.policy_fields()
    policy: dict[str, Any] = {}
    ignored = []
    for translation in TRANSLATIONS:
        field = translation.policy_field
        supported = field in policy_fields if field else api.accepts(function, translation.target)
        value = getattr(options, translation.option)
        if not supported:
            where = f"MixedPrecisionPolicy.{field}" if field else f"{function}({translation.target}=...)"
            if value != getattr(defaults, translation.option):
                raise UnsupportedConfigurationError(
                    f"{translation.option}={value!r} maps onto {where}, which the installed megatron-fsdp "
                    f"{api.version} does not have. Leave the option at its default or install a version "
                    f"that supports it (pip install -U '{EXTRA}')."
                )
            ignored.append(f"{translation.option} (default {value!r}) has no counterpart {where} in megatron-fsdp "
                           f"{api.version}; it is ignored.")
            continue
        if field:
            policy[field] = translation.value(options)
        else:
            kwargs[translation.target] = translation.value(options)
    kwargs["mixed_precision_policy"] = api.mixed_precision_policy(**policy)

    notes = list(_optimizer_notes(options.optimizer))
    if options.nvfsdp_unit_modules is not None:
        present = {type(m) for m in model.modules()}
        absent = [cls.__qualname__ for cls in units if not any(issubclass(p, cls) for p in present)]
        if absent:
            notes.append(f"nvfsdp_unit_modules {absent} match no module of {type(model).__qualname__}.")
    if not units:
        notes.append(f"No FSDP unit modules for {type(model).__qualname__} (no _no_split_modules and no repeated "
                     "blocks): Megatron-FSDP treats the whole model as one unit (DDP-like peak memory).")
    return MegatronFSDPCall(function, kwargs, options.optimizer, flatten, tuple(ignored), tuple(notes))


# ------------------------------------------------------------------------------------ the strategy
def _device_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    try:
        return bool(torch.get_device_module(device_type).is_available())
    except (AttributeError, RuntimeError):
        return False


class MegatronFSDPStrategy(ComposedStrategy):
    """NVIDIA Megatron-FSDP over the (dp x cp) mesh, after tensor parallelism over ``tp``.

    It supports ``tp`` and ``cp``; a ``cp`` dim only shards parameters (over ``<dp>_<cp>``): attention is left
    to the training loop, as NeMo AutoModel runs it.

    Args:
        device_types: mesh device types Megatron-FSDP may run on (``("cuda",)``). Widening it, e.g. to
            ``("cuda", "cpu")``, only makes sense when ``megatron_fsdp.fully_shard`` is replaced by a
            stand-in (tests of the argument mapping on CPU).
    """

    name = "megatron_fsdp"
    supports = frozenset({"tp", "cp"})
    aliases = ("nvfsdp", "mfsdp", "megatron-fsdp")
    description = "TP -> activation checkpointing -> NVIDIA Megatron-FSDP (megatron_fsdp.fully_shard); CUDA only"
    options_class = MegatronFSDPOptions

    def __init__(self, device_types: Sequence[str] = ("cuda",)) -> None:
        self.device_types = tuple(device_types)

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        missing = []
        if device_type is not None and device_type not in self.device_types:
            missing.append(
                f"CUDA devices: Megatron-FSDP runs only on CUDA (it calls torch.cuda.current_device()), but the "
                f"mesh's device type is {device_type!r}. Build the mesh with init_device_mesh('cuda', ...) on "
                "GPUs, or use strategy='fsdp2' or 'ddp' here"
            )
        elif device_type is None and not any(_device_available(t) for t in self.device_types):
            missing.append("CUDA (no CUDA device on this machine)")
        if not is_installed():
            missing.append(f"megatron-fsdp (not installed: pip install '{EXTRA}')")
        return f"needs {' and '.join(missing)}" if missing else None

    def validate(self, model: nn.Module, roles: MeshRoles, plans: PlanSet,
                 options: StrategyOptions) -> tuple[MegatronFSDPAPI, MegatronFSDPCall]:
        """Load the installed Megatron-FSDP and map the options onto its call (:func:`build_call`, which also
        checks activation checkpointing); both reach :meth:`wrap_data_parallel`."""
        api = MegatronFSDPAPI.load()
        return api, build_call(model, roles, options, api)

    def wrap_data_parallel(self, model: nn.Module, roles: MeshRoles, plans: PlanSet, options: StrategyOptions,
                           validated: tuple[MegatronFSDPAPI, MegatronFSDPCall], done: Composition) -> nn.Module:
        """Megatron-FSDP. Returns the wrapped model (a ``MegatronFSDP`` whose ``.module`` is ``model``);
        ``options.optimizer``, if given, is wrapped in place."""
        api, call = validated
        wrapped, _ = shard(model, roles, call, api)
        return wrapped


def shard(
    model: nn.Module, roles: MeshRoles, call: MegatronFSDPCall, api: MegatronFSDPAPI
) -> tuple[nn.Module, Optimizer | None]:
    """Make a :func:`build_call` call: log its warnings, create the flattened ``<dp>_<cp>`` dim it needs, and
    wrap ``model`` (already tensor-parallel and checkpointed) with Megatron-FSDP."""
    for message in (*call.ignored, *call.notes):
        log_rank0(logger, logging.WARNING, "%s", message)
    if call.flatten is not None:
        dims, flat_name = call.flatten
        flatten(roles.mesh[dims], flat_name)
    units = call.kwargs["fsdp_unit_modules"] or []
    log_rank0(logger, logging.INFO, "Megatron-FSDP %s: %s(units=%s, dp_shard_dim=%r, zero_dp_strategy=%r)",
              api.version, call.function, [c.__name__ for c in units], call.kwargs["dp_shard_dim"],
              call.kwargs.get("zero_dp_strategy"))
    from ..state.packing import all_to_rank_major  # DTensor: imported on use, keeps plugin discovery light

    all_to_rank_major(model)  # Megatron-FSDP reads TP shards as plain Shard placements
    return call.run(api, model)


@hookimpl
def meshplan_register_strategies(register) -> None:  # noqa: ANN001
    register(MegatronFSDPStrategy)
