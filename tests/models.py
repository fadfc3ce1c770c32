"""Tiny models for tests: HF models from configs (random weights) and plain nn.Module stacks."""

from __future__ import annotations

import torch
from torch import nn


def tiny_hf(model_type: str = "llama", seed: int = 0, **overrides):
    """A 2-layer HF causal LM of ``model_type`` with small dims and fixed random weights (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, head_dim=16)
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = "eager"
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


def llama_tp_plan(sequence_parallel: bool = False) -> dict:
    """An explicit TP (or TP + sequence parallel) plan for HF ``LlamaForCausalLM`` on transformers 5.x.

    Vocab-parallel embedding and ``lm_head``. Under sequence parallel the residual stream is split along
    the sequence at the input of layer 0 (not at the embedding): HF derives position ids, rotary tables
    and masks from the embedding's output length, which must stay global.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    layer = "model.layers.*"
    sharded_out = {"output_layouts": Shard(1), "use_local_output": False} if sequence_parallel else {}
    plan: dict = {f"{layer}.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
    plan |= {f"{layer}.mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")}
    plan[f"{layer}.self_attn.o_proj"] = RowwiseParallel(**sharded_out)
    plan[f"{layer}.mlp.down_proj"] = RowwiseParallel(**sharded_out)
    if not sequence_parallel:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
        return plan
    plan |= {f"{layer}.{n}": SequenceParallel() for n in ("input_layernorm", "post_attention_layernorm")}
    plan[f"{layer}.self_attn"] = PrepareModuleInput(
        input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()})
    plan[f"{layer}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    plan["model.norm"] = SequenceParallel()
    plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan["model.layers.0"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),))
    plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    return plan
