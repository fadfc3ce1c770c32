import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from meshplan import UnknownStyleError, register_style
from meshplan.core.styles import make_style
from meshplan.plugins.manager import get_registry


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
