"""A model with expert parallelism gathers back to the original state dict, bitwise (what ``save_pretrained``
on rank 0 writes after training)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.distributed


def _gathered_equals_original(model_name: str) -> tuple[list[str], list[str]]:
    """Runs on every rank: ep=2 over dp_shard=2; keys missing on either side, and keys whose values differ."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from tests.plans.helpers import build

    reference = build(model_name)
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), ep_size=2)
    full = meshplan.gather_full_state_dict(model, rank0_only=False)
    original = reference.state_dict()
    differing = [k for k in original if k in full and not torch.equal(full[k].cpu(), original[k])]
    return sorted(set(original) ^ set(full)), differing


@pytest.mark.parametrize("model_name", ["qwen3_moe", "mixtral"])
def test_expert_parallel_model_gathers_to_the_original_state_dict(ranks2, model_name):
    for missing, differing in ranks2.run(_gathered_equals_original, model_name, timeout=240):
        assert missing == [] and differing == []


def _reloaded_without_ep_equals_original(model_name: str, checkpoint: str) -> tuple[list[str], list[str]]:
    """Runs on every rank: save a DCP checkpoint of an ep=2 model, load it into the same model parallelized without
    EP (another layout of the expert parameters), gather, compare with the original."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import meshplan
    from tests.plans.helpers import build

    reference = build(model_name)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    with_ep = meshplan.parallelize(copy.deepcopy(reference), mesh, mp_policy=MixedPrecisionPolicy(), ep_size=2)
    meshplan.save_distributed_checkpoint(with_ep, checkpoint)
    without_ep = meshplan.parallelize(build(model_name, seed=1), mesh, mp_policy=MixedPrecisionPolicy())
    meshplan.load_distributed_checkpoint(without_ep, checkpoint)
    full = meshplan.gather_full_state_dict(without_ep, rank0_only=False)
    original = reference.state_dict()
    differing = [k for k in original if k in full and not torch.equal(full[k].cpu(), original[k])]
    return sorted(set(original) ^ set(full)), differing


def test_a_checkpoint_saved_with_expert_parallelism_loads_without_it(ranks2, tmp_path):
    for missing, differing in ranks2.run(_reloaded_without_ep_equals_original, "qwen3_moe", str(tmp_path / "ckpt"),
                                         timeout=240):
        assert missing == [] and differing == []
