"""Built-in TP plan for Gemma 3n (``Gemma3nForCausalLM`` and the language model of
``Gemma3nForConditionalGeneration``): the model's own transformers plan, except for the MLPs of layers with
activation sparsity, which stay replicated.

A sparse layer keeps the activations of ``gate_proj`` above a Gaussian threshold computed from the mean and
standard deviation over *all* intermediate features. Column-wise TP gives each rank only its slice of those
features, so every rank would threshold with its own statistics and the layer would compute something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..introspection.config import text_config
from ..plugins.hookspecs import hookimpl

if TYPE_CHECKING:  # style classes are imported when a plan is built, not at plugin discovery
    from torch.distributed.tensor.parallel import ParallelStyle

    from ..core.registry import Registry


def sparse_layers(config: Any) -> frozenset[int]:
    """Indices of the decoder layers whose MLP applies activation sparsity."""
    pattern = getattr(text_config(config), "activation_sparsity_pattern", None) or ()
    if isinstance(pattern, (int, float)):
        pattern = [pattern] * text_config(config).num_hidden_layers
    return frozenset(i for i, sparsity in enumerate(pattern) if sparsity > 0)


def gemma3n_plan(model: nn.Module, sequence_parallel: bool = False, registry: Registry | None = None,
                 ) -> dict[str, ParallelStyle]:
    """The translated transformers plan with each ``layers.*.mlp.*`` entry kept for dense layers only."""
    # loaded on use: keeps start-up light
    from ..tensor_parallel.vocabulary import copy_style
    from .hf_translation import hf_tp_plan

    plan = hf_tp_plan(model, sequence_parallel, registry=registry)
    sparse = sparse_layers(model.config)
    if not sparse:
        return plan
    layers = range(text_config(model.config).num_hidden_layers)
    result: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        head, wildcard, tail = key.partition(".*.")
        if not (wildcard and head.endswith("layers") and tail.startswith("mlp.")):
            result[key] = style
            continue
        for index in (i for i in layers if i not in sparse):
            result[f"{head}.{index}.{tail}"] = copy_style(style)
    return result


@hookimpl
def meshplan_register_tp_plans(register) -> None:  # noqa: ANN001 - the hook's callback
    register("transformers.models.gemma3n.modeling_gemma3n.Gemma3nForCausalLM", gemma3n_plan)
    register("transformers.models.gemma3n.modeling_gemma3n.Gemma3nForConditionalGeneration", gemma3n_plan)
