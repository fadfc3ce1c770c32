"""Activation checkpointing helper: which modules each mode wraps, unchanged keys and numerics, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshplan.activation_checkpointing import apply_activation_checkpointing, checkpoint_targets
from meshplan.core.errors import UnsupportedConfigurationError
from meshplan.introspection.blocks import find_blocks
from tests.support import TinyStack, tiny_hf


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


def test_targets_per_mode():
    blocks = find_blocks(TinyStack(depth=5))
    assert checkpoint_targets(blocks, False) == []
    assert checkpoint_targets(blocks, "full") == [f"layers.{i}" for i in range(5)]
    assert checkpoint_targets(blocks, "selective") == ["layers.0", "layers.2", "layers.4"]
    assert checkpoint_targets(blocks, "selective", every=3) == ["layers.0", "layers.3"]
    hf_blocks = find_blocks(tiny_hf())
    assert checkpoint_targets(hf_blocks, True) == checkpoint_targets(hf_blocks, "mlp") == [
        "model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("mode, every, message", [
    ("sometimes", 2, "must be one of"),
    (1, 2, "must be one of"),
    ("selective", 0, "activation_checkpointing_every must be an int >= 1"),
    (True, 2, "use activation_checkpointing='full'"),
])
def test_bad_modes_and_nothing_to_wrap(mode, every, message):
    with pytest.raises(UnsupportedConfigurationError, match=message):
        checkpoint_targets(find_blocks(TinyStack()), mode, every)


def test_no_blocks_is_an_error_not_a_silent_no_op():
    with pytest.raises(UnsupportedConfigurationError, match="no repeated blocks"):
        checkpoint_targets(find_blocks(nn.Linear(2, 2)), "full")


def test_selective_uses_the_block_list_found_before_wrapping():
    model = TinyStack(depth=4)
    blocks = find_blocks(model)
    assert apply_activation_checkpointing(model, "selective", 2, blocks) == ["layers.0", "layers.2"]
    assert [type(m).__name__ for m in model.layers] == ["CheckpointWrapper", "Block", "CheckpointWrapper", "Block"]
    assert find_blocks(model) == []  # mixed classes: why the list must be found first


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_wrapping_keeps_keys_outputs_and_gradients(mode):
    torch.manual_seed(0)
    plain, wrapped = TinyStack(depth=3), TinyStack(depth=3)
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, mode)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 16)
    outputs = [model(x) for model in (plain, wrapped)]
    for out in outputs:
        out.square().sum().backward()
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(g, _grads(wrapped)[n]) for n, g in _grads(plain).items())


def test_hf_full_blocks_turn_the_kv_cache_off_and_match_exactly():
    """Recomputing a whole HF decoder layer with the cache on would append its keys twice (shape error)."""
    plain, wrapped = tiny_hf(), tiny_hf()
    assert apply_activation_checkpointing(wrapped, "full") == ["model.layers.0", "model.layers.1"]
    assert wrapped.config.use_cache is False and plain.config.use_cache is True
    ids = torch.arange(32).reshape(2, 16)
    losses = [model(input_ids=ids, labels=ids).loss for model in (plain, wrapped)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(g, _grads(wrapped)[n]) for n, g in _grads(plain).items())


def test_hf_mlp_mode_leaves_the_cache_alone():
    model = tiny_hf()
    apply_activation_checkpointing(model, True)
    assert model.config.use_cache is True
    assert type(model.model.layers[0].mlp).__name__ == "CheckpointWrapper"
    assert "model.layers.0.mlp.up_proj.weight" in model.state_dict()
