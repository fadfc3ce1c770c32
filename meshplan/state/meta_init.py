"""Materialize a model that was built and parallelized on the meta device, shard by shard.

Workflow::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = meshplan.parallelize(model, mesh)            # TP / FSDP2 only record layouts on meta
    materialize_meta_model(model)                          # own initializers, or:
    materialize_meta_model(model, full_sd, broadcast_from_rank0=True)   # full_sd on rank 0 only

Each rank allocates only its own shards (``to_empty``) and fills them, so no rank ever builds the whole
unsharded model:

* **From a full state dict**: torch's ``set_model_state_dict(full_state_dict=True)`` keeps each rank's
  slice; with ``broadcast_from_rank0=True`` only rank 0 holds the state dict and tensors are broadcast
  one at a time. Non-persistent buffers (e.g. rotary ``inv_freq``) are rebuilt by the initializers.
* **From the model's own initializers** (Hugging Face ``_init_weights``, else each module's
  ``reset_parameters``, or ``init_fn``): each parameter is initialized under a seed derived from ``seed``,
  its name and the coordinates of the shard this rank holds. Ranks holding the same shard (replicas:
  HSDP, or tensor-parallel replicated weights) therefore compute identical values without communicating,
  and different shards get independent random streams. The caller's RNG state is left untouched.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from ..core.errors import UnsupportedConfigurationError
from .packing import pack_full_state_dict

ModuleInit = Callable[[nn.Module], None]


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


#: the device a strategy that keeps plain (replicated) parameters left meta tensors for (see :func:`model_device`)
DEVICE_ATTRIBUTE = "_meshplan_device"


def model_device(model: nn.Module) -> torch.device:
    """The device recorded by the strategy (``ddp`` on a meta model), else the device type of the model's device
    mesh (its first DTensor parameter), else the CPU."""
    recorded = getattr(model, DEVICE_ATTRIBUTE, None)
    if recorded is not None:
        return recorded
    for param in model.parameters():
        if isinstance(param, DTensor):
            device_type = param.device_mesh.device_type
            if device_type != "cpu" and hasattr(torch, device_type):
                return torch.device(device_type, getattr(torch, device_type).current_device())
            return torch.device(device_type)
    return torch.device("cpu")


def allocate(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device=device)`` with tied parameters still one tensor (``to_empty`` gives each name of a
    tied plain parameter its own tensor; DTensor parameters stay tied)."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    model.to_empty(device=device)
    for first, *others in names_of.values():
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, model.get_parameter(first))


def _is_hf_pretrained(module: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


def module_initializers(model: nn.Module, init_fn: ModuleInit | None = None) -> dict[str, ModuleInit]:
    """``{module name: function initializing that module's own tensors}`` for every module that has one.

    ``init_fn`` wins; then the ``_init_weights`` of the nearest Hugging Face ``PreTrainedModel`` that
    contains the module (composite models have several); then the module's ``reset_parameters``.
    """
    found: dict[str, ModuleInit] = {}

    def visit(prefix: str, module: nn.Module, owner: nn.Module | None) -> None:
        owner = module if _is_hf_pretrained(module) else owner
        if init_fn is not None:
            found[prefix] = init_fn
        elif owner is not None:
            found[prefix] = lambda m, _owner=owner: _owner._init_weights(m)
        elif callable(getattr(module, "reset_parameters", None)):
            found[prefix] = lambda m: m.reset_parameters()
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, owner)

    visit("", model, None)
    return found


def _shard_key(tensor: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Coordinates of this rank's shard along the mesh dims the tensor is sharded on (``()`` if none)."""
    if not isinstance(tensor, DTensor):
        return ()
    coordinate = tensor.device_mesh.get_coordinate() or ()
    return tuple((dim, coord) for dim, (placement, coord) in enumerate(zip(tensor.placements, coordinate))
                 if not (placement.is_replicate() or placement.is_partial()))  # Shard or _StridedShard


def _seed_for(seed: int, name: str, key: tuple) -> int:
    """A seed that depends only on ``seed``, the tensor's name and its shard coordinates."""
    return (seed * 0x9E3779B1 + zlib.crc32(f"{name}|{key}".encode())) % (2**63)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _fork_rng(device: torch.device):  # noqa: ANN202 - a context manager
    devices = [] if device.type == "cpu" else [device]
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def _clear_hf_flags(model: nn.Module) -> None:
    """Forget Hugging Face's "already initialized" marks, which would make ``_init_weights`` skip tensors."""
    for obj in (*model.modules(), *model.parameters(), *model.buffers()):
        if hasattr(obj, "_is_hf_initialized"):
            delattr(obj, "_is_hf_initialized")


@torch.no_grad()
def initialize_sharded(model: nn.Module, seed: int = 0, init_fn: ModuleInit | None = None,
                       parameters: bool = True) -> None:
    """Run the module initializers on the model's (sharded, materialized) tensors, parameter by parameter.

    ``parameters=False`` only rebuilds buffers (modules that own buffers), e.g. before loading a state dict.
    """
    initializers = module_initializers(model, init_fn)
    device = model_device(model)
    _clear_hf_flags(model)
    done: set[int] = set()
    for module_name, module in model.named_modules():
        initializer = initializers.get(module_name)
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in done]
        has_buffers = any(True for _ in module.buffers(recurse=False))
        if initializer is None or not (has_buffers or (parameters and params)):
            continue
        if not parameters or not params:
            with _fork_rng(device):
                torch.manual_seed(_seed_for(seed, module_name, ()))
                initializer(module)
            continue
        for param_name, param in params:
            # Run the module's initializer once per parameter under that parameter's seed, keeping only
            # that parameter's result: the other parameters it already initialized are put back.
            keep = [(p, _local(p).clone()) for _, p in module.named_parameters(recurse=False) if id(p) in done]
            with _fork_rng(device):
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                torch.manual_seed(_seed_for(seed, full_name, _shard_key(param)))
                initializer(module)
            for other, value in keep:
                _local(other).copy_(value)
            done.add(id(param))


def _agree_on_state_dict(state_dict: Mapping | None, broadcast_from_rank0: bool) -> bool:
    """Whether to load a state dict, decided alike on every rank (one tiny collective when distributed).

    Raises the same :class:`UnsupportedConfigurationError` on every rank for inconsistent input, instead of
    letting some ranks enter the state-dict broadcast while others initialize (a hang).
    """
    has = float(bool(state_dict))
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        rank0_has = has if dist.get_rank() == 0 else 1.0
        flags = torch.tensor([has, -has, -rank0_has], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        any_has, all_have, rank0 = bool(flags[0] > 0), bool(flags[1] < 0), bool(flags[2] < 0)
    else:
        any_has = all_have = rank0 = bool(has)
    if broadcast_from_rank0 and not rank0:
        raise UnsupportedConfigurationError(
            "broadcast_from_rank0=True but rank 0 passed no state dict: give rank 0 the full state dict "
            "(the other ranks may pass None).")
    if not broadcast_from_rank0 and any_has and not all_have:
        raise UnsupportedConfigurationError(
            "Some ranks passed a state dict and others did not: pass the full state dict on every rank, "
            "or only on rank 0 with broadcast_from_rank0=True.")
    return any_has or broadcast_from_rank0


def with_tied_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` plus the keys of tied parameters it leaves out, each aliasing its present twin.

    ``save_pretrained`` stores a tied parameter once (``lm_head.weight`` is dropped when
    ``tie_word_embeddings=True``); torch's state-dict loading wants every name. Keys are the model's
    ``state_dict()`` names, which wrappers (activation checkpointing) keep plain.
    """
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    filled = dict(state_dict)
    for names in names_of.values():
        present = next((name for name in names if name in filled), None)
        if present is not None and len(names) > 1:
            for name in names:
                filled.setdefault(name, filled[present])
    return filled


def materialize_meta_model(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    broadcast_from_rank0: bool = False,
    device: torch.device | str | None = None,
    init_fn: ModuleInit | None = None,
    seed: int = 0,
) -> nn.Module:
    """Allocate a meta-device (parallelized) model's shards on ``device`` and fill them; returns the model.

    Args:
        state_dict: a full (unsharded) state dict keyed like the original model. ``None``: initialize
            from the model's own initializers instead. With ``broadcast_from_rank0=True`` only rank 0's
            state dict is read (other ranks may pass ``None``). Tied parameters may appear under one name
            only, as ``save_pretrained`` writes them.
        device: where shards live; default: the device type of the model's mesh (``cpu`` for gloo).
        init_fn: ``init_fn(module)`` initializes one module's own parameters and buffers; default: Hugging
            Face ``_init_weights``, else ``reset_parameters``.
        seed: base seed of the initializers (same on every rank).

    Collective when a process group exists: call on every rank. Raises
    :class:`UnsupportedConfigurationError` (on every rank) when the model has no meta tensors, when a
    parameter has no initializer and no state dict is given, or when ranks disagree about the state dict.
    """
    meta = [name for name, tensor in _tensors(model) if tensor.is_meta]
    if not meta:
        raise UnsupportedConfigurationError(
            "materialize_meta_model: the model has no tensors on the meta device; build it under "
            "`with torch.device('meta'):` before parallelizing.")
    loading = _agree_on_state_dict(state_dict, broadcast_from_rank0)
    if not loading:
        initializers = module_initializers(model, init_fn)
        orphans = [f"{m}.{n}" if m else n for m, module in model.named_modules()
                   for n, _ in module.named_parameters(recurse=False) if m not in initializers]
        if orphans:
            raise UnsupportedConfigurationError(
                f"No initializer for parameter(s) {orphans[:5]}{' ...' if len(orphans) > 5 else ''}: their "
                "modules have no reset_parameters() and the model is not a Hugging Face PreTrainedModel. Pass "
                "init_fn=... or a full state_dict.")
    allocate(model, torch.device(device) if device is not None else model_device(model))
    initialize_sharded(model, seed=seed, init_fn=init_fn, parameters=not loading)
    if loading:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        source = pack_full_state_dict(model, with_tied_keys(model, state_dict or {}), strict=True) \
            if (not broadcast_from_rank0 or rank == 0) else {}
        set_model_state_dict(model, source, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=True))
    return model
