"""Context parallelism refuses the sequence mixers it cannot split, on every rank before any collective.

CP splits the sequence and wraps only the attention: a short convolution (LFM2), a Mamba mixer or a linear
attention would see only its rank's chunks (LFM2 under cp=2 trained with first-step gradients 51-63 % off one
process before this check). The models CP handles stay accepted.
"""

from __future__ import annotations

import pytest
from torch.distributed.device_mesh import init_device_mesh

from meshplan.context_parallel.apply import validate_context_parallel
from meshplan.core.errors import UnsupportedSequenceMixerError
from meshplan.plugins.testing import RankError
from tests.parity import ModelSpec

#: model type -> (tiny overrides, the mixer the error must name, its class, its kind)
MIXER_MODELS = {
    "lfm2": ({"layer_types": ["conv", "full_attention"]}, "model.layers.0.conv", "Lfm2ShortConv", "short_conv"),
    "bamba": ({"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 16,
               "attn_layer_indices": [1]}, "model.layers.0.mamba", "BambaMixer", "mamba2"),
    "jamba": ({"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
               "num_experts": 2, "mamba_d_state": 8, "mamba_dt_rank": 8}, "model.layers.0.mamba", "JambaMambaMixer",
              "mamba"),
    "qwen3_next": ({"layer_types": ["linear_attention", "full_attention"], "num_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16}, "model.layers.0.linear_attn", "Qwen3NextGatedDeltaNet",
                   "linear_attention"),
}
#: Models CP handles (by-hand and parallelize parity tests elsewhere): accepted by the same validation.
ACCEPTED = {"llama": {}, "qwen2": {}, "gemma2": {}, "gemma3_text": {}, "gpt_oss": {"num_local_experts": 2},
            "mistral": {"sliding_window": 5}, "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2}}


def parallelize_with_cp(spec: ModelSpec) -> None:
    """Runs on every rank: ``meshplan.parallelize`` on ``dp_shard=1 x cp=2``."""
    import meshplan

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp"))
    meshplan.parallelize(spec.build(), mesh)


@pytest.mark.distributed
@pytest.mark.parametrize("model_type", list(MIXER_MODELS))
def test_cp_refuses_a_sequence_mixer_on_every_rank(ranks2, model_type):
    overrides, fqn, class_name, kind = MIXER_MODELS[model_type]
    with pytest.raises(RankError) as info:
        ranks2.run(parallelize_with_cp, ModelSpec(model_type, overrides=overrides), timeout=120)
    assert sorted(info.value.errors) == [0, 1]
    messages = {str(error) for error in info.value.errors.values()}
    assert len(messages) == 1  # the same error on every rank
    assert all(isinstance(error, UnsupportedSequenceMixerError) for error in info.value.errors.values())
    assert f"{fqn} ({class_name}, {kind})" in messages.pop()


@pytest.mark.parametrize("model_type", list(ACCEPTED))
def test_cp_accepts_the_models_it_splits(model_type):
    model = ModelSpec(model_type, overrides=ACCEPTED[model_type]).build()
    validate_context_parallel(model, "allgather", "cpu")  # no error


def test_cp_names_a_layer_the_config_declares_recurrent():
    """MiniMax's lightning attention has no convolution or ``A_log``: its config's ``layer_types`` names it."""
    spec = ModelSpec("minimax", overrides={"layer_types": ["full_attention", "linear_attention"],
                                           "num_local_experts": 2})
    with pytest.raises(UnsupportedSequenceMixerError, match=r"model\.layers\.1 \(MiniMaxDecoderLayer, layer type "
                                                            r"'linear_attention'\)"):
        validate_context_parallel(spec.build(), "allgather", "cpu")


@pytest.mark.parametrize("implementation", ["allgather", "external"])
def test_cp_refuses_a_sequence_mixer_whoever_runs_the_attention(implementation):
    """``cp_implementation="external"`` leaves the attention to the training loop, but a convolution over a
    sequence slice is wrong whoever splits the sequence: refused as well."""
    overrides, fqn, class_name, kind = MIXER_MODELS["lfm2"]
    with pytest.raises(UnsupportedSequenceMixerError, match=rf"{fqn} \({class_name}, {kind}\)"):
        validate_context_parallel(ModelSpec("lfm2", overrides=overrides).build(), implementation, "cpu")
