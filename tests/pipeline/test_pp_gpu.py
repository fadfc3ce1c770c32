"""Pipeline parallelism on 2 CUDA devices with NCCL: pp=2 with 1F1B (stage activations sent between GPUs) gives
one device's loss and, after one SGD step, its parameters (Llama, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.nccl import run_on_gpus
from tests.parity import max_relative_error
from tests.pipeline.harness import LLAMA4

RTOL = 1e-4  # GPU kernels sum in another order than the reference's
LR = 0.1


def _pp_rank() -> dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan

    reference = LLAMA4.build().cuda()
    mesh = init_device_mesh("cuda", (2, 1), mesh_dim_names=("pp", "dp_shard"))
    pipe = meshplan.parallelize(copy.deepcopy(reference), mesh, pp_schedule="1F1B", pp_microbatches=2,
                                mp_policy=MixedPrecisionPolicy())
    ids = torch.randint(0, reference.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5)).cuda()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    loss = pipe.step(input_ids=ids, labels=ids)
    for model in (reference, pipe):
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        optimizer.step()
    gathered = meshplan.gather_full_state_dict(pipe, rank0_only=False)
    params = dict(reference.named_parameters())
    worst = max(max_relative_error(gathered[n].float().cpu(), params[n].detach().cpu()) for n in params)
    return {"loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), "param": worst}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="pipeline parallelism over NCCL needs 2 CUDA devices")
def test_pp2_1f1b_on_two_gpus_matches_one_gpu() -> None:
    for rank, result in enumerate(run_on_gpus(_pp_rank)):
        assert result["loss"] <= RTOL, f"rank {rank}: loss {result['loss']:.3g}"
        assert result["param"] <= RTOL, f"rank {rank}: parameter {result['param']:.3g}"
