"""Hub-format keys <-> the model's parameters, through transformers' own conversion mapping.

transformers 5 keeps, per model type, a list of ``WeightRenaming`` / ``WeightConverter`` rules
(``transformers.conversion_mapping.get_checkpoint_conversion_mapping``; users add theirs with
``register_checkpoint_conversion_mapping``): Mixtral's ``block_sparse_moe.experts.E.w1/w3.weight`` on disk become
the model's fused ``mlp.experts.gate_up_proj`` by ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``. Nothing
here names a model type: keys are renamed and grouped by transformers' ``rename_source_key`` exactly as its
``from_pretrained`` does, and every group is first converted on the meta device by the converter itself, which
gives the names and shapes it produces without reading a byte.

Reading one rank's slice of a converted tensor: a converter made only of ``MergeModulelist`` and ``Concatenate``
becomes a lazy tree (:class:`Stacked`, :class:`Concatenated` over :class:`Stored` leaves), so only the source
tensors and rows the slice covers are read. Any other operation reads its group's source tensors whole and runs
the converter (:class:`Converted`): memory bounded by one group, the largest tensor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .hf_folder import SliceReader, StoredTensor

Region = Sequence[tuple[int, int]]


# --- lazy sources of one converted tensor ------------------------------------------------------------------
class Stored:
    """A tensor as stored in the folder."""

    def __init__(self, key: str, stored: StoredTensor) -> None:
        self.key, self.shape = key, stored.shape

    def read(self, reader: SliceReader, region: Region) -> torch.Tensor:
        return reader.read(self.key, region)


class Stacked:
    """``torch.stack(children, dim)`` (transformers' ``MergeModulelist``)."""

    def __init__(self, children: list[Any], dim: int) -> None:
        self.children, self.dim = children, dim
        inner = list(children[0].shape)
        self.shape = tuple(inner[:dim] + [len(children)] + inner[dim:])

    def read(self, reader: SliceReader, region: Region) -> torch.Tensor:
        start, stop = region[self.dim]
        rest = [*region[:self.dim], *region[self.dim + 1:]]
        return torch.stack([self.children[i].read(reader, rest) for i in range(start, stop)], self.dim)


class Concatenated:
    """``torch.cat(children, dim)`` (transformers' ``Concatenate``)."""

    def __init__(self, children: list[Any], dim: int) -> None:
        self.children, self.dim = children, dim
        shape = list(children[0].shape)
        shape[dim] = sum(child.shape[dim] for child in children)
        self.shape = tuple(shape)

    def read(self, reader: SliceReader, region: Region) -> torch.Tensor:
        start, stop = region[self.dim]
        pieces, offset = [], 0
        for child in self.children:
            size = child.shape[self.dim]
            low, high = max(start, offset), min(stop, offset + size)
            if low < high:
                sub = list(region)
                sub[self.dim] = (low - offset, high - offset)
                pieces.append(child.read(reader, sub))
            offset += size
        return torch.cat(pieces, self.dim)


class Converted:
    """One output of a converter that cannot be sliced: its group's sources are read whole and converted once
    (shared by the group's outputs until :meth:`release`)."""

    def __init__(self, group: SourceGroup, key: str, shape: tuple[int, ...],
                 convert: Callable[[SliceReader], dict[str, torch.Tensor]]) -> None:
        self.group, self.key, self.shape, self._convert = group, key, shape, convert

    def read(self, reader: SliceReader, region: Region) -> torch.Tensor:
        if self.group.converted is None:
            self.group.converted = self._convert(reader)
        return self.group.converted[self.key][tuple(slice(a, b) for a, b in region)]


# --- grouping checkpoint keys the way transformers does ---------------------------------------------------
@dataclass
class SourceGroup:
    """The checkpoint keys that make one converted group (one renamed key, or one converter's sources)."""

    target: str
    converter: Any | None  # a WeightConverter template, None for a plain (renamed) tensor
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> checkpoint keys, in order
    outputs: dict[str, Any] = field(default_factory=dict)  # output key -> lazy node (Stored, Stacked, ...)
    converted: dict[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return [key for keys in self.sources.values() for key in keys]

    def release(self) -> None:
        self.converted = None


def own_class(cls: type) -> type:
    """The class a wrapper class was made from: FSDP2, ``replicate`` and pipeline stages give a module the class
    ``type(prefix + name, (Wrapper, cls), ...)`` (``FSDPLlamaForCausalLM``); nested wrappers are peeled in turn."""
    while len(cls.__bases__) > 1 and cls.__name__ != cls.__bases__[-1].__name__ \
            and cls.__name__.endswith(cls.__bases__[-1].__name__):
        cls = cls.__bases__[-1]
    return cls


@contextlib.contextmanager
def _own_classes(model: nn.Module) -> Iterator[None]:
    """The model's modules wear their own classes inside the block. transformers looks conversion mappings up by
    class name (``register_checkpoint_conversion_mapping("LlamaForCausalLM", ...)``) and skips classes defined
    outside ``transformers`` as custom code: a wrapper class would hide the model's own mapping."""
    wrapped = [(module, type(module)) for module in model.modules() if own_class(type(module)) is not type(module)]
    for module, cls in wrapped:
        module.__class__ = own_class(cls)
    try:
        yield
    finally:
        for module, cls in wrapped:
            module.__class__ = cls


def _conversions(model: nn.Module, add_legacy: bool) -> list[Any]:
    from transformers.conversion_mapping import get_model_conversion_mapping  # imported on use

    if not hasattr(model, "config"):
        return []
    with _own_classes(model):
        return get_model_conversion_mapping(model, add_legacy=add_legacy)


def _run_converter(group: SourceGroup, model: nn.Module, fetch: Callable[[str], torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The converter of ``group`` run by transformers on the tensors ``fetch(key)`` gives (called lazily)."""
    converter = copy.deepcopy(group.converter)
    for pattern, keys in group.sources.items():
        for key in keys:
            converter.add_tensor(group.target, key, pattern, functools.partial(fetch, key))
    out = converter.convert(group.target, model=model, config=getattr(model, "config", None))
    return {key: value[0] if isinstance(value, list) else value for key, value in out.items()}


def _lazy(group: SourceGroup, catalog: dict[str, StoredTensor]) -> Any | None:
    """A lazy node for a converter of ``MergeModulelist`` / ``Concatenate`` steps with one target, else ``None``."""
    from transformers.core_model_loading import Concatenate, MergeModulelist  # imported on use

    converter = group.converter
    if len(converter.target_patterns) != 1:
        return None
    values: dict[str, Any] = {pattern: [Stored(key, catalog[key]) for key in keys]
                              for pattern, keys in group.sources.items()}
    for op in converter.operations:
        if type(op) is MergeModulelist:
            values = {pattern: Stacked(nodes, op.dim) if isinstance(nodes, list) else nodes
                      for pattern, nodes in values.items()}
        elif type(op) is Concatenate and op.num_shards_attribute is None:
            children = [node for pattern in converter.source_patterns if pattern in values
                        for node in (values[pattern] if isinstance(values[pattern], list) else [values[pattern]])]
            values = {converter.target_patterns[0]: Concatenated(children, op.dim)}
        else:
            return None
    (nodes,) = values.values() if len(values) == 1 else (None,)
    if isinstance(nodes, list):
        nodes = nodes[0] if len(nodes) == 1 else None
    return nodes


def plan_sources(model: nn.Module, catalog: dict[str, StoredTensor], model_keys: set[str]
                 ) -> tuple[list[SourceGroup], list[str]]:
    """The folder's keys grouped by the model tensor(s) they make (each group's ``outputs``: output key -> lazy
    node), and the checkpoint keys that make none of the model's tensors. Reads no tensor data."""
    from transformers.core_model_loading import (  # imported on use
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    mapping = _conversions(model, add_legacy=True)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    known = dict.fromkeys(model_keys, True)
    prefix = getattr(model, "base_model_prefix", None)
    groups: dict[str, SourceGroup] = {}
    unexpected: list[str] = []
    for key in sorted(catalog, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if renamed not in known and key in known:  # as transformers: a key that should not have been renamed
            renamed, pattern = rename_source_key(key, [], [], prefix, known)
        if renamed not in known:
            unexpected.append(key)
            continue
        group = groups.setdefault(renamed, SourceGroup(renamed, by_pattern[pattern] if pattern else None))
        group.sources.setdefault(pattern or key, []).append(key)

    def meta(key: str) -> torch.Tensor:
        return torch.empty(catalog[key].shape, dtype=catalog[key].dtype, device="meta")

    for group in groups.values():
        if group.converter is None:
            (key,) = group.keys()[:1]
            group.outputs = {group.target: Stored(key, catalog[key])}
            continue
        shapes = {name: tuple(tensor.shape) for name, tensor in _run_converter(group, model, meta).items()}
        node = _lazy(group, catalog)
        if node is not None and set(shapes) == {group.target} and tuple(node.shape) == shapes[group.target]:
            group.outputs = {group.target: node}
        else:
            def convert(reader: SliceReader, group: SourceGroup = group) -> dict[str, torch.Tensor]:
                return _run_converter(group, model, reader.read)

            group.outputs = {name: Converted(group, name, shape, convert) for name, shape in shapes.items()}
    return list(groups.values()), unexpected


# --- saving: the model's tensors grouped by the reverse conversion that makes hub keys of them -------------
def save_groups(model: nn.Module, keys: Sequence[str]) -> list[list[str]]:
    """The model's state-dict ``keys`` in groups that transformers' ``revert_weight_conversion`` converts together
    (the keys one reversed converter collects under one name; every other key alone), in its key order."""
    from transformers.core_model_loading import (  # imported on use
        PrefixChange,
        WeightConverter,
        apply_converters,
        dot_natural_key,
    )

    conversions = [entry for entry in _conversions(model, add_legacy=False) if not isinstance(entry, PrefixChange)]
    reversed_converters = [entry.reverse_transform() for entry in conversions[::-1]
                           if isinstance(entry, WeightConverter)]
    groups: dict[str, list[str]] = {}
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = apply_converters(key, reversed_converters)
        groups.setdefault(renamed if pattern is not None else f"\0{key}", []).append(key)
    return list(groups.values())


def to_hub_format(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` (model keys) in the hub format: transformers' ``revert_weight_conversion``."""
    from transformers.core_model_loading import revert_weight_conversion  # imported on use

    if not hasattr(model, "config"):
        return state_dict
    with _own_classes(model):
        return revert_weight_conversion(model, state_dict)
