"""``meshplan demo``: self-launched local ranks, an external multi-node torchrun, and the result checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from meshplan.cli.demo import DemoCheckError, DemoConfig, DemoResult, _check, synthetic_batch
from meshplan.cli.main import main
from meshplan.plugins.testing import free_port

FINAL = re.compile(r"\[rank (\d+)/(\d+)\] final loss (\S+) checksum (\S+)")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("MESHPLAN_")}


def test_demo_self_launches_and_trains():
    result = subprocess.run([sys.executable, "-m", "meshplan", "demo", "--steps", "4"], capture_output=True,
                            text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "strategy fsdp2, mesh dp_replicate=1 x dp_shard=2 x tp=1 on 2 ranks (cpu, gloo)" in out
    assert len(re.findall(r"^step +\d+/4  loss \d+\.\d+", out, flags=re.M)) == 4  # rank 0 only, one per step
    assert re.search(r"summary: loss \S+ -> \S+ \(decreased\); ranks agree; time/step", out)
    finals = FINAL.findall(out)
    assert sorted(int(rank) for rank, *_ in finals) == [0, 1]
    assert len({(loss, checksum) for _, _, loss, checksum in finals}) == 1


def test_demo_under_two_torchrun_nodes_agrees():
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"demo{port}",
               "-m", "meshplan", "demo", "--steps", "3"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out + err
    finals = [FINAL.findall(out) for out, _ in outputs]
    assert [len(f) for f in finals] == [1, 1]  # one rank per node
    (rank_a, world_a, loss_a, sum_a), (rank_b, world_b, loss_b, sum_b) = finals[0][0], finals[1][0]
    assert {rank_a, rank_b} == {"0", "1"} and world_a == world_b == "2"
    assert loss_a == loss_b and sum_a == sum_b


def test_demo_rejects_an_impossible_mesh_before_launching(capsys, monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["demo", "--tp", "3"]) == 2
    assert "MeshError: 2 ranks cannot form dp_replicate=1 x dp_shard x tp=3" in capsys.readouterr().err


def test_synthetic_data_is_learnable_and_seeded():
    config = DemoConfig(batch_size=4, seq_len=8)
    batch = synthetic_batch(3, config, vocab_size=16)
    assert torch.equal(batch, synthetic_batch(3, config, vocab_size=16))
    assert torch.equal((batch[:, 1:] - batch[:, :-1]) % 16, torch.ones(4, 7, dtype=batch.dtype))


def _check_on_rank(losses: list[float], checksum_per_rank: bool) -> str:
    checksum = float(dist.get_rank()) if checksum_per_rank else 1.0
    try:
        _check(DemoResult(losses, [0.1] * len(losses), checksum, [8, 8]), torch.device("cpu"))
    except DemoCheckError as exc:
        return str(exc)
    return "ok"


@pytest.mark.distributed
def test_result_checks_fail_on_every_rank(ranks2):
    assert ranks2.run(_check_on_rank, [3.0, 2.0], False) == ["ok", "ok"]
    assert all("did not decrease" in r for r in ranks2.run(_check_on_rank, [3.0, 3.5], False))
    assert all("ranks [1]" in r for r in ranks2.run(_check_on_rank, [3.0, 2.0], True))


def test_demo_mesh_with_cp_and_sequence_check(capsys, monkeypatch):
    from meshplan.cli.demo import mesh_dims

    assert mesh_dims(DemoConfig(cp=2, tp=2), 8) == {"dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 2}
    assert mesh_dims(DemoConfig(), 2) == {"dp_replicate": 1, "dp_shard": 2, "tp": 1}  # no cp dim without --cp
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["demo", "--cp", "2", "--seq-len", "10"]) == 2
    assert "SequenceLengthError: Context parallelism over cp=2 needs a --seq-len divisible by 2 x cp = 4" in (
        capsys.readouterr().err)
