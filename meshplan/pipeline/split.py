"""Where a model splits into pipeline stages: its layout (the modules before the blocks, the block container,
the modules after) and the blocks each stage gets.

The layout comes from a ``pp`` plan: a plan provider's ``{"pp": ...}`` entry (same registry, hooks and MRO
lookup as ``tp`` / ``ep``) or, for Hugging Face models, ``config.base_model_pp_plan`` (keys relative to the base
model) followed by the class's ``_pp_plan`` (``lm_head``). A ``pp`` plan is an ordered mapping (or sequence) of
module names: exactly one names the repeated-block container (an ``nn.ModuleList`` / ``nn.Sequential``), the
ones before it go to the first stage, the ones after to the last; the values (Hugging Face's input/output
names) are not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.errors import PipelineSplitError


@dataclass(frozen=True)
class PipelineLayout:
    """A model's split points: ``first`` modules (first stage), the ``blocks`` container and its child names in
    order, ``last`` modules (last stage), and where the layout came from."""

    first: tuple[str, ...]
    blocks: str
    block_names: tuple[str, ...]
    last: tuple[str, ...]
    source: str

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block_fqn(self, index: int) -> str:
        return f"{self.blocks}.{self.block_names[index]}" if self.blocks else self.block_names[index]


def _qualified(prefix: str, names: Sequence[str]) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n in names]


def _plan_owner(model: nn.Module) -> tuple[str, Any] | None:
    """``(name, config)`` of the module whose config declares ``base_model_pp_plan``: the base model, else (a
    multimodal model whose text config declares it) the first submodule carrying such a config."""
    config = getattr(model, "config", None)
    if getattr(config, "base_model_pp_plan", None):
        base = getattr(model, "base_model", model)
        return next((name for name, module in model.named_modules() if module is base), ""), config
    for name, module in model.named_modules():
        owned = getattr(module, "config", None)
        if owned is not config and getattr(owned, "base_model_pp_plan", None):
            return name, owned
    return None


def _wrapper_modules(model: nn.Module, owner: str) -> tuple[list[str], list[str]]:
    """``(first, last)``: the modules with parameters around the plan's owner, at every level from the root down to
    it. The output embeddings (``lm_head``) go to the last stage, the others (vision / audio towers, projectors,
    which feed the embeddings) to the first."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    first: list[str] = []
    last: list[str] = []
    path = owner.split(".") if owner else []
    for depth, step in enumerate(path):
        parent = ".".join(path[:depth])
        for name, child in model.get_submodule(parent).named_children():
            if name != step and _numel(child):
                (last if child is head else first).append(_qualified(parent, [name])[0])
    return first, last


def _hf_entries(model: nn.Module) -> tuple[list[str], str] | None:
    """The module names of a Hugging Face model's ``base_model_pp_plan`` (of its config, or of the text config of
    a multimodal model) + class ``_pp_plan``, with a multimodal model's other modules around them; or ``None``."""
    found = _plan_owner(model)
    if found is None:
        return None
    owner, config = found
    before, after = _wrapper_modules(model, owner)
    entries = _qualified(owner, list(config.base_model_pp_plan))
    own = getattr(type(model), "_pp_plan", None) or {}  # the class's (lm_head); the instance's repeats the base's
    entries += [name for name in own if name not in entries]
    entries += [name for name in after if not _within(name, entries)]
    return [*before, *entries], f"Hugging Face base_model_pp_plan of {type(config).__name__}"


def find_layout(model: nn.Module, pp_plan: Any = None, source: str = "pp plan") -> PipelineLayout:
    """The model's :class:`PipelineLayout`: from ``pp_plan`` (module names in order, or a mapping keyed by them:
    the ``pp_plan`` option, or a plan provider's ``pp`` entry) if given, else the Hugging Face
    ``base_model_pp_plan``. :class:`PipelineSplitError` when none exists or it is malformed."""
    found = (list(pp_plan), source) if pp_plan is not None else _hf_entries(model)
    if found is None:
        raise PipelineSplitError(
            f"{type(model).__qualname__} has no pipeline split: it declares no Hugging Face base_model_pp_plan and "
            "no plan provider gives it a 'pp' plan. Register one, e.g. meshplan.register_tp_plan(ModelClass, "
            "{'pp': ['embed', 'layers', 'norm', 'head']}) (module names in order; one is the block container).")
    entries, source = found
    modules = dict(model.named_modules())
    missing = [name for name in entries if name not in modules]
    if missing:
        raise PipelineSplitError(f"The {source} names modules {type(model).__qualname__} lacks: {missing}.")
    containers = [i for i, name in enumerate(entries) if _is_container(modules[name])]
    if len(containers) != 1:
        raise PipelineSplitError(
            f"The {source} must name exactly one block container (a non-empty nn.ModuleList / nn.Sequential); "
            f"it names {[entries[i] for i in containers] or 'none'} among {entries}.")
    at = containers[0]
    block_names = tuple(name for name, _ in modules[entries[at]].named_children())
    layout = PipelineLayout(tuple(entries[:at]), entries[at], block_names, tuple(entries[at + 1:]), source)
    _check_coverage(model, layout)
    return layout


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def _within(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _check_coverage(model: nn.Module, layout: PipelineLayout) -> None:
    """Every parameter lies in a module the layout places, else it would be copied onto every stage."""
    placed = (*layout.first, layout.blocks, *layout.last)
    stray = [name for name, _ in model.named_parameters() if not _within(name, placed)]
    if stray:
        raise PipelineSplitError(
            f"The {layout.source} places no stage for parameters {stray[:4]}{' ...' if len(stray) > 4 else ''}, "
            "and meshplan does not guess where the model's forward uses them. Give the whole split in order "
            "(pp_plan=[...] or a plan provider's 'pp' entry) with each such module before the blocks (first "
            "stage) or after them (last stage); modules whose output every block reads (per-layer inputs) cannot "
            "be split this way.")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_costs(model: nn.Module, layout: PipelineLayout) -> tuple[list[int], int, int]:
    """``(parameters per block, parameters of the first-stage modules, of the last-stage modules)``."""
    container = model.get_submodule(layout.blocks)
    blocks = [_numel(container.get_submodule(n)) for n in layout.block_names]
    first = sum(_numel(model.get_submodule(n)) for n in layout.first)
    last = sum(_numel(model.get_submodule(n)) for n in layout.last)
    return blocks, first, last


def balanced_split(blocks: Sequence[int], first: int, last: int, num_stages: int) -> list[range]:
    """Contiguous, non-empty block ranges for ``num_stages`` stages minimizing the largest stage's parameter count
    (the first stage also holds ``first``, the last ``last``); ties go to the earliest boundaries."""
    n = len(blocks)
    prefix = [0]
    for cost in blocks:
        prefix.append(prefix[-1] + cost)

    def cost(stage: int, start: int, end: int) -> int:
        return prefix[end] - prefix[start] + (first if stage == 0 else 0) + (last if stage == num_stages - 1 else 0)

    # best[s][e]: smallest largest-stage cost placing blocks [0, e) on stages 0..s; cut[s][e]: where stage s starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for end in range(1, n + 1):
        best[0][end] = cost(0, 0, end)
    for stage in range(1, num_stages):
        for end in range(stage + 1, n + 1):
            for start in range(stage, end):
                value = max(best[stage - 1][start], cost(stage, start, end))
                if value < best[stage][end]:
                    best[stage][end], cut[stage][end] = value, start
    bounds, end = [], n
    for stage in range(num_stages - 1, 0, -1):
        bounds.append(cut[stage][end])
        end = cut[stage][end]
    return ranges_from_bounds(sorted(bounds), n)


def ranges_from_bounds(bounds: Sequence[int], num_blocks: int) -> list[range]:
    edges = [0, *bounds, num_blocks]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def stage_block_ranges(model: nn.Module, layout: PipelineLayout, num_stages: int,
                       pp_split: Sequence[int] | None = None) -> list[range]:
    """The block range of every stage: ``pp_split`` (the first block of stages 1..S-1, increasing) if given, else
    :func:`balanced_split`. :class:`PipelineSplitError` for more stages than blocks or a bad ``pp_split``."""
    n = layout.num_blocks
    if num_stages > n:
        raise PipelineSplitError(
            f"{num_stages} pipeline stages need at least as many blocks, but {layout.blocks!r} has {n}: lower pp or "
            "pp_stages_per_rank.")
    if pp_split is None:
        return balanced_split(*block_costs(model, layout), num_stages)
    bounds = list(pp_split)
    if len(bounds) != num_stages - 1 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        raise PipelineSplitError(
            f"pp_split must list {num_stages - 1} integer block indices (where stages 1..{num_stages - 1} start), "
            f"got {pp_split!r}.")
    if any(b < 1 or b >= n for b in bounds):
        raise PipelineSplitError(f"pp_split {bounds} is out of range: each boundary must lie in 1..{n - 1}.")
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise PipelineSplitError(f"pp_split {bounds} must be strictly increasing (every stage needs a block).")
    return ranges_from_bounds(bounds, n)


def stage_module_names(layout: PipelineLayout, blocks: range, num_stages: int, stage: int) -> tuple[str, ...]:
    """The modules stage ``stage`` holds (first/last-stage modules and its blocks)."""
    return (*(layout.first if stage == 0 else ()), *(layout.block_fqn(i) for i in blocks),
            *(layout.last if stage == num_stages - 1 else ()))


def check_tied_parameters(model: nn.Module, layout: PipelineLayout, ranges: Sequence[range]) -> None:
    """:class:`PipelineSplitError` when one parameter (tied embeddings) would be needed by two stages.

    Supporting it would mean a copy per stage kept equal by summing their gradients over the stages after every
    backward, with layouts that agree under TP and FSDP; meshplan refuses instead and says how to avoid it."""
    owner: dict[int, tuple[int, str]] = {}
    for stage, blocks in enumerate(ranges):
        for module_name in stage_module_names(layout, blocks, len(ranges), stage):
            for name, param in model.get_submodule(module_name).named_parameters(remove_duplicate=False):
                seen = owner.setdefault(id(param), (stage, f"{module_name}.{name}"))
                if seen[0] != stage:
                    raise PipelineSplitError(
                        f"{seen[1]} (stage {seen[0]}) and {module_name}.{name} (stage {stage}) are the same "
                        "parameter (tied embeddings): pipeline stages cannot share a parameter. Untie it before "
                        "parallelizing (e.g. config tie_word_embeddings=False), or train without pp.")
