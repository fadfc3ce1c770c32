"""``cp_implementation="ring"`` (torch's ring attention) on 2 CUDA devices with NCCL: the loss and the
gradients of a CP=2 forward/backward equal one device's (fp32, SDPA efficient-attention kernels)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.parity import ModelSpec, max_relative_error
from tests.support import full_grads

SPEC = ModelSpec("llama", overrides={"attn_implementation": "sdpa"})
RTOL = 1e-4  # SDPA kernels on GPU sum in a different order than the single-device run


def _batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))


def _ring_rank(rank: int, port: int, implementation: str, results) -> None:  # noqa: ANN001
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.context_parallel import apply_context_parallel, shard_batch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        cp_mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("cp",))["cp"]
        model = apply_context_parallel(SPEC.build().cuda(), cp_mesh, implementation)
        ids = _batch(model.config.vocab_size).cuda()
        loss = model(**shard_batch({"input_ids": ids, "labels": ids}, cp_mesh)).loss
        loss.backward()
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= 2
        dist.all_reduce(loss)
        if rank == 0:
            results.put({"loss": (loss / 2).detach().cpu(), **{k: v.cpu() for k, v in full_grads(model).items()}})
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ring attention needs 2 CUDA devices")
@pytest.mark.parametrize("implementation", ["ring", "allgather"])
def test_cp2_on_two_gpus_matches_one_gpu(implementation):
    import torch.multiprocessing as mp

    from meshplan.plugins.testing import free_port

    model = SPEC.build().cuda()
    ids = _batch(model.config.vocab_size).cuda()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = {"loss": loss.detach().cpu(), **{k: v.cpu() for k, v in full_grads(model).items()}}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ranks = mp.start_processes(_ring_rank, args=(free_port(), implementation, results), nprocs=2,
                               start_method="spawn", join=False)
    got = results.get(timeout=120)
    while not ranks.join():
        pass
    for name, want in expected.items():
        assert max_relative_error(got[name], want) <= RTOL, name
