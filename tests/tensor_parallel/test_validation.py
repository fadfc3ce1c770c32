"""Validation before any collective: unmatched keys, head counts, tied parameters; the plan report."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

import meshplan
from meshplan import StyleModuleTypeError, TensorParallelSizeError, UnmatchedPlanKeyError
from meshplan.core.errors import TiedParameterError
from meshplan.plugins.testing import RankError
from meshplan.tensor_parallel.apply import apply_tensor_parallel
from meshplan.tensor_parallel.plan import ResolvedPlan
from meshplan.tensor_parallel.styles.composition import KeepReplicated
from tests.plans.helpers import build
from tests.support import TensorParallelOnly, tp_mesh


@pytest.fixture
def mesh2(fake_pg):
    """A 2-rank TP mesh on a fake process group, with the ``tp_test`` strategy registered."""
    meshplan.register_strategy(TensorParallelOnly)
    with fake_pg(2):
        yield tp_mesh()


def test_key_matching_nothing_names_the_key_and_closest_modules(mesh2):
    plan = {"model.layers.*.mlp.up_projj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    with pytest.raises(UnmatchedPlanKeyError) as info:
        meshplan.prepare(build("llama"), mesh2, strategy="tp_test", tp_plan=plan)
    message = str(info.value)
    assert "'model.layers.*.mlp.up_projj'" in message and "model.layers.*.mlp.up_proj" in message
    assert "strict=False" in message


def test_not_strict_warns_once_and_skips_the_key(mesh2, caplog):
    plan = {"model.layers.*.mlp.nope": "colwise", "model.layers.*.mlp.up_proj": "colwise"}
    with caplog.at_level(logging.WARNING, logger="meshplan"):
        prepared = meshplan.prepare(build("llama"), mesh2, strategy="tp_test", tp_plan=plan, strict=False)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert list(prepared.plan.styles) == ["model.layers.*.mlp.up_proj"]


def test_report_lists_matches_styles_and_linears_left_replicated(mesh2):
    plan = {"model.layers.*.self_attn.q_proj": "colwise", "lm_head": KeepReplicated()}
    report = meshplan.prepare(build("llama"), mesh2, strategy="tp_test", tp_plan=plan, strict=True).report()
    entry = report["plan"]["entries"][0]
    assert entry["modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert entry["style"].startswith("ColwiseParallel")
    replicated = report["plan"]["replicated_linears"]
    assert "model.layers.0.mlp.down_proj" in replicated and "lm_head" in replicated  # kept, not sharded
    assert "model.layers.0.self_attn.q_proj" not in replicated


def test_tied_lm_head_sharded_alone_is_refused_before_any_collective(mesh2):
    model = build("gemma2")
    with pytest.raises(TiedParameterError, match="lm_head.weight"):
        meshplan.prepare(model, mesh2, strategy="tp_test", tp_plan={"lm_head": "colwise_rep"})


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight


class Opaque(ParallelStyle):
    """A style whose parameter layout validation cannot predict (checked after applying instead)."""

    def _apply(self, module, device_mesh):
        return ColwiseParallel(output_layouts=Replicate())._apply(module, device_mesh)


def test_ties_survive_tensor_parallel_and_mismatches_after_applying_are_typed(mesh2):
    model = Tied()
    plan = ResolvedPlan({"embed": RowwiseParallel(input_layouts=Replicate()),
                         "head": ColwiseParallel(output_layouts=Replicate())}, "test",
                        matches={"embed": ["embed"], "head": ["head"]})
    apply_tensor_parallel(model, mesh2, plan)
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == 1
    model = Tied()
    plan = ResolvedPlan({"head": Opaque()}, "test", matches={"head": ["head"]})
    with pytest.raises(TiedParameterError, match="embed.weight: unsharded"):
        apply_tensor_parallel(model, mesh2, plan)


def _parallelize_three_heads() -> None:
    meshplan.register_strategy(TensorParallelOnly)
    model = build("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    meshplan.parallelize(model, tp_mesh(), strategy="tp_test")


@pytest.mark.distributed
def test_heads_not_divisible_is_a_typed_error_on_every_rank(ranks2):
    with pytest.raises(RankError) as info:
        ranks2.run(_parallelize_three_heads, timeout=120)
    errors = info.value.errors
    assert sorted(errors) == [0, 1]
    for error in errors.values():
        assert isinstance(error, TensorParallelSizeError), error
        assert "num_attention_heads (3) must be divisible by TP size (2)" in str(error)
    assert ranks2.run(torch.distributed.get_world_size) == [2, 2]  # the pool is healthy: nobody hung


@pytest.mark.parametrize("style", ["colwise", "rowwise", ColwiseParallel(), RowwiseParallel(), "packed_colwise"])
def test_linear_styles_on_a_conv1d_are_refused_at_validation(mesh2, style):
    """GPT-2's ``Conv1D`` is no ``nn.Linear``: torch's styles would fail inside with NotImplementedError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(StyleModuleTypeError) as info:
        meshplan.prepare(model, mesh2, strategy="tp_test", tp_plan={"transformer.h.*.attn.c_attn": style})
    assert "'transformer.h.0.attn.c_attn'" in str(info.value) and "Conv1D" in str(info.value)


def test_qwen3_and_phi3_reports_are_deterministic(mesh2):
    """Two preparations of the same model give equal reports, with no object addresses in them."""
    reports = {}
    for name in ("qwen3", "phi3"):
        first, second = (str(meshplan.prepare(build(name), mesh2, strategy="tp_test").report()) for _ in range(2))
        assert first == second and " at 0x" not in first
        reports[name] = first
    assert "ReplicatedWithGradAllReduce()" in reports["qwen3"] and "Phi3LocalHeads()" in reports["phi3"]


def test_head_counts_of_a_heterogeneous_config_are_checked_per_layer_kind():
    """Dots 3's released config has 64-head sliding-window layers and 128-head full-attention layers; its global
    ``num_attention_heads`` raises in transformers, so the check reads every layer's config."""
    from transformers import AutoConfig

    from meshplan.tensor_parallel.validation import head_counts, validate_tp_size

    holder = nn.Module()
    holder.config = AutoConfig.for_model("dots3_note_text")
    assert head_counts(holder.config) == {(64, 64), (128, 128)}
    validate_tp_size(holder, 64)
    with pytest.raises(TensorParallelSizeError, match=r"num_attention_heads \(64\) .* TP size \(128\)"):
        validate_tp_size(holder, 128)


def test_heads_need_to_divide_only_when_the_plan_splits_attention(mesh2):
    """DeepSeek-V4 has one KV head and a transformers plan that splits only its experts: TP=2 is accepted and the
    attention stays whole. A plan that splits the attention of a one-KV-head model replicates its KV heads
    (tests/tensor_parallel/test_kv_replication.py); KV heads that neither divide by the TP size nor divide it are
    refused before anything runs."""
    from meshplan.conformance.check import build_model, tiny_config
    from meshplan.core.errors import TensorParallelSizeError
    from meshplan.tensor_parallel.kv_replication import ReplicatedKeyValueProjection

    config = tiny_config("deepseek_v4")
    config.num_key_value_heads = 1
    prepared = meshplan.prepare(build_model(config), mesh2, strategy="tp_test")
    assert prepared.plan.styles and not any("attn" in key for key in prepared.plan.styles), prepared.plan.styles
    styles = meshplan.prepare(build("llama", num_key_value_heads=1), mesh2, strategy="tp_test").plan.styles
    assert isinstance(styles["model.layers.*.self_attn.k_proj"], ReplicatedKeyValueProjection), styles
    with pytest.raises(TensorParallelSizeError, match=r"num_key_value_heads \(3\) must be divisible by TP size"):
        meshplan.prepare(build("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3), mesh2,
                         strategy="tp_test")
