"""TP styles for the sequence mixers of hybrid models (``meshplan.tensor_parallel.mixers``): TP=2 parity of the
Hugging Face fallback on Mamba2 / Mamba1 / short-convolution hybrids, an explicit plan naming a mixer style, and
the refusal of a mixer whose groups do not divide by the TP size."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from meshplan.conformance.check import build_model, run_check, tiny_config
from tests.support import TensorParallelOnly, full_grads, full_params, relative_error, tp_mesh

#: Config switches that give the mixers' projections and convolutions biases (row-wise biases are summands).
BIASES = {"granitemoehybrid": {"mamba_proj_bias": True, "mamba_conv_bias": True},
          "nemotron_h": {"use_bias": True, "use_conv_bias": True},
          "jamba": {"mamba_proj_bias": True, "mamba_conv_bias": True},
          "lfm2_moe": {"conv_bias": True}}


def _tiny(model_type: str, **fields: object) -> object:
    config = tiny_config(model_type)
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def _parity_with_biases(model_type: str) -> dict:
    return run_check(model_type, _tiny(model_type, **BIASES[model_type]), tp_mesh, TensorParallelOnly, "TP")


@pytest.mark.distributed
@pytest.mark.parametrize("model_type", list(BIASES))
def test_fallback_splits_mixers_with_tp2_parity(ranks2, model_type):
    for result in ranks2.run(_parity_with_biases, model_type, timeout=240):
        assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
        assert "meshplan.plans.hf" in result["plan_source"]
        assert result["sharded_fraction"] > 0.85, "the mixers stay replicated"  # 37-76 % with the mixers whole


def _explicit_mamba2_plan() -> dict:
    import meshplan

    meshplan.register_strategy(TensorParallelOnly)
    reference = build_model(_tiny("granitemoehybrid", mamba_proj_bias=True))
    model = meshplan.parallelize(copy.deepcopy(reference), tp_mesh(), strategy="tp_test",
                                 tp_plan={"model.layers.*.mamba": "mamba2_mixer"})
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for net in (reference, model):
        net(input_ids=ids, use_cache=False).logits.square().mean().backward()
    mixer = next(m for m in model.modules() if hasattr(m, "n_groups"))
    expected_grads = {n: p.grad for n, p in reference.named_parameters()}
    grads = full_grads(model)
    return {"weights_restored": all(torch.equal(w, reference.get_parameter(n)) for n, w in full_params(model).items()),
            "grad_error": max(relative_error(grads[n], g) for n, g in expected_grads.items() if ".mamba." in n),
            "local_sizes": (mixer.num_heads, mixer.n_groups, mixer.intermediate_size, mixer.conv_dim),
            "replicated_linears": meshplan.get_report(model)["plan"]["replicated_linears"]}


@pytest.mark.distributed
def test_explicit_mixer_style_unshards_packed_parameters(ranks2):
    """A plan naming ``mamba2_mixer``: gathered packed ``in_proj`` / ``conv1d`` come back in the original layout,
    each rank computes on its half of the heads and groups, and the report counts the mixers' linears sharded."""
    for result in ranks2.run(_explicit_mamba2_plan, timeout=240):
        assert result["weights_restored"], "unpack_full_state_dict must restore the packed mixer parameters"
        assert result["grad_error"] < 1e-5, result
        assert result["local_sizes"] == (4, 1, 64, 96)  # 8 heads, 2 groups, 128 channels, 128 + 2 x 2 x 16
        assert not [n for n in result["replicated_linears"] if ".mamba." in n], result["replicated_linears"]


def test_mixer_whose_groups_do_not_divide_is_refused_or_left_whole(fake_pg, caplog):
    import meshplan
    from meshplan import TensorParallelSizeError
    from meshplan.core.errors import PlanError
    from meshplan.tensor_parallel.mixers import Mamba2MixerParallel
    from meshplan.tensor_parallel.styles.traits import predicted_placement

    model = build_model(_tiny("granitemoehybrid", mamba_n_groups=1))
    mixer = next(m for m in model.modules() if hasattr(m, "n_groups"))
    with pytest.raises(PlanError, match="not a Mamba2 mixer"):
        Mamba2MixerParallel().check(nn.Linear(4, 4), 2)
    assert predicted_placement(Mamba2MixerParallel(), mixer, "dt_bias") == str(Shard(0))
    with fake_pg(2):
        meshplan.register_strategy(TensorParallelOnly)
        with pytest.raises(TensorParallelSizeError, match=r"n_groups \(1\) is not divisible by the TP size \(2\)"):
            meshplan.prepare(model, tp_mesh(), strategy="tp_test", tp_plan={"model.layers.*.mamba": "mamba2_mixer"})
        assert not any(isinstance(p, DTensor) for p in model.parameters()), "nothing applied"
        with caplog.at_level(logging.WARNING, logger="meshplan"):
            prepared = meshplan.prepare(model, tp_mesh(), strategy="tp_test")  # the fallback leaves it whole
            prepared.apply()
    assert type(mixer.in_proj.weight) is nn.Parameter and mixer.n_groups == 1
    assert caplog.text.count("its n_groups (1)") == 1, "one warning for all the mixers of these sizes"
    assert not any(isinstance(s, Mamba2MixerParallel) for s in prepared.plan.styles.values()), prepared.plan.styles
    assert {f"{n}.in_proj" for n, m in model.named_modules() if m is mixer} <= set(prepared.plan.replicated_linears)


@pytest.mark.distributed
def test_mamba2_mixer_under_fsdp2_and_activation_checkpointing(ranks4):
    """dp_shard=2 x tp=2 with full activation checkpointing, 3 SGD steps: the mixer's local forward runs on the
    parameters FSDP2 all-gathers, also when the layer is recomputed in backward."""
    from tests.experts.helpers import sgd_parity_cases

    cases = [("granitemoehybrid", {"dp_shard_cp": 2, "tp": 2}, {"activation_checkpointing": "full"}, {})]
    result = ranks4.run(sgd_parity_cases, cases, timeout=600)[0][0]
    assert isinstance(result, dict), result
    assert max(result["loss"], result["grad"][0], result["param"][0]) <= 1e-5, result


def _nemotron_h_sequence_parallel() -> dict:
    return run_check("nemotron_h", tiny_config("nemotron_h"), tp_mesh, TensorParallelOnly, "TP",
                     sequence_parallel=True)


@pytest.mark.distributed
def test_sequence_parallel_through_a_mixer_style(ranks2):
    """Nemotron-H's MoE, Mamba2 and attention layers share one block name; with sequence parallel each block first
    gathers the sequence, then the mixer style takes it (the gather's pre-hook runs first), and the block returns
    its slice."""
    for result in ranks2.run(_nemotron_h_sequence_parallel, timeout=240):
        assert result["status"] == "pass", f"{result['reason']}\n{result.get('traceback', '')}"
