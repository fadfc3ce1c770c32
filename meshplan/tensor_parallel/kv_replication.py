"""Tensor parallelism over more ranks than key/value heads: each KV head replicated on ``tp // kv_heads`` ranks.

With ``kv_heads < tp`` (and ``tp % kv_heads == 0``; Qwen3-235B-A22B's 4 KV heads at TP=8, a one-KV-head model at
TP=2) the column-wise ``k_proj`` / ``v_proj`` of an attention block cannot give each rank whole KV heads. As vLLM
does, TP rank ``r`` keeps its query heads ``[r*H/tp, (r+1)*H/tp)`` (column-wise ``q_proj``, unchanged), which all
share KV head ``g = r // (tp // kv_heads)``:

* :class:`ReplicatedKeyValueProjection` (``k_proj`` / ``v_proj``): the weight and bias stay whole on every rank as
  replicated DTensors (so FSDP2, state dicts, DCP and ``explain`` see ordinary replicated parameters); each rank
  computes the whole projection and keeps head ``g``. The projection output's gradient is summed over the TP ranks
  (:func:`~meshplan.tensor_parallel.styles.gradients.all_reduce_backward`) before it reaches the weight and the input,
  so their gradients are complete and identical on every rank and are not reduced again.
* :class:`ReplicatedKeyValueAttention` (the attention module): it computes with one local KV head, so its
  ``num_key_value_groups`` (what transformers' eager / sdpa attention repeat the KV heads by) becomes this rank's
  query-head count, and a KV head count it stores becomes 1.
* :func:`replicate_key_value_heads`: the step of :func:`~meshplan.tensor_parallel.validation.fit_to_tp_size` that
  puts them in place of the column-wise styles of every standard attention block whose KV heads do not divide by
  the TP size, and refuses (:class:`TensorParallelSizeError`) a block it cannot handle, before any collective.

Both styles need the block's head counts, so plans do not name them: the fitting step builds them.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from ..core.errors import PlanError, TensorParallelSizeError
from ..core.log import get_logger, log_rank0
from .matching import covering_keys, match_key, within
from .plan import ResolvedPlan, describe_style
from .styles.composition import ChainedStyles
from .styles.gradients import all_reduce_backward
from .styles.hidden_states import PrepareHiddenStates
from .styles.local_parameters import replicate_parameters, run_on_local_parameters
from .styles.protocol import REPLICATED, ParamSplit, Placements, Style
from .styles.traits import shards_parameters, traits_of

logger = get_logger(__name__)

#: The key and value projections of a standard attention block (children of the attention module).
KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj")
#: Integer KV-head counts an attention module may store and read in its forward (set to 1, the local count).
KEY_VALUE_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads")


class ReplicatedKeyValueProjection(Style):
    """A key or value ``nn.Linear`` of ``kv_heads`` heads of ``head_dim`` features, replicated on every TP rank;
    rank ``r`` returns the plain local tensor of head ``r // (tp // kv_heads)`` (see the module docstring). The input
    may be a DTensor (made ``Replicate``, as sequence parallel gives it) or a plain tensor in ``input_layout``
    (the layout the replaced column-wise style took it in)."""

    def __init__(self, kv_heads: int, head_dim: int, *, input_layout: Placement | None = None) -> None:
        super().__init__()
        self.kv_heads = int(kv_heads)
        self.head_dim = int(head_dim)
        self.input_layout = input_layout if input_layout is not None else Replicate()

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` for a module that is no ``nn.Linear`` of ``kv_heads * head_dim`` outputs,
        :class:`TensorParallelSizeError` for a TP size that ``kv_heads`` does not divide."""
        if not isinstance(module, nn.Linear) or module.out_features != self.kv_heads * self.head_dim:
            raise PlanError(f"{type(self).__name__}: {type(module).__name__} is no nn.Linear with "
                            f"{self.kv_heads} x {self.head_dim} output features.")
        if tp_size % self.kv_heads:
            raise TensorParallelSizeError(f"{type(self).__name__}: the TP size {tp_size} is no multiple of the "
                                          f"{self.kv_heads} key/value heads.")

    def placements(self, module: nn.Module) -> Placements | None:
        return {name: REPLICATED for name, _ in module.named_parameters(recurse=False)}

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp_size = device_mesh.size()
        replicate_parameters(module, device_mesh)
        start = device_mesh.get_local_rank() // (tp_size // self.kv_heads) * self.head_dim

        def own_head(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return all_reduce_backward(output, device_mesh).narrow(-1, start, self.head_dim).contiguous()

        PrepareHiddenStates(self.input_layout, Replicate(), argument="input", use_local_output=True).parallelize(
            module, device_mesh)
        module.register_forward_hook(own_head)
        # the local views' gradients are complete (the output gradient is summed): declared Replicate, not reduced
        return run_on_local_parameters(module, lambda: [(module, name, DTensor.to_local)
                                                        for name, param in module._parameters.items()
                                                        if isinstance(param, DTensor)])

    def __repr__(self) -> str:
        layout = "" if self.input_layout == Replicate() else f", input_layout={self.input_layout}"
        return f"{type(self).__name__}(kv_heads={self.kv_heads}, head_dim={self.head_dim}{layout})"


class ReplicatedKeyValueAttention(Style):
    """The attention module whose ``kv_heads`` key/value heads are replicated (:class:`ReplicatedKeyValueProjection`)
    computes with one local KV head: ``num_key_value_groups`` becomes the local query-head count
    ``num_key_value_groups * kv_heads // tp``, and an integer ``num_key_value_heads`` / ``num_kv_heads`` becomes 1."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.kv_heads = int(kv_heads)

    def check(self, module: nn.Module, tp_size: int) -> None:
        """:class:`PlanError` without an integer ``num_key_value_groups``, :class:`TensorParallelSizeError` for a TP
        size that is no multiple of the KV heads or does not divide the query heads."""
        groups = getattr(module, "num_key_value_groups", None)
        if not isinstance(groups, int) or isinstance(groups, bool):
            raise PlanError(f"{type(self).__name__}: {type(module).__name__}.num_key_value_groups = {groups!r} must "
                            "be an integer.")
        if tp_size % self.kv_heads or groups * self.kv_heads % tp_size:
            raise TensorParallelSizeError(
                f"{type(self).__name__}: {type(module).__name__} has {groups * self.kv_heads} query heads and "
                f"{self.kv_heads} key/value heads; the TP size {tp_size} must divide the first and be a multiple of "
                "the second.")

    def parallelize(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp_size = device_mesh.size()
        module.num_key_value_groups = module.num_key_value_groups * self.kv_heads // tp_size
        for name in KEY_VALUE_HEAD_COUNTS:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, 1)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kv_heads={self.kv_heads})"


# --- fitting a plan ---------------------------------------------------------------------------------------------
def key_value_heads(module: nn.Module) -> int | None:
    """The KV head count of an attention module: its ``k_proj`` width over its ``head_dim`` (a standard block),
    else an integer ``num_key_value_heads`` / ``num_kv_heads`` it stores; ``None`` when it says neither."""
    standard = _standard_head_dim(module)
    if standard is not None:
        return module.k_proj.out_features // standard
    counts = (getattr(module, name, None) for name in KEY_VALUE_HEAD_COUNTS)
    return next((count for count in counts if isinstance(count, int) and not isinstance(count, bool)), None)


def _standard_head_dim(module: nn.Module) -> int | None:
    """``head_dim`` of a standard attention block: an integer ``head_dim`` and ``num_key_value_groups``, ``nn.Linear``
    ``k_proj`` and ``v_proj`` of the same whole number of heads; ``None`` for any other module."""
    head_dim, groups = getattr(module, "head_dim", None), getattr(module, "num_key_value_groups", None)
    k, v = (getattr(module, name, None) for name in KEY_VALUE_PROJECTIONS)
    if not (isinstance(head_dim, int) and head_dim > 0 and isinstance(groups, int)
            and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)):
        return None
    return head_dim if k.out_features == v.out_features and k.out_features % head_dim == 0 else None


def _weight_split(style: ParallelStyle | None, linear: nn.Module | None) -> ParamSplit | None:
    """The split ``style`` declares for ``linear``'s weight (``None``: no style, no Linear, or unknown)."""
    if style is None or not isinstance(linear, nn.Linear):
        return None
    placements = traits_of(style).placements(linear)
    return None if placements is None else placements.get("weight")


def _local_colwise(style: ParallelStyle | None, linear: nn.Module | None) -> bool:
    """Whether ``style`` splits ``linear``'s output features, unpacked, into a local output whose columns are this
    rank's heads (torch's ``ColwiseParallel()``)."""
    return (_weight_split(style, linear) == ParamSplit(0) and getattr(style, "use_local_output", False)
            and tuple(getattr(style, "output_layouts", ())) == (Shard(-1),))


def _gathered_colwise(style: ParallelStyle | None, linear: nn.Module | None) -> bool:
    """Whether ``style`` splits ``linear``'s output features and gathers its output (``colwise_gather_output``)."""
    split = _weight_split(style, linear)
    return (split is not None and split.dim == 0
            and tuple(getattr(style, "output_layouts", ())) == (Replicate(),))


def _refusal(fqn: str, module: nn.Module, kv_heads: int, tp_size: int, reason: str) -> TensorParallelSizeError:
    return TensorParallelSizeError(
        f"{fqn} ({type(module).__name__}) has {kv_heads} key/value head(s), fewer than the TP size {tp_size} and not "
        f"divisible by it, so they must be replicated, but {reason}. Use a TP size that divides {kv_heads}, or a plan "
        "that leaves this attention whole.")


def _kv_plan(fqn: str, module: nn.Module, tp_size: int, style_of: dict[str, ParallelStyle]
             ) -> tuple[int, int] | None:
    """``(kv_heads, head_dim)`` when the split attention block ``fqn`` needs replicated KV heads, ``None`` when it
    does not (heads divide by the TP size, or the plan gathers its keys and values); raises when it cannot have
    them."""
    kv_heads = key_value_heads(module)
    if kv_heads is None:
        raise TensorParallelSizeError(
            f"{fqn} ({type(module).__name__}) is split by the plan, the model's config has fewer key/value heads than "
            f"the TP size {tp_size}, and meshplan cannot tell this module's KV head count (no nn.Linear k_proj / "
            "v_proj of head_dim features, no integer num_key_value_heads), so it cannot replicate them. Use a TP size "
            "that divides the KV heads, or a plan that leaves this attention whole.")
    if kv_heads % tp_size == 0:
        return None
    if tp_size % kv_heads:
        raise _refusal(fqn, module, kv_heads, tp_size, f"the TP size is no multiple of {kv_heads}")
    head_dim = _standard_head_dim(module)
    if head_dim is None:
        raise _refusal(fqn, module, kv_heads, tp_size, "meshplan replicates KV heads only for separate nn.Linear "
                       "k_proj / v_proj of whole heads in a module with head_dim and num_key_value_groups (a fused "
                       "qkv projection cannot keep whole KV heads on each rank)")
    styles = {name: style_of.get(f"{fqn}.{name}") for name in KEY_VALUE_PROJECTIONS}
    if all(isinstance(style, ReplicatedKeyValueProjection) for style in styles.values()):
        return None  # a plan fitted before (``prepared.plan.styles`` passed back as ``tp_plan``)
    if all(_gathered_colwise(style, getattr(module, name)) for name, style in styles.items()):
        if _local_colwise(style_of.get(f"{fqn}.q_proj"), getattr(module, "q_proj", None)):
            raise _refusal(fqn, module, kv_heads, tp_size, "its k_proj / v_proj outputs are gathered while q_proj is "
                           "split, so every rank would repeat all key/value heads against its local query heads")
        return None  # every rank sees every KV head
    for name, style in styles.items():
        if not _local_colwise(style, getattr(module, name)):
            shown = "no style" if style is None else f"style {describe_style(style)}"
            raise _refusal(fqn, module, kv_heads, tp_size, f"its {name} has {shown}, not the column-wise split "
                           "(ColwiseParallel with local output) whose place the replicated projection takes")
    width = kv_heads * head_dim
    for name, child in module.named_children():
        if kv_heads > 1 and not isinstance(child, nn.Linear) and any(width in p.shape for p in child.parameters()):
            raise _refusal(fqn, module, kv_heads, tp_size, f"its {name} has parameters as wide as all {kv_heads} "
                           "key/value heads together (a norm over the whole projection needs every head)")
    return kv_heads, head_dim


def replicate_key_value_heads(model: nn.Module, plan: ResolvedPlan, tp_size: int, attention: dict[str, nn.Module],
                              kv_heads: set[int]) -> ResolvedPlan:
    """``plan`` with replicated KV heads in every attention module of ``attention`` (``{fqn: module}`` in
    ``model``) that the plan splits and whose KV heads do not divide by ``tp_size``: its ``k_proj`` / ``v_proj``
    styles replaced by :class:`ReplicatedKeyValueProjection`, :class:`ReplicatedKeyValueAttention` added to the
    module (chained after a style the plan gives it). Logged at INFO on rank 0. ``plan`` itself when nothing
    changes, and at once when every count of the model config's ``kv_heads`` divides by ``tp_size``."""
    if all(count % tp_size == 0 for count in kv_heads):
        return plan
    style_of = {fqn: plan.styles[key] for key, found in plan.matches.items() for fqn in found}
    split = [fqn for key, found in plan.matches.items() if shards_parameters(plan.styles[key]) for fqn in found]
    changed: dict[str, ParallelStyle] = {}
    added: dict[str, ReplicatedKeyValueAttention] = {}
    for fqn, module in attention.items():
        if not any(within(name, {fqn}) and name != fqn for name in split):
            continue
        heads = _kv_plan(fqn, module, tp_size, style_of)
        if heads is None:
            continue
        added[fqn] = ReplicatedKeyValueAttention(heads[0])
        changed[fqn] = ChainedStyles(style_of[fqn], added[fqn]) if fqn in style_of else added[fqn]
        for name in KEY_VALUE_PROJECTIONS:
            input_layout = style_of[f"{fqn}.{name}"].input_layouts[0]
            changed[f"{fqn}.{name}"] = ReplicatedKeyValueProjection(*heads, input_layout=input_layout)
    if not added:
        return plan
    counts = sorted({style.kv_heads for style in added.values()})
    names = list(added)
    log_rank0(logger, logging.INFO, "TP=%d exceeds the %s key/value head(s) of %d attention module(s) (%s): k_proj / "
              "v_proj replicated on every rank, rank r keeps KV head r // (TP / KV heads) (%s).", tp_size,
              "/".join(map(str, counts)), len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""),
              ReplicatedKeyValueProjection.__name__)
    groups: list[tuple[ParallelStyle, list[str]]] = []  # (style, modules): one or more plan keys each
    for key, style in plan.styles.items():
        by_style: dict[str, tuple[ParallelStyle, list[str]]] = {}
        for fqn in plan.matches.get(key, ()):
            new = changed.get(fqn, style)
            by_style.setdefault(describe_style(new), (new, []))[1].append(fqn)
        groups.extend(by_style.values())
    unplanned: dict[str, tuple[ParallelStyle, list[str]]] = {}
    for fqn in (fqn for fqn in added if fqn not in style_of):
        unplanned.setdefault(describe_style(changed[fqn]), (changed[fqn], []))[1].append(fqn)
    groups.extend(unplanned.values())
    styles: dict[str, ParallelStyle] = {}
    matches: dict[str, list[str]] = {}
    for style, fqns in groups:  # keys that select exactly their modules, so the plan can be passed back as tp_plan
        for key in covering_keys(model, fqns):
            styles[key], matches[key] = style, match_key(model, key)
    return dataclasses.replace(plan, styles=styles, matches=matches)
