"""Expert parallelism on 2 CUDA devices with NCCL: the all-to-all token dispatch (uneven splits) gives the loss and
gradients of one device (Qwen3-MoE, ep_size=2 over dp_shard=2, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.nccl import run_on_gpus
from tests.parity import max_relative_error
from tests.support import full_grads, tiny_hf

RTOL = 1e-4  # GPU kernels sum in another order than the reference's


def _model() -> torch.nn.Module:
    return tiny_hf("qwen3_moe", seed=0)


def _ep_rank() -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    reference = _model().cuda()
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("dp_shard",))
    meshplan.parallelize(model, mesh, ep_size=2, mp_policy=MixedPrecisionPolicy())
    ids = torch.randint(0, reference.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5)).cuda()
    errors = {}
    for name, m in (("reference", reference), ("ep", model)):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        errors[name] = loss.detach()
    grads, ref_grads = full_grads(model), {n: p.grad for n, p in reference.named_parameters()}
    worst = max(max_relative_error(grads[n].cpu(), ref_grads[n].cpu()) for n in ref_grads)
    return {"loss": abs(float(errors["ep"] - errors["reference"])) / abs(float(errors["reference"])),
            "grad": worst}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="expert-parallel all-to-all needs 2 CUDA devices")
def test_ep2_all_to_all_on_two_gpus_matches_one_gpu() -> None:
    for rank, result in enumerate(run_on_gpus(_ep_rank)):
        assert result["loss"] <= RTOL, f"rank {rank}: loss {result['loss']:.3g}"
        assert result["grad"] <= RTOL, f"rank {rank}: gradient {result['grad']:.3g}"
