"""Shared test helpers: tiny models (HF models from configs, plain ``nn.Module`` stacks), the TP mesh, relative
errors and full (gathered) tensors of parallelized models.

The TP-only strategy and :func:`tp_mesh` come from :mod:`meshplan.plugins.testing`, where plugin authors get them;
relative errors, full tensors and :func:`perturb` from :mod:`meshplan.conformance.parity`, which the conformance
harness shares with the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from meshplan.conformance.parity import clean_name, full, full_grads, full_params, perturb, relative_error
from meshplan.plugins.testing import TensorParallelOnly, tp_mesh

__all__ = ["Block", "TensorParallelOnly", "TinyStack", "clean_name", "full", "full_grads", "full_params",
           "perturb", "relative_error", "tiny_hf", "tp_mesh"]



# --- tiny models --------------------------------------------------------------------------------------
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
