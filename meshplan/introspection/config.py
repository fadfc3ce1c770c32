"""The model's config and the sub-config that describes its language model."""

from __future__ import annotations

from typing import Any

from torch import nn


def text_config(config: Any) -> Any:
    """The sub-config of ``config`` that describes the language model: transformers' ``get_text_config()``, or
    ``config.text_config`` where that call is ambiguous (several text sub-configs), else ``config`` itself."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except ValueError:  # several text sub-configs: take the one named text_config
            pass
    text = getattr(config, "text_config", None)
    return config if text is None else text


def model_configs(model: nn.Module) -> tuple[Any, ...]:
    """The model's ``config`` and, when it is another object, its text config (:func:`text_config`), in that
    order; empty for a model without ``config``."""
    config = getattr(model, "config", None)
    if config is None:
        return ()
    text = text_config(config)
    return (config,) if text is None or text is config else (config, text)


def config_value(model: nn.Module, name: str) -> Any:
    """The first value of attribute ``name`` that is not ``None`` in :func:`model_configs`, else ``None``."""
    return next((value for config in model_configs(model) if (value := getattr(config, name, None)) is not None),
                None)
