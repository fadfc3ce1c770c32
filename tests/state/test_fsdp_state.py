"""FSDP2's private state is read in one place (meshplan.state.fsdp_state), also for units with several
parameter groups (parameters on another mesh through ``shard_placement_fn``, as experts are)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from meshplan.core.torch_private import FSDPMeshInfo, ShardPlacementResult
from meshplan.dryrun.layout import fsdp_units, param_layouts
from meshplan.state.fsdp_state import (
    mixed_precision_policy,
    param_groups,
    reshard_settings,
    reshards_after_forward,
)
from meshplan.state.unshard import unshard_fsdp2_model

FP32 = MixedPrecisionPolicy()


def _two_group_unit() -> nn.Module:
    """One FSDP unit whose second Linear's weight is sharded over another mesh dim: two parameter groups."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    other = FSDPMeshInfo(mesh["ep"], shard_mesh_dim=0)
    fully_shard(model, mesh=mesh["dp"], mp_policy=FP32,
                shard_placement_fn=lambda p: ShardPlacementResult(Shard(0), other) if p is model[1].weight else None)
    return model


def test_unit_with_several_parameter_groups_is_read_and_unsharded(fake_pg):
    with fake_pg(4):
        model = _two_group_unit()
        assert len(param_groups(model)) == 2
        assert mixed_precision_policy(model) == FP32 and reshards_after_forward(model) is True
        units = fsdp_units(model, param_layouts(model, ()))  # explain's view: was an AssertionError
        assert [(u["module"], u["parameters"], u["reshard_after_forward"]) for u in units] == [("", 40, True)]
        before = reshard_settings(model)
        with unshard_fsdp2_model(model):
            assert reshard_settings(model) == [None, None]  # every group stops resharding
        assert reshard_settings(model) == before and None not in before
        param_groups(model)[1].post_forward_mesh_info = None
        assert reshards_after_forward(model) is None  # groups disagree: unknown, not a guess


def test_modules_without_fsdp_state_give_unknown_answers():
    plain = nn.Linear(2, 2)
    assert param_groups(plain) == [] and mixed_precision_policy(plain) is None
    assert reshards_after_forward(plain) is None and reshard_settings(plain) == []


def test_torch_before_2_12_keeps_one_group_under_the_singular_name():
    """torch 2.10-2.11 have ``_fsdp_param_group`` only; explain and unshard must still see it."""
    from types import SimpleNamespace

    from meshplan.state.fsdp_state import param_groups, reshards_after_forward

    group = SimpleNamespace(post_forward_mesh_info=None)
    unit = SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(_fsdp_param_group=group))
    assert param_groups(unit) == [group] and reshards_after_forward(unit) is False
