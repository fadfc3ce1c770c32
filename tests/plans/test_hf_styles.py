"""The styles behind the Hugging Face fallback's model-dependent translations (multi-head latent attention,
``local_params`` with per-head parameters, shard-local norms/activations, unmatched keys): numerics of each style
on 2 gloo ranks against one process, and the translation of the transformers models that need them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from meshplan.core.errors import PlanError
from meshplan.plans.hf_translation import hf_tp_plan, translate_hf_plan
from meshplan.tensor_parallel.styles.local_parameters import LocalShardedParameters, ReplicatedWithGradAllReduce
from meshplan.tensor_parallel.styles.module_state import MlaKvAProjParallel
from meshplan.tensor_parallel.styles.traits import predicted_placement

HEADS, HIDDEN, LORA, ROPE, NOPE = 4, 8, 4, 2, 3


class TinyLatentAttention(nn.Module):
    """The gradient path of MLA keys: ``kv_a -> [compressed; rotary]``, compressed through a column-wise
    ``kv_b`` (this rank's heads), the rotary slice shared by every head, a row-wise output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.kv_a = nn.Linear(HIDDEN, LORA + ROPE)
        self.kv_b = nn.Linear(LORA, HEADS * NOPE)
        self.o = nn.Linear(HEADS * (NOPE + ROPE), HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compressed, rotary = self.kv_a(x).split([LORA, ROPE], dim=-1)
        keys = self.kv_b(compressed).unflatten(-1, (-1, NOPE))  # this rank's heads
        rotary = rotary.unsqueeze(-2).expand(*keys.shape[:-1], ROPE)
        return self.o(torch.cat([keys, torch.tanh(rotary)], dim=-1).flatten(-2))


class TinyHeadBias(nn.Module):
    """Per-head parameter next to column-wise heads (like attention sinks / Beam's ``gate_bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEADS * NOPE)
        self.bias = nn.Parameter(torch.randn(HEADS))
        self.o = nn.Linear(HEADS * NOPE, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.q(x).unflatten(-1, (-1, NOPE)) * self.bias[:, None]
        return self.o(torch.relu(heads).flatten(-2))


class TinyScaledMLP(nn.Module):
    """A parameterized activation between column-wise and row-wise projections (like Apertus' xIELU)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 16)
        self.act_fn = nn.PReLU()
        self.down = nn.Linear(16, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.up(x)))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def style_parity(case: str) -> dict[str, float]:
    """Runs on every rank: the tiny module of ``case`` with and without its TP plan; max abs. differences of
    the output and of every parameter gradient (gathered)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from tests.support import tp_mesh

    torch.manual_seed(0)
    module, plan = {
        "mla": (TinyLatentAttention(), {"kv_a": MlaKvAProjParallel(rope_dim=ROPE), "kv_b": ColwiseParallel(),
                                        "o": RowwiseParallel()}),
        "local": (TinyHeadBias(), {"": LocalShardedParameters({"bias": 0}), "q": ColwiseParallel(),
                                   "o": RowwiseParallel()}),
        "activation": (TinyScaledMLP(), {"up": ColwiseParallel(), "act_fn": ReplicatedWithGradAllReduce(),
                                         "down": RowwiseParallel()}),
    }[case]
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(module)
    expected = reference(x)
    expected.square().sum().backward()
    mesh = tp_mesh()
    for key, style in plan.items():
        parallelize_module(module.get_submodule(key), mesh, style)
    actual = module(x)
    actual.square().sum().backward()
    errors = {"output": float((_full(actual) - expected).abs().max())}
    params = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        errors[name] = float((_full(params[name].grad) - param.grad).abs().max())
    errors["bias sharded"] = float(case != "local" or params["bias"].to_local().numel() == HEADS // 2)
    return errors


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["mla", "local", "activation"])
def test_style_matches_single_process(ranks2, case):
    for rank, errors in enumerate(ranks2.run(style_parity, case, timeout=120)):
        assert errors.pop("bias sharded") == 1.0
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, f"rank {rank}: {worst} differs by {errors[worst]:.2e} ({errors})"


def test_mla_style_needs_the_rotary_width():
    with pytest.raises(PlanError, match=r"rope_dim=config\.qk_rope_head_dim"):
        MlaKvAProjParallel().check(nn.Linear(4, 6), 2)  # before any collective


def test_local_sharded_parameters_refuse_missing_or_indivisible_parameters(fake_pg):
    from torch.distributed.device_mesh import init_device_mesh

    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,))
        with pytest.raises(PlanError, match="no parameter 'sinks'"):
            LocalShardedParameters({"sinks": 0})._apply(TinyHeadBias(), mesh)
        odd = TinyHeadBias()
        odd.bias = nn.Parameter(torch.zeros(3))
        with pytest.raises(PlanError, match="cannot be split in 2"):
            LocalShardedParameters({"bias": 0})._apply(odd, mesh)
    assert predicted_placement(LocalShardedParameters({"bias": 0}), odd, "bias") == str(Shard(0))
    assert predicted_placement(MlaKvAProjParallel(2), nn.Linear(4, 6), "weight") == "unsharded"


# --- translation of the transformers models that need them -------------------------------------------------
def tiny(model_type: str) -> nn.Module:
    from meshplan.conformance.check import build_model, tiny_config

    return build_model(tiny_config(model_type))


def test_keys_matching_nothing_are_skipped_and_named_in_a_warning(caplog):
    model = tiny("qwen2_moe")
    with caplog.at_level(logging.WARNING, logger="meshplan"):
        styles = hf_tp_plan(model)
    unmatched = translate_hf_plan(model).unmatched
    assert unmatched.keys() == {"model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj",
                                "model.layers.*.mlp.down_proj"}
    assert not unmatched.keys() & styles.keys()
    warning = next(r.getMessage() for r in caplog.records if "match no module" in r.getMessage())
    assert all(repr(key) in warning for key in unmatched)


def test_mla_and_local_params_and_shard_local_children_are_translated():
    deepseek = tiny("deepseek_v2")
    style = translate_hf_plan(deepseek).styles["model.layers.*.self_attn.kv_a_proj_with_mqa"]
    assert isinstance(style, MlaKvAProjParallel) and style.rope_dim == deepseek.config.qk_rope_head_dim
    assert not translate_hf_plan(deepseek).derived  # kv_a_layernorm / q_a_layernorm see replicated inputs

    granite = translate_hf_plan(tiny("granite_swa"))
    sinks = granite.styles["model.layers.*.self_attn"]
    assert isinstance(sinks, LocalShardedParameters) and sinks.params == {"sinks": 0}
    assert "model.layers.*.self_attn" not in granite.left_replicated

    mimo = tiny("mimo_v2_flash")  # only some layers have sinks: keys name exactly those
    owners = [key for key, s in translate_hf_plan(mimo).styles.items() if isinstance(s, LocalShardedParameters)]
    assert owners and all(hasattr(mimo.get_submodule(key), "sinks") for key in owners)

    apertus = translate_hf_plan(tiny("apertus"))
    assert isinstance(apertus.styles["model.layers.*.mlp.act_fn"], ReplicatedWithGradAllReduce)
    assert set(apertus.derived) == {"model.layers.*.mlp.act_fn"}
    sarvam = translate_hf_plan(tiny("sarvam_moe")).derived
    assert set(sarvam) == {"model.layers.*.self_attn.q_norm", "model.layers.*.self_attn.k_norm"}
    assert not translate_hf_plan(tiny("qwen3")).derived  # already in the plan


def inkling_plan_with_replicated_embedding(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """Inkling's fallback plan without its vocab-parallel embedding container and ``lm_head`` (their own failure in
    docs/conformance.md), so the parity test below reaches the experts and shared experts."""
    styles = hf_tp_plan(model, sequence_parallel=sequence_parallel)
    return {key: style for key, style in styles.items() if key not in ("model.embed_tokens", "lm_head")}


def test_all_reduce_module_whose_parameter_entries_stay_replicated_stays_replicated():
    """Inkling's shared experts: ``all_reduce`` on a module whose 3-D parameters the plan names (left replicated)
    would double its complete output at TP=2."""
    plan = translate_hf_plan(tiny("inkling_text"))
    assert "model.layers.*.mlp.shared_experts" not in plan.styles
    assert "already the full sum" in plan.left_replicated["model.layers.*.mlp.shared_experts"]


@pytest.mark.distributed
def test_fallback_parity_on_models_that_need_the_new_styles(ranks2):
    from meshplan.conformance.check import check_architecture, merge_rank_results

    for model_type in ("glm4_moe_lite", "granite_swa", "apertus"):  # MLA + MoE (DeepSeek has a built-in plan)
        result = merge_rank_results(ranks2.run(check_architecture, model_type, timeout=240))
        assert result["status"] == "pass", f"{model_type}: {result['reason']}\n{result.get('traceback', '')}"
    plan = f"{__name__}.inkling_plan_with_replicated_embedding"  # concatenated [gate; up] under 'colwise'
    result = merge_rank_results(ranks2.run(check_architecture, "inkling_text", tp_plan=plan, timeout=240))
    assert result["status"] == "pass", f"inkling_text: {result['reason']}\n{result.get('traceback', '')}"
