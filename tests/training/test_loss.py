"""``meshplan.num_items_in_batch`` / ``meshplan.token_weighted_loss``: data-parallel ranks with different numbers of
valid labels give the per-token mean over the global batch of one process (the naive mean of per-rank means does
not), with FSDP2 alone and with context parallelism."""

from __future__ import annotations

import pytest
import torch

import meshplan
from tests.training.loss_ranks import token_weighted_parity


def _check(results: list[dict]) -> None:
    for result in results:
        assert result["naive_loss"] > 1e-3, result  # the uneven counts matter: the mean of means is off
        assert result["loss"] <= 1e-6 and result["grad"] <= 1e-5, result


@pytest.mark.distributed
def test_num_items_in_batch_on_uneven_ranks(ranks2):
    _check(ranks2.run(token_weighted_parity, {"dp_shard": 2}, timeout=180))


@pytest.mark.distributed
def test_token_weighted_loss_of_own_cross_entropy(ranks2):
    _check(ranks2.run(token_weighted_parity, {"dp_shard": 2}, own_loss=True, timeout=180))


@pytest.mark.distributed
def test_num_items_in_batch_with_context_parallel(ranks4):
    _check(ranks4.run(token_weighted_parity, {"dp_shard": 2, "cp": 2}, timeout=180))


@pytest.mark.distributed
def test_four_data_parallel_ranks(ranks4):
    _check(ranks4.run(token_weighted_parity, {"dp_shard": 4}, timeout=180))


def test_one_process():
    labels = torch.tensor([[7, 3, 4, -100, 5]])
    assert float(meshplan.num_items_in_batch({"labels": labels})) == 3.0  # the first label is never scored
    assert float(meshplan.num_items_in_batch({"shift_labels": labels})) == 4.0  # already shifted
    assert float(meshplan.token_weighted_loss(torch.tensor(6.0), 3)) == 2.0
