import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from meshplan import UnknownStyleError, register_style
from meshplan.plugins.manager import get_registry
from meshplan.tensor_parallel.vocabulary import make_style


def test_nemo_meanings():
    reg = get_registry()
    colwise_rep = make_style("colwise_rep", reg)
    assert isinstance(colwise_rep, ColwiseParallel) and colwise_rep.output_layouts == (Replicate(),)
    rowwise_rep = make_style("rowwise_rep", reg)
    assert isinstance(rowwise_rep, RowwiseParallel) and rowwise_rep.input_layouts == (Replicate(),)
    assert isinstance(make_style("sequence_parallel", reg), SequenceParallel)
    assert make_style("colwise", reg).output_layouts == (Shard(-1),)


def test_transformers_names_and_case_insensitivity():
    reg = get_registry()
    assert make_style("Colwise-Gather-Output", reg).output_layouts == (Replicate(),)
    assert isinstance(make_style("embedding_rowwise", reg), RowwiseParallel)


def test_every_lookup_is_a_fresh_object():
    reg = get_registry()
    assert make_style("colwise", reg) is not make_style("colwise", reg)


def test_unknown_style_lists_known_and_closest():
    with pytest.raises(UnknownStyleError, match="Did you mean 'colwise'") as info:
        make_style("colwize", get_registry())
    assert "rowwise" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_runtime_style_registration():
    register_style("my_style", lambda: ColwiseParallel(use_local_output=False))
    assert make_style("MY-STYLE", get_registry()).use_local_output is False


def test_transformers_styles_beyond_nemo():
    from torch.distributed.tensor.parallel import PrepareModuleOutput

    from meshplan.tensor_parallel.styles.composition import KeepReplicated
    from meshplan.tensor_parallel.styles.local_parameters import ReplicatedWithGradAllReduce
    from meshplan.tensor_parallel.styles.packed import PackedColwiseParallel, PackedRowwiseParallel

    reg = get_registry()
    assert isinstance(make_style("packed_colwise", reg), PackedColwiseParallel)
    assert isinstance(make_style("packed_rowwise", reg), PackedRowwiseParallel)
    assert isinstance(make_style("replicate", reg), KeepReplicated)
    assert isinstance(make_style("replicated_with_grad_allreduce", reg), ReplicatedWithGradAllReduce)
    assert isinstance(make_style("all_reduce", reg), PrepareModuleOutput)


def test_rank_major_packing_round_trips_and_groups_each_ranks_slices():
    import torch

    from meshplan.state.packing import pack_rank_major, unpack_rank_major

    full = torch.arange(16.0).reshape(8, 2)  # parts of 4 (q), 2 (k), 2 (v) rows
    packed = pack_rank_major(full, (4, 2, 2), world=2)
    assert packed[:, 0].tolist() == [0, 2, 8, 12, 4, 6, 10, 14]  # rank 0: q0 q1 k0 v0 | rank 1: q2 q3 k1 v1
    assert torch.equal(unpack_rank_major(packed, (4, 2, 2), world=2), full)
    columns = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(unpack_rank_major(pack_rank_major(columns, (3, 3), 3, dim=1), (3, 3), 3, dim=1), columns)


def test_predicted_placements_of_tied_parameters():
    from torch import nn

    from meshplan.tensor_parallel.styles.composition import ChainedStyles, KeepReplicated
    from meshplan.tensor_parallel.styles.traits import predicted_placement

    embedding, linear = nn.Embedding(8, 4), nn.Linear(4, 8)
    assert predicted_placement(RowwiseParallel(), embedding, "weight") == predicted_placement(
        ColwiseParallel(), linear, "weight") == str(Shard(0))
    assert predicted_placement(ColwiseParallel(), embedding, "weight") == str(Shard(1))
    assert predicted_placement(RowwiseParallel(), linear, "bias") == str(Replicate())
    assert predicted_placement(None, linear, "weight") == predicted_placement(KeepReplicated(), linear, "weight")
    assert predicted_placement(ChainedStyles(KeepReplicated(), ColwiseParallel()), linear, "weight") == str(Shard(0))


def test_every_style_has_an_address_free_repr():
    """Reports show styles by ``repr``: no ``<... object at 0x...>`` for any built-in or custom style."""
    from torch.distributed.tensor.parallel import ParallelStyle

    from meshplan.plans.phi3_attention import Phi3LocalHeads
    from meshplan.tensor_parallel.plan import describe_style
    from meshplan.tensor_parallel.styles.composition import ChainedStyles, KeepReplicated
    from meshplan.tensor_parallel.styles.hidden_states import PrepareHiddenStates
    from meshplan.tensor_parallel.styles.local_parameters import LocalShardedParameters, ReplicatedWithGradAllReduce
    from meshplan.tensor_parallel.styles.packed import PackedColwiseParallel

    class Bare(ParallelStyle):  # a plugin's style without __repr__
        def _apply(self, module, device_mesh):
            return module

    reg = get_registry()
    styles = [make_style(name, reg) for name in reg.styles.keys()] + [
        Phi3LocalHeads(), KeepReplicated(), ReplicatedWithGradAllReduce(), LocalShardedParameters({"sinks": 0}),
        PrepareHiddenStates(Replicate(), Shard(1)), ChainedStyles(KeepReplicated(), Phi3LocalHeads()),
        PackedColwiseParallel((4, 2, 2)),
    ]
    shown = [describe_style(style) for style in styles]
    assert not [text for text in shown if " at 0x" in text]
    assert "ReplicatedWithGradAllReduce()" in shown and "Phi3LocalHeads()" in shown
    assert "sizes=[4, 2, 2]" in shown[-1] and describe_style(Bare()) == "Bare()"
