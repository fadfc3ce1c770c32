"""``meshplan.clip_grad_norm_`` / ``meshplan.grad_norm`` on gloo ranks against ``torch.nn.utils.clip_grad_norm_`` on
the one-process model: expert parallelism (experts on their own mesh next to the dense ``(dp_shard, tp)`` one), EP
with context parallelism, HSDP with TP and sequence parallelism (2 x 1 x 2 on the shared 4-rank pool, 2 x 2 x 2 on 8
ranks); the inf norm; non-finite norms."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import meshplan
from meshplan.core.errors import UnsupportedConfigurationError
from meshplan.plugins.testing import run_on_ranks
from tests.training.clip_ranks import clip_parity, nonfinite_refused

CASES = {  # name -> (model, mesh, options)
    "qwen3_moe-ep2-dp2-tp2": ("qwen3_moe", {"dp_shard": 2, "tp": 2}, {"ep_size": 2}),
    "mixtral-ep2-cp2": ("mixtral", {"dp_shard": 2, "cp": 2}, {"ep_size": 2}),
    "llama-hsdp2x1-tp2-sp": ("llama", {"dp_replicate": 2, "dp_shard": 1, "tp": 2}, {"sequence_parallel": True}),
}


def _check_clip(results: list[dict]) -> None:
    for result in results:
        assert result["norm"] <= 1e-6 and result["logged"] <= 1e-6, result
        assert result["scale"] <= 1e-6, result  # every gradient scaled by torch's coefficient
        # the clipped gradients are as close to one process as the unclipped ones (the sharded backward's own
        # rounding, ~1e-6 of the largest element: the EP and CP parity tests allow 1e-5)
        assert result["grad"][0] <= result["unclipped_grad"] + 1e-6 and result["grad"][0] <= 1e-5, result
        assert result["clipped"] == pytest.approx(1.0, rel=1e-4), result  # clipped to max_norm


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_clip_grad_norm_matches_one_process(ranks4, case):
    name, mesh, options = CASES[case]
    _check_clip(ranks4.run(clip_parity, name, mesh, options, timeout=240))


@pytest.mark.distributed
def test_clip_grad_norm_matches_one_process_on_hsdp_2x2_tp2_sp():
    """Every dim of a 3-D mesh larger than one: gradients sharded over dp_shard and tp, replicated over
    dp_replicate. 8 fresh ranks (no pool kept: 8 idle processes would hold memory for the rest of the run), one
    layer: about 20 s on 2 idle cores, most of it starting the ranks."""
    mesh = {"dp_replicate": 2, "dp_shard": 2, "tp": 2}
    _check_clip(run_on_ranks(clip_parity, 8, "llama", mesh, {"sequence_parallel": True},
                             overrides={"num_hidden_layers": 1}, timeout=300))


@pytest.mark.distributed
def test_inf_norm_matches_one_process(ranks4):
    name, mesh, options = CASES["qwen3_moe-ep2-dp2-tp2"]
    for result in ranks4.run(clip_parity, name, mesh, options, norm_type=math.inf, timeout=240):
        assert result["norm"] <= 1e-6 and result["scale"] <= 1e-6, result


@pytest.mark.distributed
def test_nonfinite_norm_raises_on_every_rank(ranks4):
    name, mesh, options = CASES["qwen3_moe-ep2-dp2-tp2"]
    for result in ranks4.run(nonfinite_refused, name, mesh, options, timeout=240):
        assert result["raised"] and "non-finite" in result["raised"], result
        assert result["unchanged"], result
        assert math.isnan(result["norm"]), result


def test_one_process_equals_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    inputs = torch.randn(5, 8)
    for m in (model, reference):
        m(inputs).square().sum().backward()
    for norm_type in (2.0, 1.0, 3.0, math.inf):
        total = meshplan.clip_grad_norm_(model, 0.05, norm_type, foreach=False)
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05, norm_type)
        assert float(total) == pytest.approx(float(expected), rel=1e-6)  # summed in float64 here
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [0, -1.0, -math.inf, "two"])
def test_bad_norm_type_is_refused(norm_type):
    with pytest.raises(UnsupportedConfigurationError, match="norm_type"):
        meshplan.grad_norm(torch.nn.Linear(2, 2), norm_type)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron-FSDP needs a CUDA device")
def test_megatron_fsdp_norm_matches_one_process_on_one_gpu():
    pytest.importorskip("megatron_fsdp")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.plugins.testing import free_port
    from tests.support import TinyStack

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        reference = TinyStack(dim=32, depth=2).cuda()
        model = copy.deepcopy(reference)
        mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("dp", "tp"))
        wrapped, _ = meshplan.parallelize_megatron_fsdp(model, mesh)
        inputs = torch.randn(8, 32, device="cuda")
        for m in (reference, wrapped):
            m(inputs).square().mean().backward()
        wrapped.finish_grad_sync()  # reduced gradients land on the distributed parameters
        expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf))
        total = float(meshplan.clip_grad_norm_(wrapped, 0.1 * expected))
        assert total == pytest.approx(expected, rel=1e-5)
        assert float(meshplan.grad_norm(wrapped)) == pytest.approx(0.1 * expected, rel=1e-4)
    finally:
        dist.destroy_process_group()
