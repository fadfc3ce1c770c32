"""Fused expert modules: how their parameters are laid out and split by tensor parallelism.

A *fused experts module* holds every expert of one MoE layer in parameters ``[num_experts, ...]`` and is called
as ``experts(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``; they are found
by :func:`meshplan.introspection.experts.find_expert_modules`.

Layouts in transformers 5.24 (``integrations/moe.py`` and the model files; ``E`` experts, ``H`` hidden, ``I``
expert intermediate size):

=========================  ==========================  ==========================
parameter                  default (``F.linear``)      ``is_transposed=True``
=========================  ==========================  ==========================
``gate_up_proj``           ``[E, 2*I, H]``             ``[E, H, 2*I]``
``up_proj`` (no gate)      ``[E, I, H]``               ``[E, H, I]``
``down_proj``              ``[E, H, I]``               ``[E, I, H]``
``gate_up_proj_bias``      ``[E, 2*I]``                ``[E, 2*I]``
``down_proj_bias``         ``[E, H]``                  ``[E, H]``
=========================  ==========================  ==========================

``gate_up_proj`` is ``[gate; up]`` (``is_concatenated=True``, the default: ``chunk(2, dim=-1)`` of its output)
or interleaved ``gate0, up0, gate1, up1, ...`` (``is_concatenated=False``, GPT-OSS). That packing belongs to the
module's forward, not to a plan: a plan's ``colwise`` on a concatenated ``gate_up_proj`` (Inkling's) still has to
split it in two packed parts, or one rank would keep every gate and the other every up projection.

Tensor parallelism splits every expert along ``I`` (:class:`ExpertParamLayout`); this module only describes
the layout and imports no DTensor, so dry runs and reports can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..core.errors import PlanError, TensorParallelSizeError

#: Own parameters of an experts module whose layout :func:`infer_param_layouts` knows.
KNOWN_PARAMETERS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj",
                    "gate_up_proj_bias", "up_proj_bias", "gate_proj_bias", "down_proj_bias")
#: Parameters holding a gate and an up projection side by side, packed as the module's forward reads them.
GATE_UP_PARAMETERS = ("gate_up_proj", "gate_up_proj_bias")


@dataclass(frozen=True)
class ExpertParamLayout:
    """How one parameter of an experts module is split by tensor parallelism.

    ``dim``: the expert-intermediate dim it is sharded on, each rank keeping an equal slice of each of its
    ``parts`` packed parts (``[gate; up]`` has 2). ``dim=None``: the parameter is added once to every expert's
    output (``down_proj_bias``); it stays replicated and each rank adds ``1 / tp`` of it to its partial sum.
    """

    dim: int | None
    parts: int = 1

    def __post_init__(self) -> None:
        if self.parts < 1 or (self.dim is None and self.parts != 1):
            raise PlanError(f"ExpertParamLayout(dim={self.dim}, parts={self.parts}): parts must be >= 1, "
                            "and 1 for a replicated (dim=None) parameter.")


SUMMAND = ExpertParamLayout(None)


def _hidden_size(module: nn.Module) -> int | None:
    for owner, attribute in ((module, "hidden_dim"), (module, "hidden_size"),
                             (getattr(module, "config", None), "hidden_size")):
        value = getattr(owner, attribute, None)
        if isinstance(value, int):
            return value
    return None


def is_transposed(module: nn.Module) -> bool:
    """Whether the module's weights are ``[E, in, out]``: its ``is_transposed`` flag, else read off ``down_proj``
    (``[E, I, H]``) against the hidden size."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    down, hidden = getattr(module, "down_proj", None), _hidden_size(module)
    if isinstance(down, nn.Parameter) and down.ndim == 3 and hidden is not None:
        return down.shape[2] == hidden and down.shape[1] != hidden
    return False


def gate_up_parts(module: nn.Module) -> int:
    """Packed parts of the module's gate/up parameters: 2 for ``[gate; up]`` (``is_concatenated``, transformers'
    default, whose forward splits the output with ``chunk(2)``), 1 for interleaved ``gate0, up0, ...``."""
    return 2 if getattr(module, "is_concatenated", True) else 1


#: transformers' style of a 3-D expert parameter -> (its sharded dim counted from the end, packed parts): ``colwise``
#: shards the output features (``ndim - 2``), ``rowwise`` the input features (``ndim - 1``), as for a Linear weight.
HF_PARAMETER_STYLES = {"colwise": (2, 1), "packed_colwise": (2, 2), "rowwise": (1, 1), "packed_rowwise": (1, 2)}


def _known_layouts(module: nn.Module) -> dict[str, ExpertParamLayout]:
    """Layouts of the parameter names in :data:`KNOWN_PARAMETERS` for this module's orientation."""
    if getattr(module, "has_post_expert_norm", False):
        raise PlanError(f"{type(module).__name__} normalizes each expert's output (has_post_expert_norm): its "
                        "experts cannot be split by tensor parallelism (a norm of partial sums is not the norm of the "
                        "sum); use expert parallelism or leave the experts replicated.")
    packed = gate_up_parts(module)
    in_dim, out_dim = (1, 2) if is_transposed(module) else (2, 1)  # weight dims of the input and output features
    return {
        "gate_up_proj": ExpertParamLayout(out_dim, packed), "up_proj": ExpertParamLayout(out_dim),
        "gate_proj": ExpertParamLayout(out_dim), "down_proj": ExpertParamLayout(in_dim),
        "gate_up_proj_bias": ExpertParamLayout(1, packed), "up_proj_bias": ExpertParamLayout(1),
        "gate_proj_bias": ExpertParamLayout(1), "down_proj_bias": SUMMAND,
    }


def infer_param_layouts(module: nn.Module, declared: Mapping[str, ExpertParamLayout] | None = None,
                        ) -> dict[str, ExpertParamLayout]:
    """The TP layout of every own parameter of an experts module: ``declared`` ones as given, the others read off
    the module (see the table in the module docstring).

    :class:`PlanError` for a parameter whose layout is neither declared nor known, for a gate/up parameter declared
    with other packed parts than the module's forward reads (:func:`gate_up_parts`: each rank must keep matching
    gate and up slices), and for a norm applied to each expert's output (``has_post_expert_norm``), which cannot
    run on partial sums.
    """
    known = _known_layouts(module)
    own = dict(module.named_parameters(recurse=False))
    missing = sorted(set(declared or {}) - own.keys())
    if missing:
        raise PlanError(f"{type(module).__name__} has no parameter {missing[0]!r} of its own to split by tensor "
                        f"parallelism (it has {sorted(own) or 'none'}).")
    layouts = {}
    for name, param in own.items():
        layout = (declared or {}).get(name) or known.get(name)
        if layout is None:
            raise PlanError(f"{type(module).__name__} has parameter {name!r} of shape {tuple(param.shape)} whose "
                            f"tensor-parallel layout is unknown (known: {', '.join(KNOWN_PARAMETERS)}); pass "
                            "ExpertsTensorParallel(params={name: ExpertParamLayout(dim, parts)}).")
        if name in GATE_UP_PARAMETERS and layout.dim is not None and layout.parts != known[name].parts:
            order = "[gate; up] (its forward splits the output with chunk(2))" if known[name].parts == 2 else \
                "interleaved gate0, up0, gate1, up1, ... (is_concatenated=False)"
            raise PlanError(f"{type(module).__name__}.{name} is {order}: split it in {known[name].parts} packed "
                            f"part(s), not {layout.parts}, so every rank keeps the gate and up slices of the same "
                            f"intermediate features (ExpertParamLayout({layout.dim}, {known[name].parts})).")
        layouts[name] = layout
    return layouts


def _hf_declared(module: nn.Module, entries: Mapping[str, str]) -> dict[str, tuple[ExpertParamLayout, str | None]]:
    """``{parameter: (layout, correction)}`` for the module's 3-D parameters named by a transformers plan's
    parameter entries: the style gives the sharded dim; a gate/up parameter keeps the module's packed parts
    (:func:`gate_up_parts`), and ``correction`` says so when the style's parts differ (else ``None``)."""
    own = dict(module.named_parameters(recurse=False))
    declared = {}
    for name, style in entries.items():
        if style not in HF_PARAMETER_STYLES:
            raise PlanError(f"{type(module).__name__}.{name}: style {style!r} does not split an expert parameter "
                            f"(expected one of {sorted(HF_PARAMETER_STYLES)}).")
        param = own.get(name)
        if param is None or param.ndim < 3:
            continue
        from_end, parts = HF_PARAMETER_STYLES[style]
        correction = None
        if name in GATE_UP_PARAMETERS and parts != gate_up_parts(module):
            parts, packing = gate_up_parts(module), "[gate; up]" if gate_up_parts(module) == 2 else "interleaved"
            correction = (f"{style!r} split as {parts} packed part(s): {type(module).__name__}.{name} is {packing} "
                          "in its forward")
        declared[name] = (ExpertParamLayout(param.ndim - from_end, parts), correction)
    return declared


def layouts_from_hf(module: nn.Module, entries: Mapping[str, str]) -> dict[str, ExpertParamLayout]:
    """Layouts from a transformers plan's parameter entries (``{"gate_up_proj": "packed_colwise", ...}``) for the
    module's 3-D parameters, gate/up ones packed as the module's forward reads them whatever the style says
    (see :func:`hf_layout_corrections`), the others as :func:`infer_param_layouts` reads them;
    :class:`PlanError` for a style that does not split an expert parameter."""
    return infer_param_layouts(module, {name: layout for name, (layout, _) in _hf_declared(module, entries).items()})


def hf_layout_corrections(module: nn.Module, entries: Mapping[str, str]) -> dict[str, str]:
    """``{parameter: why}`` for the entries :func:`layouts_from_hf` does not take at their word: a ``colwise`` on
    a concatenated ``gate_up_proj`` (Inkling's plans) is split in two packed parts, as its forward reads it."""
    return {name: why for name, (_, why) in _hf_declared(module, entries).items() if why is not None}


def check_param_layouts(module: nn.Module, layouts: Mapping[str, ExpertParamLayout], tp_size: int) -> None:
    """Every named parameter exists and each of its packed parts divides by ``tp_size``; typed errors naming the
    parameter, run before any collective."""
    kind = type(module).__name__
    own = dict(module.named_parameters(recurse=False))
    for name, layout in layouts.items():
        param = own.get(name)
        if param is None:
            raise PlanError(f"{kind} has no parameter {name!r} of its own to split by tensor parallelism "
                            f"(it has {sorted(own) or 'none'}).")
        if layout.dim is None:
            continue
        if not -param.ndim <= layout.dim < param.ndim:
            raise PlanError(f"{kind}.{name} of shape {tuple(param.shape)} has no dim {layout.dim}.")
        size = param.shape[layout.dim]
        if size % layout.parts:
            raise PlanError(f"{kind}.{name} of shape {tuple(param.shape)}: dim {layout.dim} ({size}) cannot hold "
                            f"{layout.parts} equal packed parts.")
        part = size // layout.parts
        if part % tp_size:
            divisors = [d for d in range(1, part + 1) if part % d == 0]
            raise TensorParallelSizeError(
                f"{kind}.{name} of shape {tuple(param.shape)}: its expert intermediate size ({part}"
                f"{' per packed part' if layout.parts > 1 else ''}, dim {layout.dim}) must be divisible by the TP "
                f"size ({tp_size}) so every rank keeps an equal slice of every expert; TP sizes that divide it: "
                f"{divisors}. Use one of them, or expert parallelism for the experts.")
