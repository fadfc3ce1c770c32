"""The Hugging Face fallback: merging, translation, embeddings, reporting of what torch cannot express."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import meshplan
from meshplan import PlanNotFoundError
from meshplan.core.errors import UntranslatableStyleError
from meshplan.parallelizer import get_hf_tp_shard_plan
from meshplan.plans.hf_translation import (
    REPLICABLE_STYLES,
    hf_tp_plan,
    merged_hf_plan,
    translate_hf_plan,
)
from meshplan.tensor_parallel.styles.local_parameters import ReplicatedWithGradAllReduce
from meshplan.tensor_parallel.vocabulary import BUILTIN_STYLES
from tests.plans.helpers import SMALL, build


def test_every_transformers_tp_style_is_translated_or_explicitly_handled():
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES as registered  # noqa: F401

    unexpressible = {"grouped_gemm", "ep_dispatch_experts"}  # expert parallel
    unknown = set(ALL_PARALLEL_STYLES.keys()) - set(BUILTIN_STYLES) - REPLICABLE_STYLES - unexpressible
    assert not unknown, f"transformers TP styles meshplan neither translates nor reports: {sorted(unknown)}"


def test_inner_language_model_plan_is_prefixed():
    plan = merged_hf_plan(build("gemma3_vlm"))
    assert plan["lm_head"] == "colwise_gather_output"
    assert plan["model.language_model.layers.*.self_attn.q_norm"] == "replicated_with_grad_allreduce"
    assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"


def test_config_plan_is_prefixed_by_its_base_model_when_instance_plans_are_missing():
    model = build("llama")
    model._tp_plan = None
    model.model._tp_plan = None
    plan = merged_hf_plan(model)
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
    assert plan["lm_head"] == "colwise_gather_output"  # class plan


def test_translation_follows_transformers_meanings():
    styles = translate_hf_plan(build("qwen3")).styles
    head = styles["lm_head"]
    assert isinstance(head, ColwiseParallel) and head.output_layouts == (Replicate(),)
    embed = styles["model.embed_tokens"]
    assert isinstance(embed, RowwiseParallel) and embed.input_layouts == (Replicate(),)
    assert isinstance(styles["model.layers.*.self_attn.k_norm"], ReplicatedWithGradAllReduce)


def without_entry(model, key: str):
    """``model`` with ``key`` removed from every plan transformers gave it (class plan via a subclass)."""
    model.__class__ = type(type(model).__name__, (type(model),), {"_tp_plan": {}})
    model._tp_plan = {k: v for k, v in model._tp_plan.items() if k != key}
    model.model._tp_plan = {k: v for k, v in model.model._tp_plan.items() if f"model.{k}" != key}
    assert key not in merged_hf_plan(model)
    return model


def test_untied_embedding_missing_from_the_plan_becomes_vocab_parallel():
    model = without_entry(build("llama"), "model.embed_tokens")
    embed = translate_hf_plan(model).styles["model.embed_tokens"]
    assert isinstance(embed, RowwiseParallel) and embed.input_layouts == (Replicate(),)


@pytest.mark.parametrize("dropped", ["lm_head", "model.embed_tokens"])
def test_tied_embedding_and_lm_head_are_sharded_together(dropped):
    model = without_entry(build("gemma2"), dropped)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    styles = translate_hf_plan(model).styles
    assert isinstance(styles["lm_head"], ColwiseParallel)  # weight Shard(0) ...
    assert isinstance(styles["model.embed_tokens"], RowwiseParallel)  # ... like the vocab-parallel embedding


def test_moe_entries_become_the_experts_style_and_the_moe_block_gathers_under_sequence_parallel():
    from transformers import MixtralConfig, MixtralForCausalLM

    from meshplan.experts.tp_styles import ExpertParamLayout, ExpertsTensorParallel

    model = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    plan = translate_hf_plan(model)
    experts = plan.styles["model.layers.*.mlp.experts"]
    assert isinstance(experts, ExpertsTensorParallel)  # packed_colwise on dim 1, rowwise on the last dim
    assert experts.params == {"gate_up_proj": ExpertParamLayout(1, 2), "down_proj": ExpertParamLayout(2)}
    assert not plan.left_replicated and not plan.untranslatable
    assert "model.layers.*.self_attn.q_proj" in plan.styles
    block = hf_tp_plan(model, sequence_parallel=True)["model.layers.*.mlp"]
    assert "PrepareHiddenStatesOutput(R -> S(1)" in repr(block)


def test_untranslatable_style_is_an_error_naming_the_entry():
    model = build("llama")
    model._tp_plan = {**model._tp_plan, "model.layers.*.self_attn.k_proj": "mla_kv_a_proj"}
    with pytest.raises(UntranslatableStyleError, match=r"model\.layers\.\*\.self_attn\.k_proj.*mla_kv_a_proj"):
        hf_tp_plan(model)


def test_nemo_get_hf_tp_shard_plan():
    model = build("llama")
    for spelling in ("colwise_gather_output", "colwise_rep"):  # transformers 5.x / NeMo names
        model._tp_plan = {**model._tp_plan, "lm_head": spelling}
        head = get_hf_tp_shard_plan(model)["lm_head"]
        assert isinstance(head, ColwiseParallel)
        assert head.output_layouts == (Shard(-1),) and head.use_local_output is False
    assert hf_tp_plan(model)["lm_head"].output_layouts == (Replicate(),)  # meshplan's fallback: full logits
    tied = build("gemma2")
    tied._tp_plan = {**tied._tp_plan, "lm_head": "colwise_rep"}
    assert get_hf_tp_shard_plan(tied)["lm_head"].output_layouts == (Replicate(),)  # tied: never vocab-only
    model = without_entry(build("llama"), "")
    model._tp_plan, model.model._tp_plan, model.config.base_model_tp_plan = {}, {}, None
    with pytest.raises(PlanNotFoundError, match="not supported") as info:
        get_hf_tp_shard_plan(model)
    assert isinstance(info.value, AssertionError)


def test_fallback_is_reached_last_through_the_mro():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = build("llama")
    model.__class__ = MyLlama
    assert "llama_plan" in meshplan.get_tp_plan(model).source
    assert "hf_tp_plan" in meshplan.get_tp_plan(build("starcoder2")).source
    classes = {row["model_class"] for row in meshplan.list_tp_plans()}
    assert "transformers.modeling_utils.PreTrainedModel" in classes
    assert "transformers.models.phi3.modeling_phi3.Phi3ForCausalLM" in classes


class GateColwise(ColwiseParallel):
    """A plugin's style (registered by name in the tests below)."""


def test_fallback_makes_style_names_through_the_style_registry():
    """A plugin's style name in a model's ``_tp_plan`` works, and an override of a built-in name reaches the
    fallback as it reaches explicit plans."""
    meshplan.register_style("plugin_colwise", GateColwise)
    model = build("starcoder2")
    model._tp_plan = {**model._tp_plan, "model.layers.*.mlp.c_fc": "plugin_colwise"}
    styles = meshplan.get_tp_plan(model).styles
    assert type(styles["model.layers.*.mlp.c_fc"]) is GateColwise

    meshplan.register_style("rowwise", lambda: RowwiseParallel(use_local_output=False), override=True)
    assert meshplan.get_tp_plan(build("starcoder2")).styles["model.layers.*.mlp.c_proj"].use_local_output is False
    explicit = meshplan.get_tp_plan(build("starcoder2"), tp_plan={"model.layers.*.mlp.c_proj": "rowwise"})
    assert explicit.styles["model.layers.*.mlp.c_proj"].use_local_output is False
