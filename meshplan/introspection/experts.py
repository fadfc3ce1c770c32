"""Fused experts modules: every expert of one MoE layer in parameters ``[num_experts, ...]``.

transformers' ``@use_experts_implementation`` classes (Mixtral, Qwen3-MoE, DeepSeek-V2/V3, GPT-OSS, ...) and
look-alikes such as Llama4's, found structurally: an integer ``num_experts`` attribute, own parameters all with
that leading dim, at least one of them 3-D (a router's ``[num_experts, hidden]`` weight is not an expert). How
their parameters are laid out and split is :mod:`meshplan.experts.modules`'s business.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def expert_count(module: nn.Module) -> int | None:
    """The module's expert count if it is a fused experts module (see the module docstring), else ``None``."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return None
    own = [p for p in module.parameters(recurse=False) if p.ndim >= 2]
    fused = any(p.ndim >= 3 for p in own)  # a router's [num_experts, hidden] weight is not an expert
    return count if fused and all(p.shape[0] == count for p in own) else None


def find_expert_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(fully qualified name, module)`` of every fused experts module of ``model``."""
    for name, module in model.named_modules():
        if expert_count(module) is not None:
            yield name, module


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the parameters of every fused experts module (``[num_experts, ...]``)."""
    return [f"{fqn}.{name}" if fqn else name
            for fqn, module in find_expert_modules(model)
            for name, param in module.named_parameters(recurse=False)
            if param.ndim >= 1 and param.shape[0] == module.num_experts]
