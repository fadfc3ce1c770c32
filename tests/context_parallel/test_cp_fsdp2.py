"""Context parallelism through ``meshplan.parallelize`` (``fsdp2``): parity with one process and typed errors.

3 SGD steps in fp32 on gloo ranks must give the losses, first-step gradients and final parameters of one
process (1e-5 relative). Every layout runs for Llama, Qwen3 and Mistral (sliding window 5 over 16 tokens);
eager and SDPA attention alternate so each layout sees both (the by-hand tests in test_cp_attention.py run
every model with both). Parameters are FSDP-sharded over ``dp_shard x cp`` (HSDP: replicated over
``dp_replicate``); with TP the sequence-parallel plan runs inside each CP shard; with full activation
checkpointing the blocks (and the CP attention's all-gathers in them) are recomputed in backward.
"""

from __future__ import annotations

import functools

import pytest
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.core.errors import SequenceLengthError, UnsupportedAttentionError, UnsupportedAxisError
from meshplan.plugins.testing import RankError
from tests.context_parallel.harness import GLOBAL_BATCH, cp_parallelize, reference_sgd
from tests.parity import ModelSpec, assert_grad_parity, assert_parity
from tests.support import TinyStack

MODELS = {"llama": ModelSpec("llama"), "qwen3": ModelSpec("qwen3"),
          "mistral": ModelSpec("mistral", overrides={"sliding_window": 5})}
LAYOUTS = {  # name -> (mesh, parallelize kwargs, ranks)
    "cp2": ({"dp_shard": 1, "cp": 2}, {}, 2),
    "cp2-dp2": ({"dp_shard": 2, "cp": 2}, {}, 4),
    "cp2-tp2-sp": ({"dp_shard": 1, "cp": 2, "tp": 2}, {"sequence_parallel": True}, 4),
    "hsdp2-cp2": ({"dp_replicate": 2, "dp_shard": 1, "cp": 2}, {}, 4),
    "cp2-ac": ({"dp_shard": 1, "cp": 2}, {"activation_checkpointing": "full", "activation_checkpointing_every": 1}, 2),
}
CASES = [(layout, model, ("sdpa", "eager")[(i + j) % 2])
         for i, layout in enumerate(LAYOUTS) for j, model in enumerate(MODELS)]


def _spec(model: str, attention: str) -> ModelSpec:
    base = MODELS[model]
    return ModelSpec(base.model_type, base.seed, {**base.overrides, "attn_implementation": attention})


@functools.cache
def _expected(model: str, attention: str):
    return reference_sgd(_spec(model, attention), GLOBAL_BATCH)


@pytest.mark.distributed
@pytest.mark.parametrize(("layout", "model", "attention"), CASES, ids=[f"{a}-{b}-{c}" for a, b, c in CASES])
def test_fsdp2_with_cp_matches_one_process(ranks2, ranks4, layout, model, attention):
    mesh, kwargs, world = LAYOUTS[layout]
    pool = ranks2 if world == 2 else ranks4
    result = pool.run(cp_parallelize, _spec(model, attention), mesh, kwargs, timeout=180)[0]
    assert_parity(result, _expected(model, attention), rtol=1e-5)
    assert_grad_parity(result, _expected(model, attention), rtol=1e-5)


def forward_odd_length() -> None:
    """Runs on every rank: CP=2 model fed 7 tokens per rank (not two equal chunks)."""
    import torch

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp"))
    model = meshplan.parallelize(ModelSpec().build(), mesh)
    model(input_ids=torch.zeros(1, 7, dtype=torch.long))


@pytest.mark.distributed
def test_odd_local_length_raises_on_every_rank_before_any_collective(ranks2):
    with pytest.raises(RankError) as info:
        ranks2.run(forward_odd_length, timeout=60)
    assert sorted(info.value.errors) == [0, 1]
    assert all(isinstance(e, SequenceLengthError) and "must be even" in str(e) for e in info.value.errors.values())


def test_cp_on_a_model_without_transformers_attention_names_it(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp"))
        with pytest.raises(UnsupportedAttentionError, match="TinyStack"):
            meshplan.parallelize(TinyStack(), mesh)


def test_cp_with_a_strategy_without_cp_is_refused(fake_pg):
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
        with pytest.raises(UnsupportedAxisError, match=r"'ddp' does not support context parallelism \('cp'\), asked "
                           r"for by mesh dim 'cp' of size 2: it supports \['tp'\]"):
            meshplan.parallelize(ModelSpec().build(), mesh, strategy="ddp")


def test_explain_shows_how_the_sequence_is_split():
    from meshplan.dryrun import explain
    from meshplan.dryrun.render import render_text

    report = explain("tiny-llama", "dp_shard=2,cp=2,tp=2", sequence_parallel=True)
    assert report["error"] is None, report["error"]
    assert report["mesh"]["context_parallel"] == {"size": 2, "implementation": "allgather", "attention": "sdpa",
                                                  "sequence_multiple": 4}
    assert "context parallel: allgather over cp=2, wrapping 'sdpa' attention" in render_text(report)
    assert explain("tiny-llama", "dp_shard=2")["mesh"]["context_parallel"] is None


def test_external_cp_leaves_the_attention_to_the_training_loop(fake_pg):
    """``cp_implementation="external"`` (and NeMo's fsdp2_strategy_parallelize): cp shards parameters only."""
    import torch

    from meshplan.compat.nemo_parallelizer import fsdp2_strategy_parallelize

    with torch.device("meta"):
        models = [ModelSpec().build(), ModelSpec().build(), TinyStack()]
    with fake_pg(4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "cp"))
        external = meshplan.parallelize(models[0], mesh, cp_implementation="external")
        nemo = fsdp2_strategy_parallelize(models[1], mesh)
        meshplan.parallelize(models[2], mesh, cp_implementation="external")  # no attention needed
    assert external.config._attn_implementation == nemo.config._attn_implementation == "eager"
    assert external.model.norm.weight.device_mesh.mesh_dim_names == ("dp_shard_cp",)  # dp_shard x cp


@pytest.mark.distributed
@pytest.mark.parametrize("mesh", [{"dp_shard": 1, "cp": 2}, {"dp_shard": 2, "cp": 2}],
                         ids=["ep-from-cp", "ep-from-dp-x-cp"])
def test_expert_parallel_with_cp_matches_one_process(ranks2, ranks4, mesh):
    """EP ranks carved from ``cp`` (and ``dp_shard x cp``): each rank routes the tokens of its own sequence chunks
    to the experts' owners; Qwen3-MoE (top-2 of 4 experts) gives the numbers of one process."""
    spec = ModelSpec("qwen3_moe", overrides={"attn_implementation": "sdpa", "num_experts": 4,
                                             "num_experts_per_tok": 2})
    pool = ranks2 if mesh["dp_shard"] == 1 else ranks4
    result = pool.run(cp_parallelize, spec, mesh, {"ep_size": 2}, timeout=180)[0]
    expected = reference_sgd(spec, GLOBAL_BATCH)
    assert_parity(result, expected, rtol=1e-5)
    assert_grad_parity(result, expected, rtol=1e-5)
