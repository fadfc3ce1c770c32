"""Stage modules in one process: the stages of a Hugging Face model, chained by hand, compute the whole model's
logits (no ranks: each stage's own forward is what the schedule runs)."""

from __future__ import annotations

import pytest
import torch

from meshplan.pipeline.split import find_layout, ranges_from_bounds
from meshplan.pipeline.stages import StageInfo, build_stage, stage_config
from tests.support import relative_error, tiny_hf

#: layer 0 sliding, layer 1 full: a stage holding only layer 1 must still give it the full-attention mask
SLIDING_THEN_FULL = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}


def _chained(model: torch.nn.Module, ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    layout = find_layout(model)
    ranges = ranges_from_bounds(bounds, layout.num_blocks)
    stages = [build_stage(model, layout, StageInfo(i, len(ranges), r), in_place=i == len(ranges) - 1)
              for i, r in enumerate(ranges)]
    activation = ids
    for stage in stages:
        activation = stage(activation)
    return activation


@pytest.mark.parametrize(("model_type", "overrides"), [
    ("cohere2", SLIDING_THEN_FULL),
    ("gemma2", SLIDING_THEN_FULL),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4, "use_sliding_window": True,
               "max_window_layers": 1}),
    ("granite", {"embedding_multiplier": 3.0}),  # scales inputs_embeds too: a later stage must not scale again
])
def test_stages_chained_by_hand_give_the_whole_models_logits(model_type, overrides):
    model = tiny_hf(model_type, tie_word_embeddings=False, **overrides).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = _chained(model, ids, [1])
    assert relative_error(got, expected) < 1e-5


def test_stage_config_lists_only_the_kept_blocks():
    config = tiny_hf("cohere2", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2).config
    config.eos_token_id = [1, 2, 3, 4]
    staged = stage_config(config, [1, 2], 4)
    assert staged.eos_token_id == [1, 2, 3, 4]
    assert staged.layer_types == ["full_attention", "sliding_attention"] and staged.num_hidden_layers == 4
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2


def test_a_multimodal_model_splits_at_its_text_configs_plan():
    """Gemma 3's config declares no base_model_pp_plan, its text config does: the vision tower and projector go to
    the first stage with the embeddings, the head to the last; text-only stages compute the whole model's logits."""
    from meshplan.conformance.check import build_model, make_batch
    from meshplan.conformance.pipeline_check import untied_config

    config = untied_config("gemma3")
    model = build_model(config).eval()
    layout = find_layout(model)
    assert layout.first == ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens")
    assert (layout.blocks, layout.last) == ("model.language_model.layers", ("model.language_model.norm", "lm_head"))
    ids, _ = make_batch(config)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = _chained(model, ids, [1])
    assert relative_error(got, expected) < 1e-5


def test_deepseek_v4_hyper_connection_streams_cross_the_stage_boundary():
    """DeepSeek-V4's blocks pass 4-D hyper-connection streams: a later stage's first block gets them as they are
    (not the model's widening of its inputs_embeds), and the built-in pp plan puts ``hc_head`` on the last stage."""
    from meshplan.conformance.check import build_model, make_batch
    from meshplan.conformance.pipeline_check import untied_config
    from meshplan.plans.deepseek import DEEPSEEK_V4_PP

    config = untied_config("deepseek_v4")
    model = build_model(config).eval()
    ids, _ = make_batch(config)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        layout = find_layout(model, DEEPSEEK_V4_PP["pp"])
        stages = [build_stage(model, layout, StageInfo(i, 2, r), in_place=i == 1)
                  for i, r in enumerate(ranges_from_bounds([1], layout.num_blocks))]
        streams = stages[0](ids)
        got = stages[1](streams)
    assert streams.dim() == 4 and relative_error(got, expected) < 1e-5
