"""Distributed checkpoints reshard everything, packed parameters included (``meshplan.state.distributed_checkpoint``).

A tiny MoE model trains one AdamW step under TP (its experts' ``gate_up_proj`` is a ``_StridedShard``, a hybrid's
Mamba2 ``in_proj`` and ``conv1d`` are stored rank-major), is saved with DCP, and hops through other meshes: loaded
under EP without TP, saved again, loaded under FSDP with CP (the MoE models) or under HSDP and then back under TP
(the hybrid). After every load the gathered full state dict and the full optimizer state equal the first model's
bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

pytestmark = pytest.mark.distributed

#: (mesh, parallelize options) of each hop: saved under the first, loaded (and saved again) under the next ones
TP_EP_CP = [({"dp_shard": 2, "tp": 2}, {}), ({"dp_shard": 4}, {"ep_size": 2}), ({"dp_shard": 2, "cp": 2}, {})]
TP_EP_HSDP_TP = [({"dp_shard": 2, "tp": 2}, {}), ({"dp_shard": 4}, {"ep_size": 2}),
                 ({"dp_replicate": 2, "dp_shard": 2}, {}), ({"dp_replicate": 2, "dp_shard": 1, "tp": 2}, {})]


def _parallelize(model: torch.nn.Module, mesh_shape: dict[str, int], options: dict) -> torch.nn.Module:
    import meshplan

    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    return meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy(), **options)


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The gathered model state and the full optimizer state (``name.exp_avg``, ...), in the model's order."""
    from meshplan.state.distributed_checkpoint import gather_full_state_dict
    from meshplan.state.packing import unpack_full_state_dict

    full = gather_full_state_dict(model, rank0_only=False)
    moments = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        unpacked = unpack_full_state_dict(model, {name: state[key] for name, state in moments.items()})
        full.update({f"{name}.{key}": tensor for name, tensor in unpacked.items()})
    return full


def _differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    problems = sorted(f"missing {k}" for k in want.keys() - got.keys())
    return problems + [k for k in sorted(want.keys() & got.keys())
                       if isinstance(got[k], DTensor) or not torch.equal(got[k], want[k])]


def reshard_hops(name: str, path: str, hops: list[tuple[dict[str, int], dict]]) -> dict:
    """Train one step under the first hop, save; then load, compare and save again under each next one."""
    from meshplan.core.naming import unwrapped_name
    from meshplan.state.distributed_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
    from meshplan.state.packing import packed_state_keys, strided_packed_dim
    from tests.plans.helpers import build

    mesh_shape, options = hops[0]
    model = _parallelize(build(name), mesh_shape, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    expected = _full_state(model, optimizer)
    strided = [unwrapped_name(n) for n, p in model.named_parameters() if strided_packed_dim(p) is not None]
    result = {"packed": sorted(packed_state_keys(model)) + strided}  # rank-major or _StridedShard
    save_distributed_checkpoint(model, f"{path}/0", optimizer)
    for hop, (mesh_shape, options) in enumerate(hops[1:], start=1):
        fresh = _parallelize(build(name, seed=1), mesh_shape, options)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        load_distributed_checkpoint(fresh, f"{path}/{hop - 1}", fresh_optimizer)
        result[str(mesh_shape | options)] = _differences(_full_state(fresh, fresh_optimizer), expected)
        save_distributed_checkpoint(fresh, f"{path}/{hop}", fresh_optimizer)
    return result


@pytest.mark.parametrize("name, hops, packed", [
    ("mixtral", TP_EP_CP, "model.layers.0.mlp.experts.gate_up_proj"),
    ("qwen3_moe", TP_EP_CP, "model.layers.1.mlp.experts.gate_up_proj"),
    ("granitemoehybrid", TP_EP_HSDP_TP, "model.layers.0.mamba.in_proj.weight"),
])
def test_dcp_reshards_packed_parameters_across_tp_ep_and_cp(ranks4, tmp_path, name, hops, packed):
    results = ranks4.run(reshard_hops, name, str(tmp_path), hops, timeout=240)
    assert packed in results[0]["packed"], results[0]["packed"]
    expected = {str(mesh | options): [] for mesh, options in hops[1:]}
    for result in results:
        assert {key: value for key, value in result.items() if key != "packed"} == expected

