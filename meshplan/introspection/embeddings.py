"""Input and output embeddings, found through the transformers API (``get_input_embeddings``)."""

from __future__ import annotations

from torch import nn


def module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    """The fully qualified name of ``target`` inside ``model`` (``None`` if absent)."""
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def embedding_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """``(input embedding, output embedding)`` from the transformers API, ``None`` where unavailable."""

    def call(name: str) -> nn.Module | None:
        getter = getattr(model, name, None)
        try:
            return getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            return None

    return call("get_input_embeddings"), call("get_output_embeddings")


def are_tied(embedding: nn.Module | None, head: nn.Module | None) -> bool:
    """Whether the output embedding shares its weight with the input embedding."""
    weight = getattr(head, "weight", None)
    return weight is not None and weight is getattr(embedding, "weight", None)
