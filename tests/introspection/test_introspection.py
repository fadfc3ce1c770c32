"""One answer per question about a model: attention modules, sequence mixers, blocks, configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshplan.conformance.check import build_model, tiny_config
from meshplan.introspection import (
    attention_modules,
    head_attention_modules,
    mlp_name,
    model_configs,
    sequence_mixers,
    text_config,
)
from meshplan.introspection.mixers import mixer_kind


def _meta_model(model_type: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(tiny_config(model_type))


class ToySelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = 8
        self.k_proj = nn.Linear(16, 16)


class ToyAttention(nn.Module):
    """A wrapper named like attention (BERT's ``BertAttention`` around ``BertSelfAttention``)."""

    def __init__(self) -> None:
        super().__init__()
        self.self = ToySelfAttention()
        self.output = nn.Linear(16, 16)


class ShortConv(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, groups=channels)


class Recurrence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(4))


class Layer(nn.Module):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer, self.mlp = mixer, nn.Linear(16, 16)


class ToyLM(nn.Module):
    """A language model beside a tower that convolves its own inputs (an audio encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([Layer(ToyAttention()), Layer(ShortConv()), Layer(Recurrence())])
        self.audio_tower = nn.Module()
        self.audio_tower.layers = nn.ModuleList([Layer(ShortConv()), Layer(ShortConv())])

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens


def test_attention_modules_are_the_innermost_attention_not_wrappers_or_layers():
    model = ToyLM()
    assert list(attention_modules(model)) == ["layers.0.mixer.self"]
    zamba2 = _meta_model("zamba2")  # Zamba2AttentionDecoderLayer holds the attention: the old CP check took the layer
    classes = {type(module).__name__ for module in attention_modules(zamba2).values()}
    assert classes == {"Zamba2Attention"}


def test_latent_attention_is_attention_without_head_marks():
    """DeepSeek-V3's multi-head latent attention: the old TP copy did not see it as attention at all, the old CP
    copy did; it is attention, whose heads the TP head checks do not read."""
    model = _meta_model("deepseek_v3")
    attention = attention_modules(model)
    assert attention and all(type(m).__name__ == "DeepseekV3Attention" for m in attention.values())
    assert head_attention_modules(model) == {}
    llama = _meta_model("llama")
    assert head_attention_modules(llama).keys() == attention_modules(llama).keys() != set()


def test_sequence_mixers_of_the_language_model_only():
    found = [(m.fqn, m.kind, m.type_name) for m in sequence_mixers(ToyLM())]
    assert found == [("layers.1.mixer", "convolution", "ShortConv"), ("layers.2.mixer", "state_space", "Recurrence")]


def test_mixer_kinds():
    assert mixer_kind(ShortConv()) == "convolution"
    assert mixer_kind(ShortConv(16).conv) is None  # the convolution itself is a part of its mixer
    assert mixer_kind(nn.Conv1d(16, 16, 3)) is None and mixer_kind(ToyAttention()) is None
    lfm2 = {m.fqn: m.kind for m in sequence_mixers(_meta_model("lfm2_moe"))}
    assert set(lfm2.values()) == {"short_conv"}
    assert {m.kind for m in sequence_mixers(_meta_model("nemotron_h"))} == {"mamba2"}
    assert {m.kind for m in sequence_mixers(_meta_model("qwen3_next"))} == {"linear_attention"}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gemma3_text", "gpt_oss", "mistral"])
def test_attention_only_models_have_no_sequence_mixer(model_type):
    assert sequence_mixers(_meta_model(model_type)) == []


def test_model_configs_and_text_config():
    llama = _meta_model("llama")
    assert model_configs(llama) == (llama.config,) and text_config(llama.config) is llama.config
    gemma3 = _meta_model("gemma3")  # a vision-language model: its text config is a sub-config
    assert model_configs(gemma3) == (gemma3.config, gemma3.config.text_config)
    assert model_configs(nn.Linear(2, 2)) == ()


def test_mlp_name():
    assert mlp_name(Layer(ShortConv())) == "mlp"
    assert mlp_name(ShortConv()) is None


def test_text_config_when_transformers_finds_it_ambiguous():
    """Several text sub-configs make ``get_text_config()`` raise (the old activation-checkpointing copy let that
    ValueError out); the one named ``text_config`` is the language model's."""

    class Config:
        text_config = object()

        def get_text_config(self):
            raise ValueError("Multiple valid text configs were found")

    config = Config()
    assert text_config(config) is Config.text_config


@pytest.mark.parametrize("model_type", ["zamba2", "olmo_hybrid"])
def test_a_hybrid_stack_mixing_block_classes_is_one_block_container_and_fsdp_wraps_each_block(model_type, fake_pg):
    """Hybrid decoders keep layers of two classes in one list; each layer is still a block (its own FSDP unit),
    while a list of unrelated modules is not a block container."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    import meshplan
    from meshplan.introspection.blocks import find_block_containers

    model = _meta_model(model_type)
    assert [fqn for fqn, _ in find_block_containers(model)] == ["model.layers"]
    assert len({type(block) for block in model.model.layers}) == 2
    with fake_pg(2):
        meshplan.parallelize(model, init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)))
    assert all(isinstance(block, FSDPModule) for block in model.model.layers)
    holder = nn.Module()
    holder.parts = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), ToyAttention()])
    assert find_block_containers(holder) == []
