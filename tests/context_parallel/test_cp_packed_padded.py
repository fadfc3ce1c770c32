"""A training loop's batches under context parallelism: packed rows, padded rows, several forwards per backward.

Every case: 3 SGD steps in fp32 on gloo ranks give the loss of every step, the first step's gradients and every
final parameter of one process on the whole batch (1e-5 relative). Packed rows hold 3-4 documents of different
lengths with position ids that restart (no mask; transformers keeps the documents apart from them); padded rows
score every position, padding included, so the outputs of query rows that attend nothing (left padding, right
padding past Mistral's window of 5) reach the loss. Cases of one kind share one rank-pool call.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.core.errors import UnshardedInputError
from meshplan.plugins.testing import RankError
from tests.context_parallel.harness import cp_cases, packed_steps, padded_steps, reference_steps
from tests.parity import ModelSpec, assert_grad_parity, assert_parity

VOCAB = 256  # tests.support.tiny_hf
MODELS = {"llama": ModelSpec("llama"), "mistral-window5": ModelSpec("mistral", overrides={"sliding_window": 5})}


def _spec(model: str, attention: str) -> ModelSpec:
    base = MODELS[model]
    return ModelSpec(base.model_type, base.seed, {**base.overrides, "attn_implementation": attention})


def _check(results, cases) -> None:
    for result, (spec, steps) in zip(results, cases):
        expected = reference_steps(spec, steps)
        assert_parity(result, expected, rtol=1e-5)
        assert_grad_parity(result, expected, rtol=1e-5)


def _packed_cases() -> list:
    return [(_spec(model, attention), packed_steps(VOCAB)) for model in MODELS for attention in ("sdpa", "eager")]


@pytest.mark.distributed
def test_packed_rows_cp2_keep_documents_apart(ranks2):
    """cp=2, Llama and Mistral (window 5), SDPA and eager; query blocks cut at every document start."""
    cases = _packed_cases()
    _check(ranks2.run(cp_cases, cases, min_query_block=1, timeout=180)[0], cases)


@pytest.mark.distributed
def test_packed_rows_cp4_keep_documents_apart(ranks4):
    """cp=4 (chunks of 4 tokens, documents across chunk and rank borders), default query blocks."""
    cases = _packed_cases()
    _check(ranks4.run(cp_cases, cases, timeout=180)[0], cases)


@pytest.mark.distributed
def test_left_and_right_padding_with_scored_padding(ranks2):
    """cp=2, Mistral (window 5): padded positions are scored, their fully masked query rows included."""
    cases = [(_spec("mistral-window5", attention), padded_steps(VOCAB, side))
             for side in ("left", "right") for attention in ("sdpa", "eager")]
    _check(ranks2.run(cp_cases, cases, timeout=180)[0], cases)


@pytest.mark.distributed
def test_two_forwards_then_one_backward_with_full_checkpointing(ranks2):
    """Gradient accumulation without no_sync: two differently left-padded micro-batches forwarded, then one
    backward that recomputes both (each with its own padding); cp=2 through ``fsdp2``."""
    kwargs = {"activation_checkpointing": "full", "activation_checkpointing_every": 1}
    cases = [(_spec("llama", attention), padded_steps(VOCAB, "left", micro_batches=2))
             for attention in ("sdpa", "eager")]
    _check(ranks2.run(cp_cases, cases, mesh_shape={"dp_shard": 1, "cp": 2}, kwargs=kwargs, timeout=180)[0], cases)


@pytest.mark.distributed
def test_two_forwards_with_tp_and_packed_moe_with_ep(ranks4):
    """Two forwards per backward with full checkpointing under cp=2 x tp=2 (sequence parallel), padded; and
    Qwen3-MoE packed rows under dp_shard=2 x cp=2 with ep_size=2, two micro-batches."""
    checkpointing = {"activation_checkpointing": "full", "activation_checkpointing_every": 1}
    tp_case = [(_spec("mistral-window5", "sdpa"), padded_steps(VOCAB, "right", micro_batches=2))]
    _check(ranks4.run(cp_cases, tp_case, mesh_shape={"dp_shard": 1, "cp": 2, "tp": 2},
                      kwargs={"sequence_parallel": True, **checkpointing}, timeout=180)[0], tp_case)
    moe = ModelSpec("qwen3_moe", overrides={"attn_implementation": "eager", "num_experts": 4,
                                            "num_experts_per_tok": 2})
    steps = packed_steps(VOCAB)
    moe_case = [(moe, [micro * 2 for micro in steps])]  # the same packed batch twice: two forwards
    _check(ranks4.run(cp_cases, moe_case, mesh_shape={"dp_shard": 2, "cp": 2},
                      kwargs={"ep_size": 2, **checkpointing}, timeout=180)[0], moe_case)


def forward_unsharded(tokens: int) -> None:
    """Runs on every rank: a cp=2 model fed ``tokens`` tokens that shard_batch did not cut."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp"))
    model = meshplan.parallelize(ModelSpec().build(), mesh)
    ids = torch.zeros(1, tokens, dtype=torch.long)
    model(input_ids=ids, labels=ids)


@pytest.mark.distributed
def test_unsharded_batch_is_refused_on_every_rank(ranks2):
    with pytest.raises(RankError) as info:
        ranks2.run(forward_unsharded, 30, timeout=180)
    assert sorted(info.value.errors) == [0, 1]
    for error in info.value.errors.values():
        assert isinstance(error, UnshardedInputError) and "shard_batch" in str(error), error
