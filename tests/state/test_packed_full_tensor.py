"""``full_tensor()`` of a packed parameter is in the model's order (``meshplan.state.packing``).

Equal packed parts (the experts' ``[gate; up]``, Phi-3's ``gate_up_proj``) are ``_StridedShard`` DTensors, so
torch's own ``full_tensor()`` of every such parameter equals the one-process model bitwise, under TP alone and under
FSDP2 x TP (whose shard dim moves off the packed dim). Unequal parts (Phi-3's GQA ``qkv_proj``) stay rank-major, and
``meshplan.full_tensor`` returns the model's order for every parameter; one SGD step keeps both true.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

pytestmark = pytest.mark.distributed


def full_tensors_in_model_order(name: str, mesh_shape: dict[str, int]) -> dict:
    import meshplan
    from meshplan.core.naming import unwrapped_name
    from meshplan.state.packing import packed_parameters, strided_packed_dim
    from tests.plans.helpers import build

    reference = build(name)
    mesh = init_device_mesh("cpu", tuple(mesh_shape.values()), mesh_dim_names=tuple(mesh_shape))
    model = meshplan.parallelize(build(name), mesh, mp_policy=MixedPrecisionPolicy())
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    result: dict = {"strided": [], "rank_major": sorted(map(unwrapped_name, packed_parameters(model)))}
    for step in range(2):
        want = dict(reference.named_parameters())
        torch_order, meshplan_order = [], []
        for fqn, param in model.named_parameters():
            key = unwrapped_name(fqn)
            if step == 0 and strided_packed_dim(param) is not None and "gate_up" in key:
                result["strided"].append(key)
            if key not in result["rank_major"] and not torch.equal(param.full_tensor(), want[key]):
                torch_order.append(key)
            if not torch.equal(meshplan.full_tensor(model, fqn), want[key]):
                meshplan_order.append(key)
        result[f"step {step}"] = (torch_order, meshplan_order)
        for one in (reference, model):  # one SGD step: the same update on both keeps them bitwise equal
            one(input_ids=ids, labels=ids).loss.backward()
            with torch.no_grad():
                for param in one.parameters():
                    param.copy_(param - 0.0 * param.grad)  # the layout is what is checked, not the optimizer
                    param.grad = None
    grads_model = {unwrapped_name(n): p for n, p in model.named_parameters()}
    result["dtensors"] = all(isinstance(p, DTensor) for p in grads_model.values())
    return result


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "phi3"])
def test_full_tensor_is_in_model_order_under_tp(ranks2, name):
    for result in ranks2.run(full_tensors_in_model_order, name, {"dp_shard": 1, "tp": 2}):
        assert result["strided"], result
        assert result["step 0"] == ([], []) and result["step 1"] == ([], []), result
    if name == "phi3":  # GQA [q; k; v]: unequal parts, stored rank-major
        assert result["rank_major"] == ["model.layers.0.self_attn.qkv_proj.weight",
                                        "model.layers.1.self_attn.qkv_proj.weight"], result


@pytest.mark.parametrize("name", ["mixtral", "phi3"])
def test_full_tensor_is_in_model_order_under_fsdp2_and_tp(ranks4, name):
    for result in ranks4.run(full_tensors_in_model_order, name, {"dp_shard": 2, "tp": 2}):
        assert result["strided"], result
        assert result["step 0"] == ([], []) and result["step 1"] == ([], []), result
