"""Build a stage: the model with only the blocks (and the first/last-stage modules) one pipeline stage runs.

A stage module is the model itself, pruned, so its parameter names are the original ones (``model.layers.5.…``
stays ``model.layers.5.…``): the block container keeps its blocks under their original indices
(:class:`KeptBlocks`), first-stage modules (embeddings) on later stages and last-stage modules (final norm,
head) on earlier stages become ``nn.Identity``. Every stage then runs through the normal parallelization order
(TP, CP, EP, activation checkpointing, FSDP) like a whole model.

Per-layer config lists: Hugging Face forwards pick each block's mask or rotary table by its position in the
container (``self.config.layer_types[i]`` over ``enumerate(self.layers)``), but a stage's blocks keep their
original indices. The module holding the blocks therefore gets a stage copy of its config whose per-layer lists
(every list as long as the container, e.g. ``layer_types``) describe the kept blocks only
(:func:`stage_config`); the blocks keep the whole model's config, which they index by their own layer index.

How a stage runs: a Hugging Face causal LM runs its own forward (so rotary embeddings, masks, position ids
and sliding windows are computed on every stage as in the whole model) taking ``input_ids`` on the first stage.
A later stage's forward takes zeros of the embeddings' shape as ``inputs_embeds`` (whatever the model does to its
embeddings before the blocks, an ``embedding_multiplier`` or a widening into hyper-connection streams, was done
on the first stage) and its first block gets the previous stage's activation instead of the hidden states the
model computed from them; a non-last stage returns its last block's output (what the model does after the blocks
belongs to the last stage), the last stage the logits. Any other module runs its own forward with the activation
as its first argument (its skipped embedding is an identity).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import PipelineError
from .router_loss import add_router_sums, uses_router_loss
from .split import PipelineLayout


@dataclass(frozen=True)
class StageInfo:
    """Which stage a module is: ``index`` of ``num_stages``, the blocks it holds (indices into the layout) and
    the name of their container in the stage (set by :func:`build_stage`)."""

    index: int
    num_stages: int
    blocks: range
    container: str = ""

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


STAGE_ATTRIBUTE = "_meshplan_stage"


def stage_info(module: nn.Module) -> StageInfo | None:
    """The :class:`StageInfo` of a stage module built here, else ``None``."""
    return getattr(module, STAGE_ATTRIBUTE, None)


class KeptBlocks(nn.ModuleList):
    """The blocks a stage keeps, registered under their original indices so parameter names do not change.
    Integer indexing and slicing are positional (``layers[0]`` is the stage's first block)."""

    def __init__(self, named: Sequence[tuple[str, nn.Module]] = ()) -> None:
        super().__init__()
        for name, block in named:
            self.add_module(name, block)

    def __getitem__(self, index: int | slice) -> Any:
        items = list(self._modules.items())
        if isinstance(index, slice):
            return KeptBlocks(items[index])
        return items[index][1]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())


def _kept_container(container: nn.Module, names: Sequence[str]) -> nn.Module:
    named = [(n, container.get_submodule(n)) for n in names]
    if isinstance(container, nn.Sequential):
        kept = nn.Sequential()
        for name, block in named:
            kept.add_module(name, block)
        return kept
    return KeptBlocks(named)


def _replace(model: nn.Module, fqn: str, module: nn.Module) -> nn.Module:
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[name]
    parent._modules[name] = module
    return old


#: Config lists that are never per block, whatever their length (``eos_token_id=[1, 2]`` of a 2-layer model).
TOKEN_ID_SUFFIXES = ("token_id", "token_ids")


def stage_config(config: Any, kept: Sequence[int], num_blocks: int) -> Any:
    """A shallow copy of ``config`` for a stage holding blocks ``kept`` (of ``num_blocks``): every list or tuple
    attribute with one entry per block is cut down to the kept blocks' entries, in order. ``num_hidden_layers``
    stays (forwards slice ``self.layers[:num_hidden_layers]``, and some configs derive other counts from it)."""
    staged = copy.copy(config)
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == num_blocks and not name.endswith(TOKEN_ID_SUFFIXES):
            setattr(staged, name, type(value)(value[i] for i in kept))
    return staged


def _restage_config(stage: nn.Module, layout: PipelineLayout, info: StageInfo) -> None:
    """Give the module that holds the block container its :func:`stage_config` (Hugging Face models)."""
    owner = stage.get_submodule(layout.blocks.rpartition(".")[0])
    config = getattr(owner, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # a transformers config
        owner.config = stage_config(config, list(info.blocks), layout.num_blocks)


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (its stages run its own forward with ``inputs_embeds``)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__) and hasattr(model, "base_model")


class HuggingFaceStageForward:
    """Forward of a Hugging Face stage (mixed into the model's class): first stage from ``input_ids``, later ones
    from the previous stage's activation fed to their first block; the last returns logits, the others their last
    block's output. The KV cache is off. A model with a router auxiliary loss (``output_router_logits``) also
    returns its router sums, added to those the previous stage sent (:mod:`meshplan.pipeline.router_loss`)."""

    def forward(self, activation: torch.Tensor, *received: torch.Tensor, **kwargs: Any) -> Any:
        info: StageInfo = getattr(self, STAGE_ATTRIBUTE)
        blocks = list(self.get_submodule(info.container))  # type: ignore[attr-defined]  # wrappers included
        inputs = dict(kwargs)
        inputs["use_cache"] = False  # also when a forward hook (context parallelism's) already passes it
        with ExitStack() as stack:
            if info.is_first:
                inputs["input_ids"] = activation
            else:
                inputs["inputs_embeds"] = _embedding_placeholder(self, activation)
                stack.enter_context(_fed(blocks[0], activation))
            if info.is_last:
                outputs = super().forward(**inputs)  # type: ignore[misc]
                hidden = outputs.logits
            else:
                captured = stack.enter_context(_captured(blocks[-1]))
                outputs = self.base_model(**inputs)  # type: ignore[attr-defined]
                if "hidden_states" not in captured:
                    raise PipelineError(f"Stage {info.index}'s last block did not run in the model's forward.")
                hidden = captured["hidden_states"]
        if not uses_router_loss(self):  # type: ignore[arg-type]
            return hidden
        return hidden, add_router_sums(self, outputs, kwargs.get("attention_mask"), received)  # type: ignore[arg-type]


def _embedding_placeholder(stage: nn.Module, activation: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like the embeddings (batch, sequence, hidden size) for a later stage's ``inputs_embeds``:
    the model derives masks and positions from them; the blocks never see them (:func:`_fed`)."""
    hidden_size = stage.config.get_text_config().hidden_size  # type: ignore[attr-defined]
    return activation.new_zeros(*activation.shape[:2], hidden_size)


@contextmanager
def _fed(block: nn.Module, activation: torch.Tensor) -> Iterator[None]:
    """While active, ``block`` takes ``activation`` as its hidden states (first argument or ``hidden_states``),
    before any other pre-hook (tensor-parallel input layouts) sees them."""

    def feed(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (activation, *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": activation}
        raise PipelineError(f"{type(block).__name__} takes its hidden states neither first nor as hidden_states=: "
                            "a pipeline stage cannot hand it the previous stage's activation.")

    handle = block.register_forward_pre_hook(feed, prepend=True, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _captured(block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``block``'s output hidden states (the first element of a tuple output) land in the yielded
    dict under ``hidden_states``, after every other hook (sequence-parallel gathers) has run."""
    found: dict[str, torch.Tensor] = {}

    def capture(_: nn.Module, args: tuple, output: Any) -> None:
        found["hidden_states"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = block.register_forward_hook(capture)
    try:
        yield found
    finally:
        handle.remove()


@functools.cache
def _stage_class(cls: type) -> type:
    return type(f"PipelineStage{cls.__name__}", (HuggingFaceStageForward, cls), {"__module__": cls.__module__})


def build_stage(model: nn.Module, layout: PipelineLayout, info: StageInfo, in_place: bool) -> nn.Module:
    """The module of stage ``info``: ``model`` pruned in place, or a copy of the parts the stage keeps (the rest is
    never copied). A Hugging Face model's class gets :class:`HuggingFaceStageForward` mixed in."""
    container = model.get_submodule(layout.blocks)
    kept = _kept_container(container, [layout.block_names[i] for i in info.blocks])
    dropped = [*(layout.first if not info.is_first else ()), *(layout.last if not info.is_last else ())]
    originals = {fqn: _replace(model, fqn, nn.Identity()) for fqn in dropped}
    originals[layout.blocks] = _replace(model, layout.blocks, kept) if layout.blocks else container
    try:
        stage = model if in_place else copy.deepcopy(model)
    finally:
        if not in_place:
            for fqn, module in originals.items():
                if fqn:
                    _replace(model, fqn, module)
    object.__setattr__(stage, STAGE_ATTRIBUTE, dataclasses.replace(info, container=layout.blocks))
    _restage_config(stage, layout, info)
    if is_hf_causal_lm(stage):
        stage.__class__ = _stage_class(type(stage))
    return stage
