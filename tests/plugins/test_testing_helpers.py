import pytest
import torch
import torch.distributed as dist

from meshplan.plugins.testing import RankError


def all_reduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("only rank one fails")
    return "fine"


def test_pool_runs_a_collective_and_returns_per_rank_results(ranks2):
    assert ranks2.run(all_reduce_rank) == [(0, 1.0), (1, 1.0)]


def test_pool_reraises_naming_the_rank(ranks2):
    with pytest.raises(RankError, match="rank 1 raised ValueError: only rank one fails") as info:
        ranks2.run(fail_on_rank_one)
    assert set(info.value.errors) == {1}
    assert ranks2.run(all_reduce_rank)[0] == (0, 1.0)  # the pool survives a failed task


def test_fake_process_group_of_thousands_of_ranks(fake_pg):
    from torch.distributed.device_mesh import init_device_mesh

    with fake_pg(4096, rank=17):
        mesh = init_device_mesh("cpu", (16, 256), mesh_dim_names=("dp", "tp"))
        assert mesh["tp"].size() == 256 and dist.get_world_size() == 4096


class NeedsTwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def raise_unpicklable():
    raise NeedsTwoArguments("cannot", "unpickle")


def test_unpicklable_errors_arrive_as_descriptions(ranks2):
    with pytest.raises(RankError, match="NeedsTwoArguments: cannot unpickle") as info:
        ranks2.run(raise_unpicklable)
    assert set(info.value.errors) == {0, 1}
    assert ranks2.run(all_reduce_rank) == [(0, 1.0), (1, 1.0)]  # no stale replies left behind


def test_tp_only_strategy_for_plan_authors(fake_pg):
    """``meshplan.plugins.testing`` offers the TP-only strategy and TP mesh a plan author tests a plan with."""
    import meshplan
    from meshplan.plugins.testing import TensorParallelOnly, tp_mesh
    from tests.support import TinyStack

    meshplan.register_strategy(TensorParallelOnly)
    with fake_pg(2):
        model = meshplan.parallelize(TinyStack(), tp_mesh(), strategy="tp_test",
                                     tp_plan={"layers.*.up": "colwise", "layers.*.down": "rowwise"})
        assert tuple(model.layers[0].up.weight.to_local().shape) == (16, 16)  # 32 rows / tp 2
        assert not hasattr(model, "_get_fsdp_state")  # no data-parallel wrapping
