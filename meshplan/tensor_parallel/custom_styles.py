"""Model-agnostic ``ParallelStyle`` classes that torch does not ship.

* :class:`PackedColwiseParallel` / :class:`PackedRowwiseParallel` — fused projections (``[q; k; v]``,
  ``[gate; up]``): every rank keeps its slice of *each* packed part.
* :class:`ReplicatedWithGradAllReduce` — replicated parameters whose gradients are partial sums (a per-head
  norm that only sees this rank's heads), summed across the TP mesh.
* :class:`LocalShardedParameters` — per-head parameters of a module whose heads are sharded by its child
  projections (attention sinks, per-head biases): sharded along their head dim, the module computes on the
  local shard (transformers' ``local_params`` owner plus the parameters' own ``colwise`` entries).
* :class:`LocalHeadCount` — a module that reshapes by its own head count gets this rank's count.
* :class:`MlaKvAProjParallel` — multi-head latent attention's ``kv_a_proj_with_mqa``: the gradient of the rotary
  slice of its output, which bypasses the column-wise ``kv_b_proj``, is summed across the TP mesh.
* :class:`VocabParallelEmbedding` — vocab-parallel embedding, also for an ``nn.Embedding`` whose forward applies
  child modules (a norm) to the lookup: the lookup is all-reduced before they see it.
* :class:`KeepReplicated` — states explicitly that a module stays replicated (no effect).
* :class:`PrepareHiddenStates` — redistributes a module's hidden-states input whether it is passed
  positionally or as ``hidden_states=``; torch's ``PrepareModuleInput`` needs the exact call shape.
* :class:`ChainedStyles` — several styles on one module, applied in order.

Packed layout: a packed parameter is stored *rank-major* — the parts' rank-``r`` slices are contiguous —
and sharded with a plain ``Shard``, so gradients and FSDP2 work unchanged; :mod:`meshplan.state.packing` holds the
layout and its conversions (a gathered ``full_tensor()`` is rank-major, ``gather_full_state_dict`` and distributed
checkpoints are in the model's order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from ..core.errors import PlanError, StyleModuleTypeError, TensorParallelSizeError
from ..state.packing import pack_rank_major, record_packed


# --- packed (fused) projections ---------------------------------------------------------------------
def distribute_parameter(owner: nn.Module, name: str, mesh: DeviceMesh, dim: int | None,
                         parts: Sequence[int] = ()) -> None:
    """Replace ``owner``'s parameter ``name`` by a DTensor on ``mesh``: replicated when ``dim`` is ``None``, else
    ``Shard(dim)``, its ``parts`` (when more than one) packed rank-major first and recorded. A DTensor stays."""
    param = owner._parameters[name]
    if isinstance(param, DTensor):
        return
    data = param.detach()
    if len(parts) > 1:
        if data.device.type != "meta":
            data = pack_rank_major(data, parts, mesh.size(), dim)
        record_packed(owner, name, parts, mesh.size(), dim)
    placement = Replicate() if dim is None else Shard(dim)
    sharded = distribute_tensor(data, mesh, [placement])
    owner.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


class _Packed:
    """Shared part of the packed styles: the part sizes and the in-place rank-major permutation."""

    def _init_parts(self, sizes: Sequence[int] | None, parts: int) -> None:
        self.sizes = tuple(int(s) for s in sizes) if sizes is not None else None
        self.parts = len(self.sizes) if self.sizes is not None else int(parts)

    def _part_sizes(self, module: nn.Module, total: int) -> tuple[int, ...]:
        if self.sizes is None:
            if total % self.parts:
                raise PlanError(f"{type(self).__name__}: {total} features of {type(module).__name__} cannot be "
                                f"split in {self.parts} equal packed parts.")
            return (total // self.parts,) * self.parts
        if sum(self.sizes) != total:
            raise PlanError(f"{type(self).__name__}: packed part sizes {list(self.sizes)} add up to "
                            f"{sum(self.sizes)}, but {type(module).__name__} has {total} features.")
        return self.sizes

    def __repr__(self) -> str:
        layouts = super().__repr__()  # torch's "Name(input_layouts=..., ...)"
        parts = f"sizes={list(self.sizes)}" if self.sizes is not None else f"parts={self.parts}"
        return f"{layouts[:-1]}, {parts})"

    def _pack(self, module: nn.Module, mesh: DeviceMesh, dim: int, names: Sequence[str]) -> None:
        if not isinstance(module, nn.Linear):
            raise PlanError(f"{type(self).__name__} applies to nn.Linear, not {type(module).__name__}.")
        total = module.weight.shape[dim]
        sizes = self._part_sizes(module, total)
        world = mesh.size()
        if any(size % world for size in sizes):
            raise PlanError(f"{type(self).__name__}: packed parts {list(sizes)} must each divide by the TP "
                            f"size {world} so every rank keeps an equal slice of each part.")
        with torch.no_grad():
            for name in names:
                param = getattr(module, name, None)
                if param is None:
                    continue
                param_dim = dim if param.ndim > 1 else 0
                if param.device.type != "meta":
                    param.copy_(pack_rank_major(param, sizes, world, param_dim))
                record_packed(module, name, sizes, world, param_dim)


class PackedColwiseParallel(_Packed, ColwiseParallel):
    """Column-wise parallel for a Linear whose output features are packed parts (``sizes``, or ``parts``
    equal parts). The local output is ``[a_r, b_r, ...]``: the module sees its usual layout, per rank."""

    def __init__(self, sizes: Sequence[int] | None = None, *, parts: int = 2,
                 input_layouts: Placement | None = None) -> None:
        super().__init__(input_layouts=input_layouts)
        self._init_parts(sizes, parts)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._pack(module, device_mesh, 0, ("weight", "bias"))
        return super()._apply(module, device_mesh)


class PackedRowwiseParallel(_Packed, RowwiseParallel):
    """Row-wise parallel for a Linear whose input features are packed parts; its input must be the local
    ``[a_r, b_r, ...]`` slice (as a :class:`PackedColwiseParallel` producer emits). Bias stays replicated."""

    def __init__(self, sizes: Sequence[int] | None = None, *, parts: int = 2,
                 output_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        super().__init__(output_layouts=output_layouts, use_local_output=use_local_output)
        self._init_parts(sizes, parts)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._pack(module, device_mesh, 1, ("weight",))
        return super()._apply(module, device_mesh)


# --- vocab-parallel embeddings ----------------------------------------------------------------------
class VocabParallelEmbedding(RowwiseParallel):
    """Vocab-parallel ``nn.Embedding`` (``embedding_rowwise``): the weight is sharded along the vocabulary
    (``Shard(0)``), the replicated input ids look up this rank's rows and the lookup is all-reduced.

    Unlike torch's ``RowwiseParallel`` it also takes an ``nn.Embedding`` subclass whose forward passes the lookup
    through child modules (Inkling's embedding + RMSNorm): only the module's own parameters are sharded, and the
    lookup is all-reduced before a child sees it, so the children (whose parameters torch makes replicated DTensors)
    run replicated on the full embedding. Without children it is torch's vocab-parallel embedding."""

    def __init__(self, *, use_local_output: bool = True) -> None:
        super().__init__(input_layouts=Replicate(), use_local_output=use_local_output)

    def _partition_embedding_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:  # torch visits every submodule: the children stay replicated
            return
        for param_name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))

    @staticmethod
    def _reduce_lookup(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A child's DTensor inputs (the partial lookup) all-reduced to ``Replicate``."""

        def full(value: Any) -> Any:
            return value.redistribute(placements=[Replicate()]) if isinstance(value, DTensor) else value

        return tuple(map(full, args)), {key: full(value) for key, value in kwargs.items()}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for child in module.children():
            child.register_forward_pre_hook(self._reduce_lookup, with_kwargs=True)
        return super()._apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


# --- parameters computed on as local tensors ----------------------------------------------------
def all_reduce_backward(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity in forward; in backward the gradient is summed across ``mesh``.

    For a replicated tensor consumed by rank-local computation (each rank's gradient is a partial sum).
    Expressed with DTensor: a ``Replicate`` view whose local gradient is declared ``Partial``.
    """
    replicated = DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)
    return replicated.to_local(grad_placements=[Partial()])


def all_reduce_forward(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum of ``tensor`` over ``mesh`` in forward; in backward each rank gets the (replicated) gradient as is."""
    partial = DTensor.from_local(tensor, mesh, [Partial()], run_check=False)
    return partial.redistribute(placements=[Replicate()]).to_local()


def replicated_local_input(value: Any, mesh: DeviceMesh) -> Any:
    """A floating tensor argument (plain, or a DTensor made replicated) as a local tensor whose gradient is summed
    over ``mesh`` in backward; anything else as it is."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if isinstance(value, DTensor):
        value = value.redistribute(placements=[Replicate()]).to_local()
    return all_reduce_backward(value, mesh)


#: ``(owner module, parameter name, DTensor -> local tensor)`` for each parameter a forward reads locally
LocalizedParameters = list[tuple[nn.Module, str, Callable[[DTensor], torch.Tensor]]]


def run_on_local_parameters(module: nn.Module, localized: Callable[[], LocalizedParameters]) -> nn.Module:
    """Wrap ``module.forward`` so that it (and its children) read local tensors of the DTensor parameters that
    ``localized()`` names, each made by its converter (through which gradients reach the DTensor); the DTensors
    are put back afterwards. ``localized`` is called on every forward: FSDP may replace parameters between calls."""
    forward = module.forward

    @functools.wraps(forward)
    def local_forward(*args: Any, **kwargs: Any) -> Any:
        originals = [(owner, name, owner._parameters[name], to_local) for owner, name, to_local in localized()]
        for owner, name, param, to_local in originals:
            owner._parameters[name] = to_local(param)
        try:
            return forward(*args, **kwargs)
        finally:
            for owner, name, param, _ in originals:
                owner._parameters[name] = param

    module.forward = local_forward
    return module


class _LocalParameterForward(ParallelStyle):
    """Shared part of the styles whose module runs its forward on local tensors of its DTensor parameters
    (by default its own parameters only, not its children's); gradients reach the DTensor parameters through
    :meth:`_local`."""

    def _local(self, param: DTensor) -> torch.Tensor:
        raise NotImplementedError

    def _localized(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """``(owner, name)`` of the DTensor parameters the module's forward sees as local tensors."""
        return [(module, name) for name, param in module._parameters.items() if isinstance(param, DTensor)]

    def _run_on_local_parameters(self, module: nn.Module) -> nn.Module:
        return run_on_local_parameters(module, lambda: [(owner, name, self._local)
                                                        for owner, name in self._localized(module)])


def replicate_parameters(module: nn.Module, mesh: DeviceMesh) -> None:
    """Make the module's own plain parameters replicated DTensors on ``mesh`` (those already DTensors stay)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if not isinstance(param, DTensor):
            replicated = distribute_tensor(param.detach(), mesh, [Replicate()])
            module.register_parameter(name, nn.Parameter(replicated, requires_grad=param.requires_grad))


class ReplicatedWithGradAllReduce(_LocalParameterForward):
    """Parameters become replicated DTensors; the module computes on local views whose gradients are
    declared partial, so each rank's contribution is summed across the mesh (transformers'
    ``replicated_with_grad_allreduce``). Works for any input layout, e.g. Qwen3 / Gemma3 ``q_norm``."""

    def _local(self, param: DTensor) -> torch.Tensor:
        return param.to_local(grad_placements=[Partial()])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        replicate_parameters(module, device_mesh)
        return self._run_on_local_parameters(module)


class LocalShardedParameters(_LocalParameterForward):
    """The named parameters of the module (``{name: dim}``) are sharded along ``dim`` (``Shard(dim)``
    DTensors) and the module's forward sees this rank's shard as a plain tensor, whose gradient is this
    rank's shard of the full gradient.

    For per-head parameters of an attention module whose q/k/v projections are column-wise (each rank computes
    its own heads): attention sinks, per-head gate biases. transformers spells it ``local_params`` on the
    module plus ``colwise`` on each parameter. A name may be dotted (``conv1d.weight``): a child's parameter that
    the module's own forward reads (a short convolution calling ``F.conv1d`` with its child's weight). Every sharded
    dim must divide by the TP size, so that the shards line up with the heads (:meth:`check`, before any
    collective)."""

    def __init__(self, params: Mapping[str, int]) -> None:
        super().__init__()
        if not params:
            raise PlanError(f"{type(self).__name__} needs at least one parameter name to shard.")
        self.params = dict(params)

    def _local(self, param: DTensor) -> torch.Tensor:
        return param.to_local()

    def _owner(self, module: nn.Module, name: str) -> tuple[nn.Module, str]:
        """The module holding parameter ``name`` (dotted: a descendant of ``module``) and its own name for it."""
        path, _, own = name.rpartition(".")
        try:
            owner = module.get_submodule(path)
        except AttributeError as exc:
            raise PlanError(f"{type(self).__name__}: {type(module).__name__} has no submodule {path!r} holding "
                            f"parameter {name!r}.") from exc
        if own not in owner._parameters or owner._parameters[own] is None:
            found = sorted(n for n, _ in module.named_parameters()) or "none"
            raise PlanError(f"{type(self).__name__}: {type(module).__name__} has no parameter {name!r} (it has "
                            f"{found}).")
        return owner, own

    def _localized(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        owners = (self._owner(module, name) for name in self.params)
        return [(owner, own) for owner, own in owners if isinstance(owner._parameters[own], DTensor)]

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a missing parameter, :class:`TensorParallelSizeError` for one whose dim does not
        divide by ``tp_size``."""
        for name, dim in self.params.items():
            owner, own = self._owner(module, name)
            param = owner._parameters[own]
            if isinstance(param, DTensor):
                continue
            if param.ndim == 0 or param.shape[dim] % tp_size:
                raise TensorParallelSizeError(
                    f"{type(self).__name__}: parameter {name!r} of {type(module).__name__} with shape "
                    f"{tuple(param.shape)} cannot be split in {tp_size} equal parts along dim {dim}; per-head "
                    "parameters must divide by the TP size like the heads.")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.check(module, device_mesh.size())
        for name, dim in self.params.items():
            owner, own = self._owner(module, name)
            param = owner._parameters[own]
            if not isinstance(param, DTensor):
                sharded = distribute_tensor(param.detach(), device_mesh, [Shard(dim)])
                owner.register_parameter(own, nn.Parameter(sharded, requires_grad=param.requires_grad))
        return self._run_on_local_parameters(module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class LocalHeadCount(ParallelStyle):
    """Divides the module's integer head-count attributes (``attributes``, default ``num_heads``) by the TP size:
    for a module whose forward reshapes by its own head count (``view(..., self.num_heads, -1)``) while its
    column-wise projections give it this rank's heads only. :meth:`check` refuses a count that does not divide."""

    def __init__(self, attributes: Sequence[str] = ("num_heads",)) -> None:
        super().__init__()
        self.attributes = tuple(attributes)

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a missing or non-integer attribute, :class:`TensorParallelSizeError` for one that
        does not divide by ``tp_size``."""
        for name in self.attributes:
            value = getattr(module, name, None)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"{type(self).__name__}: {type(module).__name__}.{name} = {value!r} must be an "
                                "integer head count.")
            if value % tp_size:
                raise TensorParallelSizeError(f"{type(self).__name__}: {type(module).__name__}.{name} = {value} "
                                              f"must be divisible by the TP size {tp_size}.")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.check(module, device_mesh.size())
        for name in self.attributes:
            setattr(module, name, getattr(module, name) // device_mesh.size())
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.attributes)})"


class MlaKvAProjParallel(ParallelStyle):
    """Multi-head latent attention's ``kv_a_proj_with_mqa`` (transformers' ``mla_kv_a_proj``).

    The projection stays replicated. Its output is ``[compressed kv (kv_lora_rank); rotary key
    (rope_dim)]``: the compressed part feeds the column-wise ``kv_b_proj``, whose input gradient DTensor
    already sums, but the rotary part goes straight into this rank's heads, so its gradient is partial. A
    forward hook passes the last ``rope_dim`` output features through :func:`all_reduce_backward`.
    ``rope_dim`` is the model config's ``qk_rope_head_dim`` (the Hugging Face fallback fills it in); a DTensor
    output is left alone (DTensor sums its gradients itself)."""

    def __init__(self, rope_dim: int | None = None) -> None:
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rope_dim = self.rope_dim
        if rope_dim is None or rope_dim <= 0:
            raise PlanError(f"{type(self).__name__} needs the rotary width: use MlaKvAProjParallel(rope_dim="
                            "config.qk_rope_head_dim) instead of the bare style name 'mla_kv_a_proj' in the plan.")

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor) or isinstance(output, DTensor):
                return output
            width = output.shape[-1]
            if width <= rope_dim:
                raise PlanError(f"{type(self).__name__}: {type(mod).__name__} returned {width} features, not more "
                                f"than the rotary width {rope_dim}.")
            compressed, rotary = output.split([width - rope_dim, rope_dim], dim=-1)
            return torch.cat([compressed, all_reduce_backward(rotary, device_mesh)], dim=-1)

        module.register_forward_hook(hook)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rope_dim={self.rope_dim})"


class KeepReplicated(ParallelStyle):
    """The module stays as it is on every rank (transformers' ``replicate``); listed in the plan report."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --- inputs ------------------------------------------------------------------------------------------
def redistributed(value: torch.Tensor, mesh: DeviceMesh, layouts: tuple[Placement, ...],
                  desired: tuple[Placement, ...], local: bool) -> torch.Tensor:
    """``value`` (a plain tensor is taken to be in ``layouts``) redistributed to ``desired``; its local tensor if
    ``local``."""
    if not isinstance(value, DTensor):
        value = DTensor.from_local(value, mesh, layouts, run_check=False)
    if value.placements != desired:
        value = value.redistribute(placements=desired)
    return value.to_local() if local else value


class PrepareHiddenStates(ParallelStyle):
    """Redistribute the hidden-states input (positional argument ``position``, else keyword ``argument``) from
    ``input_layout`` to ``desired_layout``; a plain tensor input is taken to be in ``input_layout``, a non-tensor
    (``None``) is passed on as is. Another input works the same way: name it and give its position."""

    def __init__(self, input_layout: Placement, desired_layout: Placement, *, argument: str = "hidden_states",
                 position: int = 0, use_local_output: bool = False) -> None:
        super().__init__()
        self.input_layouts = (input_layout,)
        self.desired_input_layouts = (desired_layout,)
        self.argument = argument
        self.position = position
        self.use_local_output = use_local_output

    def _convert(self, value: Any, mesh: DeviceMesh) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return redistributed(value, mesh, self.input_layouts, self.desired_input_layouts, self.use_local_output)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def prepare(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            index = self.position
            if len(args) > index:
                return (*args[:index], self._convert(args[index], device_mesh), *args[index + 1:]), kwargs
            if self.argument in kwargs:
                return args, {**kwargs, self.argument: self._convert(kwargs[self.argument], device_mesh)}
            raise PlanError(f"{type(mod).__name__} was called without positional input {index} or "
                            f"{self.argument}=...; {type(self).__name__} cannot find its {self.argument}.")

        # first of the module's pre-hooks: ``input_layout`` is the input as the caller passes it, before any other
        # style on the module (a mixer's, which takes the gathered sequence) prepares it
        module.register_forward_pre_hook(prepare, with_kwargs=True, prepend=True)
        return module

    def __repr__(self) -> str:
        where = "" if (self.argument, self.position) == ("hidden_states", 0) else \
            f"{self.argument} (position {self.position}), "
        return (f"{type(self).__name__}({where}{self.input_layouts[0]} -> {self.desired_input_layouts[0]}, "
                f"use_local_output={self.use_local_output})")


class PrepareHiddenStatesOutput(ParallelStyle):
    """Redistribute a module's output (the tensor, or the first element of a tuple) from ``output_layout`` to
    ``desired_layout``; a plain tensor output is taken to be in ``output_layout``."""

    def __init__(self, output_layout: Placement, desired_layout: Placement, *, use_local_output: bool = False
                 ) -> None:
        super().__init__()
        self.output_layouts = (output_layout,)
        self.desired_output_layouts = (desired_layout,)
        self.use_local_output = use_local_output

    def _convert(self, value: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return redistributed(value, mesh, self.output_layouts, self.desired_output_layouts, self.use_local_output)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def prepare(mod: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return self._convert(output, device_mesh)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (self._convert(output[0], device_mesh), *output[1:])
            raise PlanError(f"{type(mod).__name__} returned {type(output).__name__}, not a tensor or a tuple "
                            f"starting with one; {type(self).__name__} cannot find its hidden states.")

        module.register_forward_hook(prepare)
        return module

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.output_layouts[0]} -> {self.desired_output_layouts[0]}, "
                f"use_local_output={self.use_local_output})")


class OwnedOutput(ParallelStyle):
    """The module returns a copy of its tensor output: a row-wise projection's output is a view made inside a
    custom autograd function (``to_local``), which a caller may not update in place (Llama 4's MoE does
    ``shared_out.add_(routed_out)``, as transformers' own TP allows)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def copy(mod: nn.Module, args: tuple, output: Any) -> Any:
            return output.clone() if isinstance(output, torch.Tensor) else output

        module.register_forward_hook(copy)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ChainedStyles(ParallelStyle):
    """Apply several styles to the same module, in order."""

    def __init__(self, *styles: ParallelStyle) -> None:
        super().__init__()
        self.styles = tuple(styles)

    def check(self, module: nn.Module, tp_size: int) -> None:
        """Each part's own ``check`` (before any collective), where it has one."""
        for style in self.styles:
            check = getattr(style, "check", None)
            if callable(check):
                check(module, tp_size)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.styles))})"


def shards_parameters(style: ParallelStyle) -> bool:
    """Whether ``style`` shards the parameters of the module it is applied to (Linear/Embedding styles), or of
    the module and its descendants (a style with a ``placements(module)`` method, e.g. the mixer styles of
    :mod:`meshplan.tensor_parallel.mixers`)."""
    if isinstance(style, ChainedStyles):
        return any(shards_parameters(s) for s in style.styles)
    return isinstance(style, (ColwiseParallel, RowwiseParallel)) or callable(getattr(style, "placements", None))


def supported_modules(style: ParallelStyle) -> tuple[type[nn.Module], ...] | None:
    """The module types ``style`` can shard, or ``None`` when it does not say (any module).

    torch's ``ColwiseParallel`` / ``RowwiseParallel`` (and subclasses that keep their ``_apply``) shard
    ``nn.Linear`` and ``nn.Embedding`` only; the packed styles only ``nn.Linear``.
    """
    if isinstance(style, _Packed):
        return (nn.Linear,)
    if isinstance(style, VocabParallelEmbedding):
        return (nn.Embedding,)
    for torch_style in (ColwiseParallel, RowwiseParallel):
        if isinstance(style, torch_style) and type(style)._apply is torch_style._apply:
            return (nn.Linear, nn.Embedding)
    return None


def check_module_type(style: ParallelStyle, module: nn.Module, fqn: str) -> None:
    """Raise :class:`StyleModuleTypeError` naming ``fqn`` when ``style`` (or a chained part) cannot shard it."""
    parts = style.styles if isinstance(style, ChainedStyles) else (style,)
    for part in parts:
        supported = supported_modules(part)
        if supported is not None and not isinstance(module, supported):
            kinds = " or ".join(f"nn.{t.__name__}" for t in supported)
            raise StyleModuleTypeError(
                f"{type(part).__name__} cannot shard module {fqn!r} of type {type(module).__qualname__}: it "
                f"handles {kinds} (and their subclasses) only. Leave {fqn!r} out of the plan, convert the "
                "module to nn.Linear, or register a style for its type with meshplan.register_style(...).")


def predicted_placement(style: ParallelStyle | None, module: nn.Module, param_name: str) -> str | None:
    """The TP placement ``style`` will give ``module``'s parameter ``param_name``, as text.

    ``"unsharded"`` when the style leaves it alone (or there is no style); ``None`` when it cannot be known
    without applying the style. Used to refuse tied parameters that would be split differently.
    """
    from .kv_replication import ReplicatedKeyValueAttention, ReplicatedKeyValueProjection  # it imports this module

    if style is None or isinstance(style, (KeepReplicated, PrepareHiddenStates, PrepareHiddenStatesOutput, OwnedOutput,
                                           MlaKvAProjParallel, LocalHeadCount, ReplicatedKeyValueAttention)):
        return "unsharded"
    if isinstance(style, LocalShardedParameters):
        return str(Shard(style.params[param_name])) if param_name in style.params else "unsharded"
    if isinstance(style, ChainedStyles):
        known = [predicted_placement(s, module, param_name) for s in style.styles]
        changed = [p for p in known if p != "unsharded"]
        return None if None in known or len(changed) > 1 else (changed[0] if changed else "unsharded")
    packed = "packed " if isinstance(style, _Packed) else ""
    if isinstance(style, (ColwiseParallel, RowwiseParallel)):
        colwise = isinstance(style, ColwiseParallel)
        if isinstance(module, nn.Embedding):
            return str(Shard(1) if colwise else Shard(0))
        if param_name == "bias" and not colwise:
            return str(Replicate())
        return packed + str(Shard(0) if colwise else Shard(1))
    if isinstance(style, (ReplicatedWithGradAllReduce, SequenceParallel, ReplicatedKeyValueProjection)):
        return str(Replicate())
    if callable(getattr(style, "placements", None)):  # {parameter name relative to the module: placement}
        try:
            return style.placements(module).get(param_name, "unsharded")
        except PlanError:  # the style does not fit the module: validation reports it
            return None
    return None
