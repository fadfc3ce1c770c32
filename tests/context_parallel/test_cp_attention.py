"""Context-parallel attention applied by hand on 2 gloo ranks: 3 SGD steps equal one process (fp32, 1e-5).

Llama, Qwen3, Mistral (sliding window 5 over 16 tokens, so the window crosses chunk and rank borders) and
Qwen3 with a full and a sliding-window layer, eager and SDPA attention. Gradients are averaged over the two
CP ranks by hand here; the ``fsdp2`` wiring is tested in ``test_cp_fsdp2.py``.
"""

from __future__ import annotations

import functools

import pytest

from tests.context_parallel.harness import cp_by_hand, padded_batch, padded_cp, padded_reference, reference_sgd
from tests.parity import ModelSpec, assert_grad_parity, assert_parity, max_relative_error

SPECS = {
    "llama": ModelSpec("llama"),
    "qwen3": ModelSpec("qwen3"),
    "mistral-window5": ModelSpec("mistral", overrides={"sliding_window": 5}),
    # layer 0 full attention, layer 1 a sliding window: two masks per forward
    "qwen3-mixed-window5": ModelSpec("qwen3", overrides={"use_sliding_window": True, "sliding_window": 5,
                                                         "max_window_layers": 1}),
}


def spec(name: str, attention: str) -> ModelSpec:
    base = SPECS[name]
    return ModelSpec(base.model_type, base.seed, {**base.overrides, "attn_implementation": attention})


@functools.cache
def expected(name: str, attention: str):
    return reference_sgd(spec(name, attention))


@pytest.mark.distributed
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(SPECS))
def test_cp2_by_hand_matches_one_process(ranks2, name, attention):
    result = ranks2.run(cp_by_hand, spec(name, attention), timeout=120)[0]
    assert_parity(result, expected(name, attention), rtol=1e-5)
    assert_grad_parity(result, expected(name, attention), rtol=1e-5)


@pytest.mark.distributed
def test_padding_mask_and_gathered_logits(ranks2):
    """A right-padded batch: the padding mask is gathered for the keys; logits gathered back in order."""
    model_spec = spec("mistral-window5", "sdpa")
    got = ranks2.run(padded_cp, model_spec, timeout=120)[0]
    want = padded_reference(model_spec)
    assert got.keys() == want.keys()
    valid = padded_batch(256)["attention_mask"].bool()  # a padded query may attend to nothing (window 5 over
    got["logits"], want["logits"] = got["logits"][valid], want["logits"][valid]  # padding): undefined output
    for name in want:
        assert max_relative_error(got[name], want[name]) <= 1e-5, name


@pytest.mark.distributed
def test_query_blocks_smaller_than_a_chunk(ranks2):
    """Blocks of 3 queries in chunks of 4 (each block attends its own key range): still one process's numbers."""
    result = ranks2.run(cp_by_hand, spec("mistral-window5", "eager"), "allgather", 3, timeout=120)[0]
    assert_parity(result, expected("mistral-window5", "eager"), rtol=1e-5)
    assert_grad_parity(result, expected("mistral-window5", "eager"), rtol=1e-5)
