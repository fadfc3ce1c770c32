"""Expert-parallel layout and bad inputs on fake process groups (meta device, no ranks needed).

Which ranks hold which experts, the meshes EP is carved into (up to 2,048 ranks), and the typed errors raised
before any collective, identical on the first and the last rank.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from meshplan.core.errors import ExpertParallelError, PlanError, UnmatchedPlanKeyError
from tests.support import tiny_hf

MIXTRAL = {"num_local_experts": 8, "num_experts_per_tok": 2}
#: A TP plan that leaves the experts whole, so EP borrows the TP ranks.
ATTENTION_TP = {**{f"model.layers.*.self_attn.{name}": "colwise" for name in ("q_proj", "k_proj", "v_proj")},
                "model.layers.*.self_attn.o_proj": "rowwise"}


def _meta(model_type: str = "mixtral", **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_hf(model_type, **{**(MIXTRAL if model_type == "mixtral" else {}), **overrides})


def _parallelize(shape: dict[str, int], model: torch.nn.Module | None = None, **kwargs) -> torch.nn.Module:
    import meshplan

    mesh = init_device_mesh("cpu", tuple(shape.values()), mesh_dim_names=tuple(shape))
    return meshplan.parallelize(model if model is not None else _meta(), mesh, **kwargs)


LAYOUTS = {
    # mesh, ep_size -> (dims EP borrows, ep ranks of rank 5, expert FSDP mesh dims and shape, local gate_up rows)
    "ep4-from-dp_shard": ({"dp_shard": 8}, 4, ("dp_shard",), [4, 5, 6, 7], 1),
    "ep4-borrows-tp": ({"dp_shard": 4, "tp": 2}, 4, ("dp_shard", "tp"), [4, 5, 6, 7], 1),
    "ep8-borrows-tp": ({"dp_shard": 4, "tp": 2}, 8, ("dp_shard", "tp"), list(range(8)), 1),
    "ep2-hsdp": ({"dp_replicate": 2, "dp_shard": 4}, 2, ("dp_shard",), [4, 5], 2),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_which_ranks_hold_which_experts(fake_pg, case):
    shape, ep_size, borrowed, ep_ranks, local_rows = LAYOUTS[case]
    with fake_pg(8, rank=5):
        model = _parallelize(shape, ep_size=ep_size, **({"tp_plan": ATTENTION_TP} if "tp" in shape else {}))
        report = model._meshplan_report
        experts = model.model.layers[0].mlp.experts
        gate_up = experts.gate_up_proj
        assert report["roles"]["ep"] == {"dims": list(borrowed), "size": ep_size}
        assert "ExpertParallel" in str(report["ep_plan"]["entries"])
        assert isinstance(gate_up, DTensor) and gate_up.device_mesh.mesh_dim_names[-1] == "ep"
        assert sorted(gate_up.device_mesh["ep"].mesh.flatten().tolist()) == ep_ranks
        # 8 experts split over ep, then FSDP-sharded on dim 0 over the ranks holding the same experts
        assert gate_up.to_local().shape[0] == local_rows
        assert tuple(gate_up.shape) == (8, 256, 64)
        router = model.model.layers[0].mlp.gate.weight
        assert "ep" not in router.device_mesh.mesh_dim_names  # dense parameters keep the dense layout


def test_thousands_of_ranks(fake_pg):
    """2,048 ranks (dp_shard 256 x tp 8), 64 experts over ep=64: carving and sharding take seconds."""
    model = _meta(num_local_experts=64, intermediate_size=16, num_attention_heads=8, num_key_value_heads=8,
                  head_dim=8)
    with fake_pg(2048, rank=2047):
        start = time.perf_counter()
        model = _parallelize({"dp_shard": 256, "tp": 8}, model, ep_size=64, tp_plan=ATTENTION_TP)
        elapsed = time.perf_counter() - start
        gate_up = model.model.layers[1].mlp.experts.gate_up_proj
        assert gate_up.device_mesh.mesh_dim_names == ("expert_dp_shard", "ep")
        assert tuple(gate_up.device_mesh.shape) == (32, 64)
        assert gate_up.to_local().numel() <= 32 * 64  # at most the one expert of this EP rank (FSDP-sharded)
    assert elapsed < 30, elapsed


BAD = {
    "ep-vs-experts": ({"dp_shard": 4}, {}, {"ep_size": 3}, ExpertParallelError, "does not divide the 8 experts"),
    "ep-vs-ranks": ({"dp_shard": 2, "tp": 2}, {}, {"ep_size": 8, "tp_plan": ATTENTION_TP}, ExpertParallelError,
                    "must divide the 4 ranks expert parallelism borrows (dp_shard x tp)"),
    "ep-vs-tp": ({"dp_shard": 1, "tp": 4}, {"num_key_value_heads": 4}, {"ep_size": 2, "tp_plan": ATTENTION_TP},
                 ExpertParallelError,
                 "must be a multiple of the TP size 4"),
    "no-experts": ({"dp_shard": 4}, {"model_type": "llama"}, {"ep_size": 2}, ExpertParallelError,
                   "has no mixture-of-experts layers"),
    "unmatched-key": ({"dp_shard": 4}, {}, {"ep_size": 2, "ep_plan": {"model.layers.*.mlp.expertz":
                                                                      "ep_dispatch_experts"}},
                      UnmatchedPlanKeyError, "EP plan key(s)"),
    "grouped-gemm-alone": ({"dp_shard": 4}, {}, {"ep_size": 2, "ep_plan": {"model.layers.*.mlp.experts.down_proj":
                                                                           "grouped_gemm"}},
                           PlanError, "add 'model.layers.*.mlp.experts': 'ep_dispatch_experts'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_the_same_typed_error_on_every_rank(fake_pg, case):
    shape, overrides, kwargs, error, text = BAD[case]
    messages = []
    for rank in (0, 3):
        with fake_pg(4, rank=rank), pytest.raises(error) as info:
            _parallelize(shape, _meta(**overrides), **kwargs)
        messages.append(str(info.value))
    assert text in messages[0] and messages[0] == messages[1], messages


def test_expert_parallelism_needs_the_strategy_to_declare_it(fake_pg):
    """EP switches on by ``supports``, never by an option's name: a strategy whose options carry ``ep_size`` but that
    declares only ``{"tp"}`` is refused ``ep_size=2`` up front, with the same typed error on every rank."""
    import dataclasses

    import meshplan
    from meshplan import ComposedStrategy, ExpertParallelOptions, UnsupportedAxisError

    @dataclasses.dataclass
    class Options(ExpertParallelOptions):
        pass

    class NoEP(ComposedStrategy):
        name = "no_ep"
        supports = frozenset({"tp"})
        options_class = Options

        def wrap_data_parallel(self, model, roles, plans, options, validated, done):
            return model

    messages = []
    for rank in (0, 1):
        with fake_pg(2, rank=rank):
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
            with pytest.raises(UnsupportedAxisError, match=r"'no_ep' does not support expert parallelism.*ep_size=2"
                               r".*supports \['tp'\]") as info:
                meshplan.prepare(_meta(), mesh, strategy=NoEP(), ep_size=2)
            messages.append(str(info.value))
    assert messages[0] == messages[1]
