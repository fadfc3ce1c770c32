"""Tensor parallelism for the sequence mixers of hybrid models: Mamba2, Mamba1 and LFM2 short convolutions.

Each mixer family gets one module-level style that splits the mixer along its channels (heads, groups) and lets
its own forward — transformers' torch path or a fused kernel — compute on this rank's part:

* :class:`Mamba2MixerParallel` (``mamba2_mixer``; Bamba, GraniteMoeHybrid, Nemotron-H): ``in_proj`` packs
  ``[z, x, B, C, dt]`` (``z`` / ``x`` / ``dt`` split by head, ``B`` / ``C`` by group), the depthwise ``conv1d``
  over ``[x, B, C]`` by the same channels, ``dt_bias`` / ``A_log`` / ``D`` by head, the gated group RMSNorm's
  weight by group, ``out_proj`` row-wise. The module's ``num_heads``, ``n_groups``, ``intermediate_size`` and
  ``conv_dim`` become this rank's values. Needs the heads *and* the groups to divide by the TP size: a group's
  ``B`` / ``C`` serve all its heads and its norm spans all of its channels.
* :class:`MambaMixerParallel` (``mamba_mixer``; Jamba's Mamba1 mixer): ``in_proj`` packs ``[x; z]``, ``conv1d``,
  ``dt_proj`` (column-wise), ``A_log`` and ``D`` by channel; ``x_proj`` is row-wise and its output ``[dt, B, C]``
  is summed over TP in forward (and its gradient in backward, since every rank's channels read it); the
  ``dt`` / ``B`` / ``C`` norms after it stay replicated with their gradients summed; ``out_proj`` row-wise.
* :class:`ShortConvParallel` (``short_conv_mixer``; LFM2 / LFM2-MoE ``ShortConv``): ``in_proj`` packs
  ``[B; C; x]``, the depthwise ``conv`` by channel, ``out_proj`` row-wise.

Every style is self-contained, so it is correct whatever the rest of the plan does: the mixer's hidden-states
input is used replicated (its gradient summed over TP in backward), its output is this rank's partial sum,
all-reduced once; a row-wise bias stays replicated and each rank adds ``1 / tp`` of it. Packed parameters are
stored rank-major like :class:`~meshplan.tensor_parallel.styles.packed.PackedColwiseParallel` (a gathered full
tensor goes through :func:`~meshplan.state.packing.unpack_full_state_dict`).

A mixer is recognized by structure (:func:`mixer_style_name`: its kind,
:func:`~meshplan.introspection.mixers.mixer_kind`, then its family's split): exactly the parameters and children
named above, with widths that agree with the attributes its forward reads, and no buffers. What does not divide by
the TP size is refused with :class:`~meshplan.core.errors.TensorParallelSizeError` before any collective
(:meth:`MixerParallel.check`), or, with ``replicate_if_indivisible=True`` (the Hugging Face fallback), left whole
with a warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial

from ..core.errors import PlanError, TensorParallelSizeError
from ..introspection.mixers import mixer_kind
from .styles.gradients import all_reduce_backward, all_reduce_forward, replicated_local_input
from .styles.local_parameters import LocalizedParameters, run_on_local_parameters
from .styles.protocol import COLUMNS, REPLICATED, ROWS, SUMMAND, ParamSplit, Placements, Style


@dataclass(frozen=True)
class MixerSplit:
    """The split of one mixer: ``params`` by name relative to the mixer (``in_proj.weight``), ``attributes`` its
    forward reads (full values; each rank's module gets ``value // tp``), ``reduced``: row-wise children whose
    output is summed over TP inside the mixer, in forward and in backward."""

    params: Mapping[str, ParamSplit]
    attributes: Mapping[str, int] = field(default_factory=dict)
    reduced: tuple[str, ...] = ()

    def indivisible(self, module: nn.Module, tp_size: int) -> str | None:
        """Why ``module`` cannot be split in ``tp_size`` equal parts, or ``None`` when it can."""
        for name, value in self.attributes.items():
            if value % tp_size:
                return f"its {name} ({value}) is not divisible by the TP size ({tp_size})"
        for name, split in self.params.items():
            param = module.get_parameter(name)
            sizes = split.parts or ((param.shape[split.dim],) if split.dim is not None else ())
            if any(size % tp_size for size in sizes):
                return (f"{name} of shape {tuple(param.shape)} (parts {list(sizes)} along dim {split.dim}) is not "
                        f"divisible by the TP size ({tp_size})")
        return None


# --- structure of the mixer families -----------------------------------------------------------------
def _children(module: nn.Module) -> dict[str, nn.Module]:
    """The children of ``module`` that hold parameters."""
    return {name: child for name, child in module.named_children() if next(child.parameters(), None) is not None}


def _int_attributes(module: nn.Module, names: tuple[str, ...]) -> dict[str, int]:
    values = {name: getattr(module, name, None) for name in names}
    missing = [n for n, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if missing:
        raise PlanError(f"{type(module).__name__} has no positive integer {', '.join(missing)}.")
    return values


def _require(condition: bool, module: nn.Module, family: str, what: str) -> None:
    if not condition:
        raise PlanError(f"{type(module).__name__} is not a {family} mixer this style can split: {what}.")


def _depthwise(conv: nn.Module, channels: int) -> bool:
    return (type(conv) is nn.Conv1d and conv.in_channels == conv.out_channels == conv.groups == channels
            and conv.weight.shape[1] == 1)


def _linear(module: nn.Module, in_features: int, out_features: int) -> bool:
    return type(module) is nn.Linear and (module.in_features, module.out_features) == (in_features, out_features)


def _weight_only(module: nn.Module, size: int) -> bool:
    params = dict(module.named_parameters())
    return params.keys() == {"weight"} and tuple(params["weight"].shape) == (size,)


def _common(module: nn.Module, family: str, own: set[str], children: set[str]) -> dict[str, nn.Module]:
    """Checks shared by every family: exactly the ``own`` parameters and parameterized ``children``, no buffers."""
    found = _children(module)
    _require(set(dict(module.named_parameters(recurse=False))) == own, module, family,
             f"its own parameters are not exactly {sorted(own)}")
    _require(found.keys() == children, module, family, f"its parameterized children are not exactly {sorted(children)}")
    _require(next(module.buffers(), None) is None, module, family, "it holds buffers")
    return found


def _with_bias(split: ParamSplit, bias: ParamSplit, module: nn.Module, name: str) -> dict[str, ParamSplit]:
    """``{name.weight: split}`` and ``{name.bias: bias}`` when the child ``name`` has a bias."""
    found = {f"{name}.weight": split}
    if getattr(module.get_submodule(name), "bias", None) is not None:
        found[f"{name}.bias"] = bias
    return found


def mamba2_split(module: nn.Module) -> MixerSplit:
    """The split of a Mamba2 mixer (see the module docstring); :class:`PlanError` saying what does not fit."""
    family = "Mamba2"
    children = _common(module, family, {"dt_bias", "A_log", "D"}, {"in_proj", "conv1d", "norm", "out_proj"})
    sizes = _int_attributes(module, ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size",
                                     "conv_dim"))
    heads, groups, inner, conv_dim = (sizes[n] for n in ("num_heads", "n_groups", "intermediate_size", "conv_dim"))
    state = groups * sizes["ssm_state_size"]
    in_proj, conv1d, norm, out_proj = (children[n] for n in ("in_proj", "conv1d", "norm", "out_proj"))
    _require(inner == heads * sizes["head_dim"] and conv_dim == inner + 2 * state and heads % groups == 0, module,
             family, "intermediate_size, conv_dim, num_heads x head_dim and n_groups disagree")
    _require(_linear(in_proj, in_proj.in_features, inner + conv_dim + heads) and _depthwise(conv1d, conv_dim)
             and _linear(out_proj, inner, out_proj.out_features), module, family,
             "in_proj, conv1d or out_proj have other widths than [z, x, B, C, dt], [x, B, C] and intermediate_size")
    _require(_weight_only(norm, inner) and getattr(norm, "group_size", None) == inner // groups, module, family,
             "its norm is not a gated RMSNorm over groups of intermediate_size / n_groups channels")
    _require(all(tuple(module.get_parameter(n).shape) == (heads,) for n in ("dt_bias", "A_log", "D")), module,
             family, "dt_bias, A_log and D are not one value per head")
    xbc = (inner, state, state)
    params = {**_with_bias(ParamSplit(0, (inner, *xbc, heads)), ParamSplit(0, (inner, *xbc, heads)), module,
                           "in_proj"),
              **_with_bias(ParamSplit(0, xbc), ParamSplit(0, xbc), module, "conv1d"),
              "dt_bias": COLUMNS, "A_log": COLUMNS, "D": COLUMNS, "norm.weight": COLUMNS,
              **_with_bias(ROWS, SUMMAND, module, "out_proj")}
    return MixerSplit(params, {n: sizes[n] for n in ("num_heads", "n_groups", "intermediate_size", "conv_dim")})


#: The optional norms of a Mamba1 mixer on the ``dt`` / ``B`` / ``C`` slices of ``x_proj``'s output (Jamba).
MAMBA_NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")


def mamba_split(module: nn.Module) -> MixerSplit:
    """The split of a Mamba1 mixer (see the module docstring); :class:`PlanError` saying what does not fit."""
    family = "Mamba1"
    linears = {"in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"}
    norms = tuple(n for n in MAMBA_NORMS if n in _children(module))
    children = _common(module, family, {"A_log", "D"}, {*linears, *norms})
    sizes = _int_attributes(module, ("intermediate_size", "time_step_rank", "ssm_state_size"))
    inner, rank, state = sizes["intermediate_size"], sizes["time_step_rank"], sizes["ssm_state_size"]
    in_proj, conv1d, x_proj, dt_proj, out_proj = (children[n] for n in ("in_proj", "conv1d", "x_proj", "dt_proj",
                                                                        "out_proj"))
    _require(_linear(in_proj, in_proj.in_features, 2 * inner) and _depthwise(conv1d, inner)
             and _linear(x_proj, inner, rank + 2 * state) and _linear(dt_proj, rank, inner)
             and _linear(out_proj, inner, out_proj.out_features), module, family,
             "in_proj, conv1d, x_proj, dt_proj or out_proj have other widths than intermediate_size, time_step_rank "
             "and ssm_state_size give")
    _require(tuple(module.A_log.shape) == (inner, state) and tuple(module.D.shape) == (inner,), module, family,
             "A_log and D are not per channel")
    _require(len(norms) in (0, len(MAMBA_NORMS)) and all(
        _weight_only(children[n], width) for n, width in zip(norms, (rank, state, state))), module, family,
        f"its norms are not {', '.join(MAMBA_NORMS)} over the dt, B and C widths")
    params = {**_with_bias(ParamSplit(0, (inner, inner)), ParamSplit(0, (inner, inner)), module, "in_proj"),
              **_with_bias(COLUMNS, COLUMNS, module, "conv1d"), **_with_bias(ROWS, SUMMAND, module, "x_proj"),
              **_with_bias(COLUMNS, COLUMNS, module, "dt_proj"), "A_log": COLUMNS, "D": COLUMNS,
              **{f"{n}.weight": REPLICATED for n in norms}, **_with_bias(ROWS, SUMMAND, module, "out_proj")}
    return MixerSplit(params, {"intermediate_size": inner}, reduced=("x_proj",))


def short_conv_split(module: nn.Module) -> MixerSplit:
    """The split of an LFM2 short convolution (see the module docstring); :class:`PlanError` saying what does not
    fit."""
    family = "short-convolution"
    children = _common(module, family, set(), {"in_proj", "conv", "out_proj"})
    in_proj, conv, out_proj = (children[n] for n in ("in_proj", "conv", "out_proj"))
    channels = getattr(conv, "in_channels", 0)
    _require(_depthwise(conv, channels) and _linear(in_proj, in_proj.in_features, 3 * channels)
             and _linear(out_proj, channels, out_proj.out_features), module, family,
             "in_proj does not produce [B; C; x] for a depthwise conv whose channels out_proj reads")
    packed = ParamSplit(0, (channels,) * 3)
    return MixerSplit({**_with_bias(packed, packed, module, "in_proj"), **_with_bias(COLUMNS, COLUMNS, module, "conv"),
                       **_with_bias(ROWS, SUMMAND, module, "out_proj")})


# --- the styles ----------------------------------------------------------------------------------------
def _local(param: DTensor, split: ParamSplit) -> torch.Tensor:
    """This rank's tensor of a mixer parameter for its forward; gradients reach ``param`` through it."""
    if split.dim is not None:
        return param.to_local()
    local = param.to_local(grad_placements=[Partial()])
    return local / param.device_mesh.size() if split.summand else local


class MixerParallel(Style):
    """Shared part of the mixer styles: a subclass names its family's :attr:`split` function.

    ``replicate_if_indivisible``: a mixer whose sizes do not divide by the TP size is taken out of the plan when it
    is fitted to the TP size (:meth:`whole_reason`; one warning per reason) instead of being refused with
    :class:`TensorParallelSizeError`.
    """

    shards_parameters = True
    #: ``module -> MixerSplit`` (PlanError when the module is not of the family)
    split: Callable[[nn.Module], MixerSplit]

    def __init__(self, *, replicate_if_indivisible: bool = False) -> None:
        super().__init__()
        self.replicate_if_indivisible = replicate_if_indivisible

    def __repr__(self) -> str:
        return f"{type(self).__name__}(replicate_if_indivisible={self.replicate_if_indivisible})"

    def placements(self, module: nn.Module) -> Placements | None:
        """The split of each parameter of ``module`` (names relative to it)."""
        return dict(self.split(module).params)

    def whole_reason(self, module: nn.Module, tp_size: int) -> str | None:
        """Why ``module`` stays whole at ``tp_size`` (``replicate_if_indivisible`` only; the plan is then fitted
        without it, :func:`~meshplan.tensor_parallel.validation.fit_to_tp_size`), else ``None``."""
        return self.split(module).indivisible(module, tp_size) if self.replicate_if_indivisible else None

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`TensorParallelSizeError` for a module this style cannot split in ``tp_size`` (no collective;
        the same on every rank)."""
        self._refuse_indivisible(module, self.split(module), tp_size)

    def _refuse_indivisible(self, module: nn.Module, split: MixerSplit, tp_size: int) -> None:
        why = split.indivisible(module, tp_size)
        if why is not None:
            raise TensorParallelSizeError(
                f"{type(self).__name__} cannot split {type(module).__name__}: {why}. Use a TP size that divides it, "
                "or leave the mixer out of the TP plan (it then stays replicated).")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp_size = device_mesh.size()
        split = self.split(module)
        self.distribute_parameters(module, device_mesh)
        for name, value in split.attributes.items():
            setattr(module, name, value // tp_size)
        for name in split.reduced:
            module.get_submodule(name).register_forward_hook(
                lambda mod, args, out: all_reduce_backward(all_reduce_forward(out, device_mesh), device_mesh))
        module.register_forward_pre_hook(functools.partial(_prepare_input, mesh=device_mesh), with_kwargs=True)
        module.register_forward_hook(functools.partial(_reduce_output, mesh=device_mesh))
        return _run_on_local_parameters(module, split)


class Mamba2MixerParallel(MixerParallel):
    """A Mamba2 mixer split by heads and groups (``mamba2_mixer``; see the module docstring)."""

    split = staticmethod(mamba2_split)


class MambaMixerParallel(MixerParallel):
    """A Mamba1 mixer split by channels (``mamba_mixer``; see the module docstring)."""

    split = staticmethod(mamba_split)


class ShortConvParallel(MixerParallel):
    """An LFM2 short convolution split by channels (``short_conv_mixer``; see the module docstring)."""

    split = staticmethod(short_conv_split)


#: Vocabulary name -> style of each mixer family, in the order :func:`mixer_style_name` tries them.
MIXER_STYLES: dict[str, type[MixerParallel]] = {"mamba2_mixer": Mamba2MixerParallel,
                                                 "mamba_mixer": MambaMixerParallel,
                                                 "short_conv_mixer": ShortConvParallel}


#: The style (vocabulary name) of each mixer kind :func:`~meshplan.introspection.mixers.mixer_kind` finds.
STYLE_OF_KIND = {"mamba2": "mamba2_mixer", "mamba": "mamba_mixer", "short_conv": "short_conv_mixer"}


def mixer_style_name(module: nn.Module) -> str | None:
    """The vocabulary name of the mixer style whose family ``module`` is (its kind, and a split that fits it
    exactly), or ``None``."""
    name = STYLE_OF_KIND.get(mixer_kind(module))
    if name is None:
        return None
    try:
        MIXER_STYLES[name].split(module)
    except PlanError:
        return None
    return name


# --- applying a split ----------------------------------------------------------------------------------
def _prepare_input(module: nn.Module, args: tuple, kwargs: dict, *, mesh: DeviceMesh) -> tuple[tuple, dict]:
    """The hidden states (first positional argument or ``hidden_states=``) as a replicated local tensor whose
    gradient is summed over TP in backward."""
    if args:
        return (replicated_local_input(args[0], mesh), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": replicated_local_input(kwargs["hidden_states"], mesh)}
    raise PlanError(f"{type(module).__name__} was called without a positional input or hidden_states=...; its "
                    "TP style cannot find its hidden states.")


def _reduce_output(module: nn.Module, args: tuple, output: Any, *, mesh: DeviceMesh) -> torch.Tensor:
    """The mixer's output, this rank's partial sum, all-reduced over TP."""
    if not isinstance(output, torch.Tensor):
        raise PlanError(f"{type(module).__name__} returned {type(output).__name__}, not a tensor; its TP style "
                        "all-reduces a single output tensor.")
    return all_reduce_forward(output, mesh)


def _run_on_local_parameters(module: nn.Module, split: MixerSplit) -> nn.Module:
    """Wrap ``module.forward`` so that it (and its children) read this rank's local tensors of the split
    parameters (:func:`~meshplan.tensor_parallel.styles.local_parameters.run_on_local_parameters`)."""
    def localized() -> LocalizedParameters:
        found = []
        for name, param_split in split.params.items():
            owner_name, _, param_name = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if isinstance(owner._parameters[param_name], DTensor):
                found.append((owner, param_name, functools.partial(_local, split=param_split)))
        return found

    return run_on_local_parameters(module, localized)
