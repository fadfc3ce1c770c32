"""Sliding-window attention under pp=2 against one process (3 SGD steps, fp32: the loss of every step, this rank's
stage gradients every step and the gathered parameters within 1e-5): Mistral with a window shorter than the
sequence on every layer, and Gemma2, whose layers alternate sliding and full attention by ``config.layer_types``,
split so that the second stage starts on an odd layer (a stage indexing ``layer_types`` by its own block
positions would give each of its layers the other kind)."""

from __future__ import annotations

import pytest
import torch

from tests.parity import ModelSpec, batches
from tests.pipeline.harness import BATCH
from tests.pipeline.lockstep_ranks import assert_lockstep_parity, lockstep_parity

WINDOW = 4  # tokens; the sequences are 16 long
MISTRAL = ModelSpec("mistral", overrides={"num_hidden_layers": 4, "sliding_window": WINDOW,
                                          "tie_word_embeddings": False})
GEMMA2 = ModelSpec("gemma2", overrides={"num_hidden_layers": 4, "sliding_window": WINDOW,
                                        "tie_word_embeddings": False})
CASES = {"mistral": (MISTRAL, None), "gemma2-split-at-1": (GEMMA2, [1])}


def _loss(spec: ModelSpec, **overrides) -> float:
    model = ModelSpec(spec.model_type, overrides=spec.overrides | overrides).build()
    data = batches(model.config.vocab_size, 1, BATCH)[0]
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


@pytest.mark.parametrize("case", list(CASES))
def test_sliding_window_model_under_pp2_matches_one_process(ranks2, case) -> None:
    spec, split = CASES[case]
    assert _loss(spec) != _loss(spec, sliding_window=64), "the window does not change the loss: nothing tested"
    results = ranks2.run(lockstep_parity, spec, {"pp": 2, "dp_shard": 1},
                         {"pp_schedule": "1F1B", "pp_microbatches": 2, "pp_split": split}, timeout=300)
    assert_lockstep_parity(results)
