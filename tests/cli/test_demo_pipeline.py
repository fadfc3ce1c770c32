"""``meshplan demo --pp 2 --pp-schedule 1f1b`` on 2 self-launched ranks: the model is split into two stages (each
rank holds part of the parameters), trains, and both ranks end with the same loss and checksum."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.cli.test_demo import FINAL, _env

BYTES = re.compile(r"parameter bytes per rank 0: ([\d,]+), 1: ([\d,]+)")
TOTAL = re.compile(r"\(\w+, ([\d,]+) parameters\)")


def test_demo_with_pp2_1f1b_trains_on_two_ranks():
    result = subprocess.run([sys.executable, "-m", "meshplan", "demo", "--pp", "2", "--pp-schedule", "1f1b",
                             "--steps", "3"], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mesh pp=2 x dp_replicate=1 x dp_shard=1 x tp=1 on 2 ranks (cpu, gloo)" in out, out
    assert len(re.findall(r"^step +\d+/3  loss \d+\.\d+", out, flags=re.M)) == 3
    assert re.search(r"summary: loss \S+ -> \S+ \(decreased\); ranks agree", out), out
    finals = FINAL.findall(out)
    assert sorted(int(rank) for rank, *_ in finals) == [0, 1]
    assert len({(loss, checksum) for _, _, loss, checksum in finals}) == 1
    stage_bytes = [int(b.replace(",", "")) for b in BYTES.search(out).groups()]
    total = int(TOTAL.search(out).group(1).replace(",", ""))
    assert 0 < min(stage_bytes) and sum(stage_bytes) == 4 * total, (stage_bytes, total)  # fp32, each stage its part
