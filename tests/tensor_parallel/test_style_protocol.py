"""A plugin's style that implements the style protocol (:class:`meshplan.Style`) and is registered by name with
``register_style`` is validated, explained and checkpointed like meshplan's own styles, with no edit in meshplan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import meshplan
from meshplan import ParamSplit, Style, StyleModuleTypeError, TensorParallelSizeError
from meshplan.tensor_parallel.styles.traits import predicted_placement, traits_of
from tests.support import TensorParallelOnly, relative_error, tp_mesh


class PairColwise(Style):
    """A plugin's column split of a fused ``[gate; up]`` Linear: it declares both halves packed along the output
    features (so each rank holds ``[gate_r; up_r]``) and computes on its local shards."""

    module_types = (nn.Linear,)
    shards_parameters = True

    def placements(self, module: nn.Module) -> dict[str, ParamSplit]:
        half = module.out_features // 2
        return {name: ParamSplit(0, (half, half)) for name, _ in module.named_parameters(recurse=False)}

    def check(self, module: nn.Module, tp_size: int) -> None:
        if module.out_features % (2 * tp_size):
            raise TensorParallelSizeError(f"PairColwise: {module.out_features} features are no two halves that "
                                          f"divide by the TP size {tp_size}.")

    def parallelize(self, module: nn.Module, device_mesh) -> nn.Module:
        self.distribute_parameters(module, device_mesh)

        def local_forward(x: torch.Tensor) -> torch.Tensor:
            bias = module.bias.to_local() if module.bias is not None else None
            return nn.functional.linear(x, module.weight.to_local(), bias)

        module.forward = local_forward
        return module

    def __repr__(self) -> str:
        return "PairColwise()"


class GatedMLP(nn.Module):
    """``down([silu(gate); up])`` with gate and up fused in one Linear and down reading the fused width."""

    def __init__(self, width: int = 8, inner: int = 6) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * inner)
        self.down = nn.Linear(2 * inner, width)
        self.embed = nn.Embedding(16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(torch.cat([nn.functional.silu(gate), up], -1))


PLAN = {"gate_up": "pair_colwise", "down": "packed_rowwise"}


@pytest.fixture
def mesh2(fake_pg):
    meshplan.register_strategy(TensorParallelOnly)
    meshplan.register_style("pair_colwise", PairColwise)
    with fake_pg(2):
        yield tp_mesh()


def test_the_protocol_is_what_validation_asks(mesh2):
    """Its checks, module types and placements reach validation through the protocol, before any collective."""
    style = PairColwise()
    assert traits_of(style) is style
    assert predicted_placement(style, nn.Linear(8, 12), "weight") == f"packed {Shard(0)}"
    with pytest.raises(TensorParallelSizeError, match="PairColwise: 6 features"):
        meshplan.prepare(GatedMLP(inner=3), mesh2, strategy="tp_test", tp_plan=PLAN)
    with pytest.raises(StyleModuleTypeError, match="PairColwise cannot shard module 'embed'"):
        meshplan.prepare(GatedMLP(), mesh2, strategy="tp_test", tp_plan={"embed": "pair_colwise"})
    prepared = meshplan.prepare(GatedMLP(), mesh2, strategy="tp_test", tp_plan=PLAN)
    assert "PairColwise()" in str(prepared.report())
    assert "gate_up" not in prepared.plan.replicated_linears


def test_explain_reports_the_plugin_style():
    meshplan.register_strategy(TensorParallelOnly)
    meshplan.register_style("pair_colwise", PairColwise)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    plan = {"model.layers.*.mlp.gate_up_proj": "pair_colwise", "model.layers.*.mlp.down_proj": "packed_rowwise"}
    report = meshplan.explain("phi3", {"tp": 2}, "tp_test", tp_plan=plan, overrides=tiny, precision="fp32")
    styles = {entry["key"]: entry["style"] for entry in report["plan"]["entries"]}
    assert styles["model.layers.*.mlp.gate_up_proj"] == "PairColwise()", styles
    replicated = str(report["replicated_parameters"])
    assert "gate_up_proj" not in replicated and "down_proj.weight" not in replicated, replicated
    with pytest.raises(TensorParallelSizeError, match="PairColwise"):
        meshplan.explain("phi3", {"tp": 2}, "tp_test", tp_plan=plan, overrides={**tiny, "intermediate_size": 33})


def _train_and_checkpoint(path: str) -> dict:
    from meshplan import gather_full_state_dict, load_distributed_checkpoint, save_distributed_checkpoint

    meshplan.register_strategy(TensorParallelOnly)
    meshplan.register_style("pair_colwise", PairColwise)
    torch.manual_seed(0)
    reference = GatedMLP()
    model = meshplan.parallelize(copy.deepcopy(reference), tp_mesh(), strategy="tp_test", tp_plan=PLAN)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    expected, actual = reference(x), model(x)
    expected.square().sum().backward()
    actual.square().sum().backward()
    grads = meshplan.unpack_full_state_dict(model, {n: p.grad.full_tensor() for n, p in model.named_parameters()
                                                    if isinstance(p.grad, DTensor)})
    full = gather_full_state_dict(model, rank0_only=False)
    save_distributed_checkpoint(model, path)
    restored = GatedMLP()
    for param in restored.parameters():
        param.data.zero_()
    load_distributed_checkpoint(restored, path)
    truth = reference.state_dict()
    return {
        "output": relative_error(actual.detach(), expected.detach()),
        "grads": max(relative_error(grads[n], reference.get_parameter(n).grad) for n in grads),
        "model_order": torch.equal(model.gate_up.weight.full_tensor(), truth["gate_up.weight"]),
        "gathered": all(torch.equal(full[k], v) for k, v in truth.items()),
        "checkpoint": all(torch.equal(restored.state_dict()[k], v) for k, v in truth.items()),
    }


@pytest.mark.distributed
def test_a_plugin_style_trains_and_checkpoints_in_model_order(ranks2, tmp_path):
    """Its declared packed placements (equal parts) become ``_StridedShard``: ``full_tensor()``, the gathered state
    dict and checkpoints are in the model's order."""
    for result in ranks2.run(_train_and_checkpoint, str(tmp_path), timeout=300):
        assert result["output"] <= 1e-5 and result["grads"] <= 1e-5, result
        assert result["model_order"] and result["gathered"] and result["checkpoint"], result


def test_torch_styles_are_described_by_the_apply_they_run():
    """A subclass keeping torch's ``_apply`` answers as torch's class; one with its own ``_apply`` is unknown."""
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

    from meshplan.tensor_parallel.styles.composition import ChainedStyles, KeepReplicated
    from meshplan.tensor_parallel.styles.traits import shards_parameters

    class Renamed(ColwiseParallel):
        pass

    class Rewritten(ColwiseParallel):
        def _apply(self, module, device_mesh):
            return module

    linear, norm = nn.Linear(4, 8), nn.LayerNorm(4)
    assert traits_of(Renamed()).module_types == (nn.Linear, nn.Embedding) and shards_parameters(Renamed())
    assert traits_of(Rewritten()).module_types is None and predicted_placement(Rewritten(), linear, "weight") is None
    assert predicted_placement(RowwiseParallel(), linear, "bias") == ParamSplit(None).placement()
    assert predicted_placement(SequenceParallel(), norm, "weight") == ParamSplit(None).placement()
    assert not shards_parameters(SequenceParallel()) and not shards_parameters(KeepReplicated())
    chained = ChainedStyles(KeepReplicated(), PairColwise(), RowwiseParallel())
    assert chained.module_types == (nn.Linear,) and shards_parameters(chained)
    assert predicted_placement(chained, linear, "weight") is None  # placed twice: known only after applying

    class Bare(ParallelStyle):
        def _apply(self, module, device_mesh):
            return module

    assert predicted_placement(Bare(), linear, "weight") is None and not shards_parameters(Bare())
