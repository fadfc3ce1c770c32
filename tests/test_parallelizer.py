"""``meshplan.parallelizer``: NeMo AutoModel's parallelizer surface, one test per function and branch."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

import meshplan
from meshplan import parallelizer as P
from meshplan.compat.nvfsdp import LEGACY_KEYWORDS
from meshplan.core.errors import PlanSourceError, UnmatchedPlanKeyError
from meshplan.state import fsdp_state
from meshplan.strategies.megatron_fsdp import MegatronFSDPStrategy
from tests.compat.fakes import FakeMesh
from tests.support import Block, TinyStack, tiny_hf

STACK_PLAN = {"layers.*.up": ColwiseParallel(), "layers.*.down": RowwiseParallel()}
NOT_A_PLAN = 42


def stack_plan():
    return dict(STACK_PLAN)


def tiny_vlm():
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    return Gemma3ForConditionalGeneration(AutoConfig.for_model("gemma3", text_config=text, vision_config=vision))


# --- HAVE_NVFSDP ------------------------------------------------------------------------------------
def test_have_nvfsdp_matches_reality_and_imports_nothing():
    code = ("import sys, meshplan.parallelizer as p\n"
            "assert 'megatron_fsdp' not in sys.modules and 'nvfsdp' not in sys.modules\n"
            "try:\n    import megatron_fsdp\n    real = True\nexcept ImportError:\n    real = False\n"
            "print(p.HAVE_NVFSDP == real)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


# --- apply_fsdp2_sharding_recursively ---------------------------------------------------------------
class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.tower = nn.Sequential(nn.ModuleList(Block() for _ in range(2)))
        self.layers[0].inner = nn.ModuleList([nn.Linear(4, 4)])  # inside a sharded item: not descended into


def reshards_after_forward(module: FSDPModule) -> bool:
    return fsdp_state.reshards_after_forward(module)


def test_apply_fsdp2_sharding_recursively(fake_pg):
    model = Nested()
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        P.apply_fsdp2_sharding_recursively(model, mesh, MixedPrecisionPolicy())
        assert [reshards_after_forward(b) for b in model.layers] == [True, True, False]
        assert [reshards_after_forward(b) for b in model.tower[0]] == [True, False]
        assert not isinstance(model.layers[0].inner[0], FSDPModule)
        assert not isinstance(model, FSDPModule) and not isinstance(model.tower, FSDPModule)


# --- get_hf_tp_shard_plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("head_style", ["colwise_rep", "colwise_gather_output"])
def test_hf_plan_untied_adds_vocab_parallel_embedding_and_sharded_logits(head_style):
    model = tiny_hf("llama", tie_word_embeddings=False)
    model._tp_plan = {"lm_head": head_style}  # transformers 5.x spells NeMo's colwise_rep colwise_gather_output
    plan = P.get_hf_tp_shard_plan(model)
    assert isinstance(plan["model.embed_tokens"], RowwiseParallel)
    assert plan["model.embed_tokens"].input_layouts == (Replicate(),)
    head = plan["lm_head"]
    assert isinstance(head, ColwiseParallel) and head.output_layouts == (Shard(-1),) and not head.use_local_output
    assert isinstance(plan["model.layers.*.self_attn.q_proj"], ColwiseParallel)


def test_hf_plan_tied_lm_head_is_never_sharded_apart_from_its_embedding():
    model = tiny_hf("llama", tie_word_embeddings=True)
    plan = P.get_hf_tp_shard_plan(model)
    assert ("lm_head" in plan) == ("model.embed_tokens" in plan)
    assert not (isinstance(plan.get("lm_head"), ColwiseParallel) and plan["lm_head"].output_layouts == (Shard(-1),))


def test_hf_plan_of_a_vlm_uses_the_language_model_prefix():
    plan = P.get_hf_tp_shard_plan(tiny_vlm())
    assert "model.language_model.layers.*.self_attn.q_proj" in plan


def test_hf_plan_missing_is_an_assertion_error():
    with pytest.raises(AssertionError, match="Hugging Face tp plan is not supported"):  # the reference's text
        P.get_hf_tp_shard_plan(TinyStack())


class Declared(nn.Module):
    """A model that declares a plan but has no input/output embedding modules and none of the planned modules."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=tie)
        self.model = nn.Module()
        self.model._tp_plan = {"layers.*.attn.q": "colwise"}
        self._tp_plan = {"lm_head": "colwise_rep", "extra": "rowwise_rep"}


def test_hf_plan_is_translated_without_matching_and_parallelize_still_matches_strictly(fake_pg):
    untied = P.get_hf_tp_shard_plan(Declared(tie=False))
    assert list(untied) == ["model.layers.*.attn.q", "lm_head", "extra", "model.embed_tokens"]
    assert isinstance(untied["model.layers.*.attn.q"], ColwiseParallel)
    assert untied["extra"].input_layouts == (Replicate(),)
    assert untied["model.embed_tokens"].input_layouts == (Replicate(),)  # added by name: vocab-parallel
    assert untied["lm_head"].output_layouts == (Shard(-1),) and untied["lm_head"].use_local_output is False
    tied = P.get_hf_tp_shard_plan(Declared(tie=True))
    assert "model.embed_tokens" not in tied and tied["lm_head"].output_layouts == (Replicate(),)
    model = TinyStack()
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard_cp", "tp"))
        with pytest.raises(UnmatchedPlanKeyError, match="model.layers.*attn.q"):
            meshplan.prepare(model, mesh, tp_plan=P.get_hf_tp_shard_plan(Declared(tie=False)))


def test_hf_plan_unknown_style_is_the_reference_value_error():
    model = Declared(tie=True)
    model._tp_plan = {"lm_head": "diagonal"}
    with pytest.raises(ValueError, match="Unknown parallel style 'diagonal'"):
        P.get_hf_tp_shard_plan(model)


# --- import helpers ---------------------------------------------------------------------------------
def test_import_helpers(caplog):
    assert P.import_class_from_path("torch.optim.AdamW") is torch.optim.AdamW
    with caplog.at_level(logging.WARNING, logger="meshplan"):
        classes = P.import_classes_from_paths(["torch.nn.Linear", "no_such_pkg.Thing", "torch.nn.Nope"])
    assert classes == [nn.Linear]
    assert "no_such_pkg.Thing" in caplog.text and "torch.nn.Nope" in caplog.text


# --- translate_to_torch_parallel_style --------------------------------------------------------------
def test_translate_known_styles_fresh_each_time():
    assert P.translate_to_torch_parallel_style("colwise_rep").output_layouts == (Replicate(),)
    assert P.translate_to_torch_parallel_style("rowwise_rep").input_layouts == (Replicate(),)
    assert isinstance(P.translate_to_torch_parallel_style("sequence_parallel"), SequenceParallel)
    assert isinstance(P.translate_to_torch_parallel_style("embedding_rowwise"), RowwiseParallel)
    assert P.translate_to_torch_parallel_style("colwise") is not P.translate_to_torch_parallel_style("colwise")


def test_translate_errors():
    with pytest.raises(ValueError, match="Unknown parallel style"):
        P.translate_to_torch_parallel_style("diagonal")
    with pytest.raises(ValueError) as info:
        P.translate_to_torch_parallel_style(3)
    assert isinstance(info.value, AssertionError)


# --- validate_tp_mesh -------------------------------------------------------------------------------
def test_validate_tp_mesh(fake_pg):
    model = tiny_hf("llama", num_attention_heads=4, num_key_value_heads=2)
    with fake_pg(4):
        P.validate_tp_mesh(model, init_device_mesh("cpu", (4, 1), mesh_dim_names=("dp", "tp"))["tp"])  # no-op
        tp4 = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        P.validate_tp_mesh(model, tp4)  # 2 KV heads divide TP=4: replicated
        model.config.num_attention_heads, model.config.num_key_value_heads = 12, 3
        with pytest.raises(AssertionError, match=r"num_key_value_heads \(3\) must be divisible by TP size \(4\)"):
            P.validate_tp_mesh(model, tp4)
        vlm = tiny_vlm()
        vlm.config.text_config.num_key_value_heads = 3
        with pytest.raises(AssertionError, match="num_key_value_heads"):
            P.validate_tp_mesh(vlm, tp4)  # heads come from the VLM's text config


# --- get_lm_ac_layers -------------------------------------------------------------------------------
def test_get_lm_ac_layers_returns_the_container_itself():
    llama = tiny_hf("llama")
    assert P.get_lm_ac_layers(llama) is llama.model.layers
    vlm = tiny_vlm()
    assert P.get_lm_ac_layers(vlm) is vlm.model.language_model.layers
    assert P.get_lm_ac_layers(TinyStack()) == []
    plain = SimpleNamespace(model=SimpleNamespace(layers=["a", "b"]))  # duck-typed: a plain list counts
    assert P.get_lm_ac_layers(plain) is plain.model.layers
    vlm_like = SimpleNamespace(language_model=SimpleNamespace(layers=("x",)), model=SimpleNamespace(layers=[]))
    assert P.get_lm_ac_layers(vlm_like) == ("x",)


# --- _get_parallel_plan -----------------------------------------------------------------------------
def test_parallel_plan_from_dict_and_paths():
    assert list(P._get_parallel_plan(TinyStack(), tp_shard_plan=STACK_PLAN)) == list(STACK_PLAN)
    for path in ("tests.test_parallelizer.STACK_PLAN", "tests.test_parallelizer.stack_plan"):
        assert isinstance(P._get_parallel_plan(TinyStack(), tp_shard_plan=path)["layers.*.up"], ColwiseParallel)
    for bad in ("tests.test_parallelizer.NOT_A_PLAN", 3.5):
        with pytest.raises(ValueError, match="dict"):
            P._get_parallel_plan(TinyStack(), tp_shard_plan=bad)


def test_parallel_plan_registered_provider_then_hf_fallback():
    llama_sp = P._get_parallel_plan(tiny_hf("llama"), sequence_parallel=True)
    assert any(isinstance(style, SequenceParallel) for style in llama_sp.values())
    granite = tiny_hf("granite")  # no built-in provider: the Hugging Face plan
    assert "model.layers.*.self_attn.q_proj" in P._get_parallel_plan(granite)
    with pytest.raises(AssertionError, match="sequence_parallel is not supported"):
        P._get_parallel_plan(granite, sequence_parallel=True)


# --- the strategies ---------------------------------------------------------------------------------
def test_fsdp2_strategy_parallelize_signature_and_defaults(fake_pg):
    names = list(inspect.signature(P.fsdp2_strategy_parallelize).parameters)
    assert names == ["model", "device_mesh", "mp_policy", "offload_policy", "sequence_parallel",
                     "activation_checkpointing", "tp_shard_plan", "dp_replicate_mesh_name",
                     "dp_shard_cp_mesh_name", "tp_mesh_name"]
    model = tiny_hf("llama")
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard_cp",))
        result = P.fsdp2_strategy_parallelize(model, mesh)
    assert result is model and isinstance(model, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    assert meshplan.get_report(model)["strategy"] == "fsdp2"


def test_nvfsdp_strategy_parallelize_forwards_every_option(monkeypatch):
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return kwargs["module"], kwargs["optimizer"]

    monkeypatch.setattr(P, "nvfsdp_fully_shard", record)
    signature = inspect.signature(P.nvfsdp_strategy_parallelize)
    model, optimizer, mesh = TinyStack(), object(), FakeMesh(dp=2, cp=1, tp=1)
    assert P.nvfsdp_strategy_parallelize(model, mesh, optimizer) == (model, optimizer)
    assert seen.pop("module") is model and seen.pop("optimizer") is optimizer and seen.pop("device_mesh") is mesh
    assert seen.pop("dp_cp_mesh_name") == "dp" and seen.pop("fsdp_unit_modules") is None
    renamed = {LEGACY_KEYWORDS.get(k, k): v for k, v in seen.items()}
    expected = {k: p.default for k, p in signature.parameters.items()
                if k not in ("model", "device_mesh", "optimizer", "tp_shard_plan", "nvfsdp_unit_modules")}
    assert renamed == expected
    MegatronFSDPStrategy().make_options(renamed)  # every legacy keyword is a real strategy option


def test_nvfsdp_on_cpu_is_an_assertion_error(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        with pytest.raises(AssertionError, match="CUDA"):
            P.nvfsdp_strategy_parallelize(TinyStack(), mesh)


def test_fsdp2_strategy_parallelize_bad_plan_path_is_the_reference_value_error(fake_pg):
    """The reference resolves ``tp_shard_plan`` with ``_get_parallel_plan``: a path that does not import is a
    ``ValueError`` ("Custom parallel plan ... is not valid"), not an ``ImportError``; nothing is sharded."""
    model = TinyStack()
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard_cp", "tp"))
        with pytest.raises(ValueError, match=r"Custom parallel plan 'no_such\.pkg\.PLAN' is not valid") as info:
            P.fsdp2_strategy_parallelize(model, mesh, tp_shard_plan="no_such.pkg.PLAN")
    assert isinstance(info.value, PlanSourceError) and not isinstance(info.value, ImportError)
    assert not isinstance(model, FSDPModule)
    assert all(not isinstance(p, DTensor) for p in model.parameters())


def test_fsdp2_strategy_parallelize_path_to_a_plan_shards_like_the_dict(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard_cp", "tp"))
        model = P.fsdp2_strategy_parallelize(TinyStack(), mesh, tp_shard_plan="tests.test_parallelizer.STACK_PLAN")
    assert isinstance(model.layers[0].up.weight, DTensor)


# --- unshard_fsdp2_model ----------------------------------------------------------------------------
def unshard_then_fail():
    model = tiny_hf("llama")
    full = model.model.embed_tokens.weight.shape
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard_cp",))
    P.fsdp2_strategy_parallelize(model, mesh, mp_policy=MixedPrecisionPolicy())
    local = model.model.embed_tokens.weight.to_local().shape
    inside = None
    with pytest.raises(RuntimeError, match="body failed"), P.unshard_fsdp2_model(model):
        weight = model.model.embed_tokens.weight
        inside = tuple(weight.shape) if not isinstance(weight, DTensor) else tuple(weight.to_local().shape)
        raise RuntimeError("body failed")
    after = model.model.embed_tokens.weight
    return tuple(full), tuple(local), inside, isinstance(after, DTensor) and tuple(after.to_local().shape)


def test_unshard_reshards_after_an_exception(ranks2):
    full, local, inside, after = ranks2.run(unshard_then_fail)[0]
    assert local[0] == full[0] // 2
    assert inside == full
    assert after == local
