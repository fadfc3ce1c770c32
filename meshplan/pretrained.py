"""``meshplan.from_pretrained``: a causal LM built on the meta device from a Hugging Face folder's config,
parallelized, then loaded shard by shard (:func:`meshplan.state.hf_load.load_pretrained`). It sits on top of the
public facade (:mod:`meshplan.api`) and the state code, which know nothing of it."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .api import parallelize
from .state.hf_folder import resolve_folder
from .state.hf_load import load_pretrained

__all__ = ["from_pretrained"]


def _dtype(config: Any, dtype: torch.dtype | str) -> torch.dtype:
    """``dtype``, or for ``"auto"`` the config's (``torch.float32`` when it names none)."""
    if dtype != "auto":
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def from_pretrained(path: str | os.PathLike[str], mesh: Any, strategy: str = "fsdp2", *,
                    dtype: torch.dtype | str = "auto", strict: bool = True, **options: Any) -> nn.Module:
    """A causal LM built from the folder's config on the meta device, parallelized on ``mesh`` with ``strategy``
    (``options``: the strategy's options, ``tp_plan`` and ``ep_plan``), loaded with :func:`load_pretrained` (each
    rank reads its own shards) and with its buffers initialized. ``path``: a ``save_pretrained`` folder, or a hub
    id already in the local Hugging Face cache (nothing is downloaded). ``dtype``: the parameters' dtype,
    ``"auto"`` for the config's. Collective: call it on every rank."""
    from transformers import AutoConfig, AutoModelForCausalLM  # imported on use: keeps `import meshplan` light

    folder = resolve_folder(path)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(config, dtype))
    model = parallelize(model, mesh, strategy=strategy, **options)
    load_pretrained(model, folder, strict=strict)
    return model
