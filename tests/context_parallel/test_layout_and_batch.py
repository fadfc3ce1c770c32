"""The load-balanced layout, batch sharding and the checks that run before any collective."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from meshplan.context_parallel import sequence_layout as layout
from meshplan.context_parallel import shard_batch, validate_context_parallel
from meshplan.context_parallel.batch import next_token_labels
from meshplan.core.errors import (
    ContextParallelError,
    OptionsError,
    SequenceLengthError,
    UnshardedInputError,
    UnsupportedAttentionError,
)
from tests.support import TinyStack, tiny_hf


def test_each_rank_holds_a_head_and_a_tail_chunk():
    assert layout.shard_indices(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert layout.shard_indices(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    gathered = layout.gathered_indices(24, 3)
    assert sorted(gathered.tolist()) == list(range(24))
    assert torch.equal(gathered[layout.restore_order(24, 3)], torch.arange(24))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_every_rank_does_the_same_causal_work(cp):
    seq_len = 64 * cp
    work = [int((layout.shard_indices(seq_len, r, cp) + 1).sum()) for r in range(cp)]  # keys each query sees
    assert len(set(work)) == 1


def test_sequence_length_must_split_into_2cp_chunks():
    with pytest.raises(SequenceLengthError, match="divisible by 2 x cp = 4.*got 10"):
        layout.check_sequence_length(10, 2)
    with pytest.raises(SequenceLengthError, match="must be even"):
        layout.check_local_length(5, 2)


def test_shard_batch_shifts_labels_before_sharding(fake_pg):
    with fake_pg(2):  # this process is rank 0 of a fake 2-rank world
        cp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))["cp"]
        ids = torch.arange(8).reshape(1, 8) + 100
        mask = torch.ones(1, 8, dtype=torch.long)
        shard = shard_batch({"input_ids": ids, "labels": ids, "attention_mask": mask, "extra": 7}, cp_mesh)
        with pytest.raises(SequenceLengthError, match="divisible by 2 x cp = 4"):
            shard_batch({"input_ids": torch.zeros(1, 6, dtype=torch.long)}, cp_mesh)
    assert shard["input_ids"].tolist() == [[100, 101, 106, 107]]
    assert shard["position_ids"].tolist() == [[0, 1, 6, 7]]
    assert shard["labels"].tolist() == [[101, 102, 107, -100]]  # next tokens; the last one is never scored
    assert shard["shift_labels"] is shard["labels"]
    assert float(shard["num_items_in_batch"]) == 7 / 2  # the mean over the 2 CP ranks = per-token mean
    assert shard["attention_mask"].shape == (1, 4) and shard["extra"] == 7
    assert next_token_labels(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, -100]]


def test_attention_that_cannot_be_wrapped_is_named():
    with pytest.raises(UnsupportedAttentionError, match="TinyStack is not a transformers model"):
        validate_context_parallel(TinyStack(), "allgather", "cpu")
    model = tiny_hf("llama", num_hidden_layers=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedAttentionError, match="LlamaForCausalLM uses attn_implementation='flash_att"):
        validate_context_parallel(model, "allgather", "cpu")
    model.config._attn_implementation = "sdpa"
    with pytest.raises(UnsupportedAttentionError, match="runs only on CUDA"):
        validate_context_parallel(model, "ring", "cpu")
    with pytest.raises(OptionsError, match="cp_implementation must be one of"):
        validate_context_parallel(model, "ulysses", "cpu")
    mistral = tiny_hf("mistral", num_hidden_layers=1, sliding_window=8, attn_implementation="sdpa")
    with pytest.raises(UnsupportedAttentionError, match="sliding window"):
        validate_context_parallel(mistral, "ring", "cuda")


def test_query_blocks_stay_inside_a_chunk_and_cut_at_documents(monkeypatch):
    from meshplan.context_parallel import forward

    monkeypatch.setattr(forward, "QUERY_BLOCK", 3)
    assert forward.query_blocks(8) == ((0, 3), (3, 4), (4, 7), (7, 8))
    monkeypatch.setattr(forward, "QUERY_BLOCK", 8)
    monkeypatch.setattr(forward, "MIN_QUERY_BLOCK", 2)
    # documents start at local 1 (too close to the block start), 3, 8 (a chunk start), 9 and 13
    assert forward.query_blocks(16, torch.tensor([1, 3, 8, 9, 13])) == ((0, 3), (3, 8), (8, 13), (13, 16))


def test_ring_is_accepted_for_causal_sdpa_on_cuda():
    validate_context_parallel(tiny_hf("llama", num_hidden_layers=1, attn_implementation="sdpa"), "ring", "cuda")


def test_documents_from_position_ids_seq_idx_and_cu_seq_lens_agree():
    """The three ways packed rows mark documents give the same documents and in-document positions; position ids
    count only without an attention mask (transformers' rule), and DataCollatorWithFlattening's output is read."""
    from transformers import DataCollatorWithFlattening

    from meshplan.context_parallel.documents import document_ids

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    from_positions = document_ids({"position_ids": positions}, 1, 9)
    assert torch.equal(from_positions[0], seq_idx) and torch.equal(from_positions[1], positions)
    for marks in ({"seq_idx": seq_idx}, {"cu_seq_lens_q": torch.tensor([0, 3, 5, 9], dtype=torch.int32)}):
        documents, restarting = document_ids(marks, 1, 9)
        assert torch.equal(documents, seq_idx) and torch.equal(restarting, positions)
    assert document_ids({"position_ids": positions, "attention_mask": torch.ones(1, 9)}, 1, 9) == (None, None)
    assert document_ids({"position_ids": torch.arange(9).unsqueeze(0)}, 1, 9) == (None, None)  # one document
    collated = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": list(range(10, 13))}, {"input_ids": [20, 21]}, {"input_ids": [30, 31, 32, 33]}])
    documents, restarting = document_ids(collated, 1, 9)
    assert torch.equal(documents, seq_idx) and torch.equal(restarting, positions)
    with pytest.raises(ContextParallelError, match="cu_seq_lens_q must be the cumulative document lengths"):
        document_ids({"cu_seq_lens_q": torch.tensor([0, 3, 9])}, 2, 9)


def test_shard_batch_carries_the_whole_sequence_for_the_attention(fake_pg):
    from meshplan.context_parallel.apply import check_shard
    from meshplan.context_parallel.batch import SHARD_KEY, SequenceShard

    ids = torch.arange(8).reshape(1, 8)
    with fake_pg(2):
        cp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))["cp"]
        packed = shard_batch({"input_ids": ids, "seq_idx": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]),
                              "cu_seq_lens_q": torch.tensor([0, 3, 8]), "max_length_q": 5}, cp_mesh)
        padded = shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])}, cp_mesh)
    assert "seq_idx" not in packed and "cu_seq_lens_q" not in packed and "max_length_q" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 3, 4]]  # restarting at the second document (token 3)
    shard = packed[SHARD_KEY]
    assert (shard.cp_size, shard.seq_len, shard.key_padding) == (2, 8, None)
    assert shard.documents.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert padded[SHARD_KEY].key_padding.tolist() == [[False, False] + [True] * 6]
    check_shard(shard, 4, 2, "allgather")
    with pytest.raises(UnshardedInputError, match=r"not sharded for it.*shard_batch"):
        check_shard(None, 4, 2, "allgather")
    with pytest.raises(UnshardedInputError, match="sharded for 2 CP ranks and sequences of 8 tokens"):
        check_shard(shard, 2, 4, "allgather")
    with pytest.raises(ContextParallelError, match="'ring' is plain causal attention"):
        check_shard(SequenceShard(2, 8, torch.ones(1, 8, dtype=torch.bool)), 4, 2, "ring")
