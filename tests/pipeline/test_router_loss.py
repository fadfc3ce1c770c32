"""The MoE router auxiliary loss (``output_router_logits=True``) under pipeline parallelism: the stages carry the
router sums next to the hidden states, so the loss (cross entropy + coef x load-balancing loss) and every gradient
are those of one process: on the whole batch with one microbatch, with gradient accumulation over the same
microbatches otherwise. A per-stage loss would not be (the loss couples every layer's routers); a model whose loss
is not transformers' summed form is refused."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import meshplan
from meshplan.core.errors import PipelineError
from meshplan.pipeline.router_loss import router_loss, router_sums
from tests.context_parallel.harness import padded_steps
from tests.parity import ModelSpec, assert_parity
from tests.pipeline.harness import pipeline_run, reference_run

#: a large coefficient, so that a wrong auxiliary loss or gradient shows in the parameters after 3 SGD steps
QWEN3_MOE_AUX = ModelSpec("qwen3_moe", overrides={
    "num_hidden_layers": 4, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "tie_word_embeddings": False, "output_router_logits": True, "router_aux_loss_coef": 0.5})
VOCAB = 256  # tests.support.tiny_hf

#: name -> (schedule options, padded rows or the default batches); the microbatches of the reference
CASES = {"gpipe-whole-batch": ({"pp_schedule": "GPipe", "pp_microbatches": 1}, False),
         "1f1b-two-microbatches-padded": ({"pp_schedule": "1F1B", "pp_microbatches": 2}, True)}


def _padded() -> list[dict]:
    return [step[0] for step in padded_steps(VOCAB, "right")]


def _run_all() -> dict:
    return {name: pipeline_run(QWEN3_MOE_AUX, {"pp": 2, "dp_shard": 1}, options, data=_padded() if padded else None)
            for name, (options, padded) in CASES.items()}


@pytest.mark.distributed
def test_router_loss_across_stages_matches_one_process(ranks2) -> None:
    results = ranks2.run(_run_all, timeout=600)
    for name, (options, padded) in CASES.items():
        expected = reference_run(QWEN3_MOE_AUX, data=_padded() if padded else None,
                                 microbatches=options["pp_microbatches"])
        for rank, result in enumerate(results):
            try:
                assert_parity(result[name], expected)
            except AssertionError as exc:
                raise AssertionError(f"{name}, rank {rank}: {exc}") from exc


def test_summed_router_statistics_give_the_models_loss_and_per_stage_losses_do_not() -> None:
    model = QWEN3_MOE_AUX.build()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=False)
    first, second = out.router_logits[:2], out.router_logits[2:]
    summed = router_sums(first, 4, 2) + router_sums(second, 4, 2)
    torch.testing.assert_close(router_loss(summed, 4), out.aux_loss, rtol=1e-6, atol=0)
    per_stage = router_loss(router_sums(first, 4, 2), 4) + router_loss(router_sums(second, 4, 2), 4)
    assert not torch.allclose(per_stage, out.aux_loss, rtol=1e-3)


def test_a_router_loss_of_another_form_is_refused(fake_pg, monkeypatch) -> None:
    model = QWEN3_MOE_AUX.build()
    module = sys.modules[type(model).__module__]
    monkeypatch.setattr(module, "load_balancing_loss_func",
                        lambda logits, *args: sum(t.square().mean() for t in logits))
    with fake_pg(2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp_shard"))
        with pytest.raises(PipelineError, match="is not transformers' Switch-Transformer loss over summed router"):
            meshplan.parallelize(model, mesh)
