"""Shared test helpers: tiny models (HF models from configs, plain ``nn.Module`` stacks), the TP mesh, relative
errors and full (gathered) tensors of parallelized models.

The TP-only strategy and :func:`tp_mesh` come from :mod:`meshplan.plugins.testing`, where plugin authors get them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from meshplan.core.naming import unwrapped_name
from meshplan.plugins.testing import TensorParallelOnly, tp_mesh

__all__ = ["Block", "TensorParallelOnly", "TinyStack", "clean_name", "full", "full_grads", "full_params",
           "perturb", "relative_error", "tiny_hf", "tp_mesh"]



# --- numbers -------------------------------------------------------------------------------------------
def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64 (0 for empty tensors)."""
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor, 1e-30)
    diff = (actual.double() - expected.double()).abs()
    return float(diff.max()) / scale if diff.numel() else 0.0


# --- full tensors of a parallelized model -----------------------------------------------------------
def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain, detached copy of ``tensor``; a DTensor is gathered (``full_tensor()``, collective)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


clean_name = unwrapped_name


def _gathered(model: nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from meshplan.state.packing import unpack_full_state_dict

    unpacked = unpack_full_state_dict(model, {name: full(tensor) for name, tensor in named})
    return {clean_name(name): tensor for name, tensor in unpacked.items()}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors gathered, packed parameters in their original order),
    keyed by its wrapper-free name."""
    return _gathered(model, model.named_parameters())


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient that exists, gathered and keyed like :func:`full_params`."""
    return _gathered(model, ((n, p.grad) for n, p in model.named_parameters() if p.grad is not None))


# --- tiny models --------------------------------------------------------------------------------------
def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add ``scale`` x N(0, 1) noise (from ``seed``) to every float parameter, so norm weights are not all
    ones and routers not all zeros (a wrong gradient cannot hide behind a symmetric value)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def tiny_hf(model_type: str = "llama", seed: int = 0, **overrides):
    """A 2-layer HF causal LM of ``model_type`` with small dims and fixed random weights (fp32); eager
    attention unless ``attn_implementation`` is overridden."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, head_dim=16)
    settings.update(overrides)
    attn_implementation = settings.pop("attn_implementation", "eager")
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class TinyStack(nn.Module):
    """A plain (non-transformers) model: embedding-free MLP stack with a head."""

    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
