"""The ``fsdp2`` strategy: parity with one process, mixed precision, FSDP units, mesh selection, errors.

Parity runs train a tiny HF model (2 layers, hidden 64) for 3 AdamW steps in fp32 on 2 or 4 gloo ranks
and in this process from the same initial weights; losses, first-step gradients and final parameters must
agree within 1e-5 (relative to each tensor's largest value). TP plans come from the registered
providers (``meshplan.plans.llama`` / ``qwen``), not from the test.

The learning rate is 1e-4: Adam divides each update by the gradient's running RMS, so for the few
weights whose gradients are near Adam's epsilon (|g| ~ 1e-8 here) fp32 reduction-order noise of TP is
amplified into the parameters (2e-5 after 3 steps at lr=1e-3 while the gradients agree to 6e-7).
Gradients are compared directly as well, since Adam's normalized update hides gradient-scale mistakes.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from meshplan.core.errors import (
    MeshError,
    OptionsError,
    TensorParallelSizeError,
    UnsupportedConfigurationError,
)
from meshplan.core.roles import resolve_roles
from meshplan.core.torch_private import flatten
from meshplan.plugins.testing import RankError
from meshplan.strategies.fsdp2 import FSDP2Options, require_shard_dim
from tests.parity import ModelSpec, RunResult, assert_grad_parity, assert_parity, distributed, reference
from tests.support import TinyStack

LR = 1e-4
FP32 = MixedPrecisionPolicy()
LLAMA = ModelSpec()
QWEN3 = ModelSpec("qwen3")
TIED = ModelSpec(overrides={"tie_word_embeddings": True})


SPECS = {"llama": LLAMA, "qwen3": QWEN3, "tied": TIED}


@functools.cache
def _reference(spec_name: str) -> RunResult:
    return reference(SPECS[spec_name], lr=LR, capture_grads=True)


def _check(pool, spec_name: str, mesh: dict[str, int], **kwargs) -> RunResult:
    spec = SPECS[spec_name]
    result = pool.run(distributed, spec, mesh, {"mp_policy": FP32, **kwargs}, lr=LR, capture_grads=True,
                      timeout=240)[0]
    expected = _reference(spec_name)
    assert_parity(result, expected, rtol=1e-5)
    assert_grad_parity(result, expected, rtol=1e-5)
    return result


# --- parity on 2 ranks ----------------------------------------------------------------------------
PARITY_2 = {
    "fsdp-dp2": ("llama", {"dp_shard_cp": 2}, {}),
    "fsdp-1d-dp-name": ("llama", {"dp": 2}, {}),
    "tp2": ("llama", {"dp_shard_cp": 1, "tp": 2}, {}),
    "tp2-sp": ("llama", {"dp_shard_cp": 1, "tp": 2}, {"sequence_parallel": True}),
    "hsdp-2x1": ("llama", {"dp_replicate": 2, "dp_shard_cp": 1}, {}),
    "qwen3-tp2-sp": ("qwen3", {"dp_shard_cp": 1, "tp": 2}, {"sequence_parallel": True}),
    "tied-tp2": ("tied", {"dp_shard_cp": 1, "tp": 2}, {}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(PARITY_2))
def test_parity_two_ranks(ranks2, case):
    spec_name, mesh, kwargs = PARITY_2[case]
    _check(ranks2, spec_name, mesh, **kwargs)


# --- parity on 4 ranks ----------------------------------------------------------------------------
PARITY_4 = {
    "hsdp-2x2": ("llama", {"dp_replicate": 2, "dp_shard_cp": 2}, {}),
    "tp2-x-fsdp2": ("llama", {"dp_shard": 2, "tp": 2}, {}),
    "tp2-sp-x-fsdp2": ("llama", {"dp_shard_cp": 2, "tp": 2}, {"sequence_parallel": True}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(PARITY_4))
def test_parity_four_ranks(ranks4, case):
    spec_name, mesh, kwargs = PARITY_4[case]
    _check(ranks4, spec_name, mesh, **kwargs)


@pytest.mark.distributed
def test_activation_checkpointing_is_bitwise_identical(ranks4):
    """TP=2 x FSDP=2: every checkpointing mode gives exactly the losses and parameters of no checkpointing."""
    mesh = {"dp_shard_cp": 2, "tp": 2}
    off = _check(ranks4, "llama", mesh)
    for mode in (True, "full", "selective"):
        on = _check(ranks4, "llama", mesh, activation_checkpointing=mode, activation_checkpointing_every=1)
        assert on.losses == off.losses, mode
        assert all(torch.equal(on.params[n], off.params[n]) for n in off.params), mode
        assert all(torch.equal(on.grads[n], off.grads[n]) for n in off.grads), mode


@pytest.mark.distributed
def test_bf16_default_policy_tracks_fp32(ranks2):
    """Default policy (bf16 params, fp32 reduce, fp32 output at the root): loss within 1e-3 relative of fp32.

    Measured on this model: 0.7e-5 to 1.5e-5 (dp=2) and up to 4e-5 (tp=2); the bound leaves room for bf16's
    ~4e-3 per-element precision. Never bitwise equal to fp32, which shows bf16 compute was in effect.
    """
    result = ranks2.run(distributed, LLAMA, {"dp_shard_cp": 2}, {}, lr=LR, timeout=240)[0]
    expected = _reference("llama")
    for got, want in zip(result.losses, expected.losses):
        assert got != want
        assert abs(got - want) <= 1e-3 * abs(want), (got, want)


# --- FSDP units and mixed precision, checked on the ranks --------------------------------------------
def inspect_units(mesh_shape: dict[str, int], overrides: dict, kwargs: dict) -> dict:
    """Runs on every rank: parallelize, one forward, report which units resharded and dtypes seen."""
    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    model = meshplan.parallelize(ModelSpec(overrides=overrides).build(), mesh, **kwargs)
    layers = model.model.layers
    stored_dtypes = {str(p.dtype) for p in model.parameters()}  # sharded storage, before any forward
    seen: dict[str, torch.dtype] = {}
    layers[0].register_forward_hook(lambda m, a, out: seen.update(block_out=out.dtype))  # returns None
    ids = torch.arange(16).reshape(1, 16)
    logits = model(input_ids=ids).logits
    return {
        "units": sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule)),
        "sharded_after_forward": {
            "block0": all(isinstance(p, DTensor) for p in layers[0].parameters()),
            "last_block": all(isinstance(p, DTensor) for p in layers[-1].parameters()),
            "root": isinstance(model.model.embed_tokens.weight, DTensor),
        },
        "block_out": seen["block_out"],
        "logits": logits.dtype,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "stored_dtypes": stored_dtypes,
        "gathered_dtypes": {str(p.dtype) for p in model.lm_head.parameters()},  # root stays gathered
    }


@pytest.mark.distributed
def test_units_reshard_policy_and_mixed_precision(ranks2):
    info = ranks2.run(inspect_units, {"dp_shard_cp": 2}, {"tie_word_embeddings": True},
                      {"activation_checkpointing": "full"})[0]
    assert info["units"] == ["", "model.layers.0", "model.layers.1"]  # the wrappers of the blocks + root
    # block 0 reshards after forward; the last block and the root keep their parameters gathered
    assert info["sharded_after_forward"] == {"block0": True, "last_block": False, "root": False}
    assert info["block_out"] == torch.bfloat16 and info["logits"] == torch.float32
    assert info["tied"] and info["stored_dtypes"] == {"torch.float32"}
    assert info["gathered_dtypes"] == {"torch.bfloat16"}


@pytest.mark.distributed
def test_reshard_after_forward_false_keeps_blocks_gathered(ranks2):
    info = ranks2.run(inspect_units, {"dp_shard_cp": 2}, {}, {"reshard_after_forward": False, "mp_policy": FP32})[0]
    assert info["sharded_after_forward"] == {"block0": False, "last_block": False, "root": False}
    assert info["block_out"] == torch.float32


# --- bad inputs raise typed errors on every rank ----------------------------------------------------------
def parallelize_only(mesh_shape: dict[str, int], overrides: dict, kwargs: dict) -> None:
    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    meshplan.parallelize(ModelSpec(overrides=overrides).build(), mesh, **kwargs)


BAD_INPUTS = {
    "no-dp-dim": ({"foo": 2}, {}, {}, MeshError, "Mesh dim 'foo' (size 2) has no role in strategy 'fsdp2'"),
    "replicate-only": ({"dp_replicate": 2}, {}, {}, MeshError, "needs a data-parallel shard dim: looked for"),
    "tp-vs-kv-heads": ({"dp_shard_cp": 1, "tp": 2}, {"hidden_size": 48, "intermediate_size": 96,
                                                      "num_attention_heads": 6, "num_key_value_heads": 3},
                       {}, TensorParallelSizeError, "num_key_value_heads (3)"),
    "tp-vs-heads": ({"dp_shard_cp": 1, "tp": 2}, {"hidden_size": 48, "intermediate_size": 96,
                                                   "num_attention_heads": 3, "num_key_value_heads": 3},
                    {}, TensorParallelSizeError, "num_attention_heads (3)"),
    "cpu-offload": ({"dp_shard_cp": 2}, {}, {"offload_policy": CPUOffloadPolicy()}, UnsupportedConfigurationError,
                    "needs an accelerator mesh"),
    "unknown-option": ({"dp_shard_cp": 2}, {}, {"activation_checkpoint": True}, OptionsError,
                       "Did you mean 'activation_checkpointing'"),
    "bad-ac-mode": ({"dp_shard_cp": 2}, {}, {"activation_checkpointing": "sometimes"},
                    UnsupportedConfigurationError, "activation_checkpointing must be one of"),
    "bad-mp-policy": ({"dp_shard_cp": 2}, {}, {"mp_policy": "bf16"}, OptionsError, "MixedPrecisionPolicy"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_on_every_rank(ranks2, case):
    mesh, overrides, kwargs, error, text = BAD_INPUTS[case]
    with pytest.raises(RankError) as info:
        ranks2.run(parallelize_only, mesh, overrides, kwargs, timeout=60)
    assert sorted(info.value.errors) == [0, 1]
    for exc in info.value.errors.values():
        assert isinstance(exc, error), repr(exc)
        assert text in str(exc)


# --- mesh selection on a fake world (no ranks needed) -------------------------------------------------------
def _roles(shape: dict[str, int], **options):
    mesh = init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    return resolve_roles(mesh, FSDP2Options(**options).mesh_roles(), "fsdp2")


def _dp(shape: dict[str, int], **options):
    return _roles(shape, **options).data_parallel


def test_mesh_selection_by_name_with_fallbacks(fake_pg):
    with fake_pg(8):
        one_d = _dp({"dp": 8})
        assert (one_d.shard_name, one_d.mesh.ndim, one_d.is_hybrid) == ("dp", 1, False)
        shard_tp = _dp({"dp_shard": 4, "tp": 2})
        assert (shard_tp.shard_name, shard_tp.shard_size, shard_tp.mesh.ndim) == ("dp_shard", 4, 1)
        hsdp = _dp({"dp_replicate": 2, "dp_shard_cp": 2, "tp": 2})
        assert (hsdp.replicate_name, hsdp.shard_name, tuple(hsdp.mesh.shape)) == ("dp_replicate", "dp_shard_cp", (2, 2))
        # a replicate dim of size 1 never turns plain FSDP into a 2-D mesh
        plain = _dp({"dp_replicate": 1, "dp_shard_cp": 4, "tp": 2})
        assert (plain.is_hybrid, plain.mesh.ndim, plain.shard_size) == (False, 1, 4)
        custom = _dp({"outer": 2, "inner": 4}, dp_replicate_mesh_name="outer", dp_shard_cp_mesh_name="inner")
        assert custom.describe() == "HSDP outer=2 x inner=4"


def test_mesh_selection_skips_a_shard_dim_overlapping_the_replicate_dim(fake_pg):
    with fake_pg(8):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("dp_replicate", "dp_shard"))
        flatten(mesh["dp_replicate", "dp_shard"], "dp")
        dp = resolve_roles(mesh, FSDP2Options(dp_shard_cp_mesh_name="dp").mesh_roles(), "fsdp2").data_parallel
        assert (dp.replicate_name, dp.shard_name, tuple(dp.mesh.shape)) == ("dp_replicate", "dp_shard", (2, 4))


def test_mesh_selection_error_names_what_was_looked_for(fake_pg):
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        roles = resolve_roles(mesh, FSDP2Options().mesh_roles(), "fsdp2")
        with pytest.raises(MeshError) as info:
            require_shard_dim(roles, FSDP2Options())
    message = str(info.value)
    assert "['dp_shard_cp', 'dp_shard', 'dp']" in message and "the mesh has ['tp']" in message


def test_plain_module_stack_gets_one_unit_per_block(fake_pg):
    """A non-transformers ``nn.ModuleList`` stack: every block and the root become FSDP units."""
    import meshplan

    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        model = meshplan.parallelize(TinyStack(depth=3), mesh, mp_policy=FP32, activation_checkpointing="full")
        units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
        assert units == ["", "layers.0", "layers.1", "layers.2"]
        assert set(model.state_dict()) == set(TinyStack(depth=3).state_dict())  # no wrapper prefixes


def test_hsdp_x_tp_layout_on_a_fake_world(fake_pg):
    """dp_replicate 2 x dp_shard_cp 2 x tp 2 (8 ranks, on the meta device): HSDP over TP shards."""
    import meshplan

    with torch.device("meta"):
        model = LLAMA.build()
    with fake_pg(8):
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard_cp", "tp"))
        model = meshplan.parallelize(model, mesh)
        q = model.model.layers[0].self_attn.q_proj.weight
        norm = model.model.norm.weight
        assert (q.device_mesh.mesh_dim_names, tuple(map(repr, q.placements))) == (
            ("dp_replicate", "dp_shard_cp", "tp"), ("Replicate()", "_StridedShard(dim=0, sf=2)", "Shard(dim=0)"))
        assert tuple(q.to_local().shape) == (16, 64)  # 64 rows / tp 2 / dp_shard 2
        assert tuple(map(repr, norm.placements)) == ("Replicate()", "Shard(dim=0)")


def test_report_shows_the_effective_mixed_precision_policy(fake_pg):
    """``mp_policy=None`` computes in bf16: the report says so, and names the fp32 spelling."""
    import meshplan

    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        default = meshplan.prepare(TinyStack(), mesh).report()["options"]["mp_policy"]
        fp32 = meshplan.prepare(TinyStack(), mesh, mp_policy=FP32).report()["options"]["mp_policy"]
    assert "param_dtype=torch.bfloat16" in default and "MixedPrecisionPolicy() for fp32" in default
    assert fp32 == repr(FP32) and "bfloat16" not in fp32
