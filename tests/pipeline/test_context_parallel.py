"""Pipeline x context parallelism beyond the plain case of test_compositions.py: every microbatch's forward gets
the SequenceShard rows of its own microbatch (padding, documents), whatever order the schedule runs them in.
pp=2 x cp=2 on 4 gloo ranks against one process on the whole batch (3 SGD steps, fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from meshplan.context_parallel import SequenceShard
from tests.context_parallel.harness import packed_steps, padded_steps
from tests.parity import assert_parity
from tests.pipeline.harness import LLAMA4, pipeline_run, reference_run

VOCAB = 256  # tests.support.tiny_hf
PP_CP = {"pp": 2, "dp_shard": 1, "cp": 2}


def _data() -> dict[str, list]:
    """Packed rows (documents of different lengths) and left-padded rows, one two-row batch per step."""
    return {"packed": [step[0] for step in packed_steps(VOCAB)],
            "left-padded": [step[0] for step in padded_steps(VOCAB, "left")]}


#: name -> (data, schedule options): an interleaved schedule (two stages per rank), and a zero-bubble V schedule
#: (its backward split into input and weight gradients), each with a microbatch per row.
CASES = {
    "packed-interleaved1f1b": ("packed", {"pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2,
                                          "pp_microbatches": 2}),
    "left-padded-zbv": ("left-padded", {"pp_schedule": "ZBVZeroBubble", "pp_stages_per_rank": 2,
                                        "pp_microbatches": 2}),
}


def _run_all() -> dict:
    data = _data()
    return {name: pipeline_run(LLAMA4, PP_CP, options, data_parallel=(), cp=True, data=data[kind])
            for name, (kind, options) in CASES.items()}


def test_a_sequence_shard_splits_into_the_microbatches_of_its_rows() -> None:
    padding = torch.arange(32).reshape(4, 8) % 3 != 0
    documents = torch.arange(32).reshape(4, 8) // 5
    shard = SequenceShard(2, 8, padding, documents, documents * 2)
    ids = torch.zeros(4, 4, dtype=torch.long)
    _, kwargs = split_args_kwargs_into_chunks((ids,), {"shard": shard}, 2)
    for chunk, rows in zip(kwargs, (slice(0, 2), slice(2, 4))):
        part = chunk["shard"]
        assert isinstance(part, SequenceShard) and (part.cp_size, part.seq_len) == (2, 8)
        assert torch.equal(part.key_padding, padding[rows]) and torch.equal(part.documents, documents[rows])
        assert torch.equal(part.positions, documents[rows] * 2)


@pytest.mark.distributed
def test_packed_and_padded_rows_under_pp_x_cp_match_one_process(ranks4) -> None:
    results = ranks4.run(_run_all, timeout=600)
    data = _data()
    for name, (kind, _) in CASES.items():
        expected = reference_run(LLAMA4, data=data[kind])
        for rank, result in enumerate(results):
            try:
                assert_parity(result[name], expected)
            except AssertionError as exc:
                raise AssertionError(f"{name}, rank {rank}: {exc}") from exc


def test_context_parallel_switches_a_config_copy_that_a_stage_module_holds(fake_pg) -> None:
    """A pipeline stage's base model may hold its own copy of the config (cut to its blocks); transformers builds
    the masks from that copy, so CP must switch it too, or the stage gets a dense mask and fails."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.context_parallel import apply_context_parallel
    from meshplan.context_parallel.attention import ATTENTION_NAME

    model = LLAMA4.build()
    model.model.config = copy.copy(model.config)
    with fake_pg(2):
        apply_context_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))["cp"])
    assert model.config._attn_implementation == model.model.config._attn_implementation == ATTENTION_NAME
