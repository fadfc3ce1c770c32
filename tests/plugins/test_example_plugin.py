"""The example plugin package under examples/: pip-installed (offline), listed, and used by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "meshplan-example-strategy"

USE_IT = """
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
import meshplan
from meshplan.plugins.testing import fake_process_group

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
with fake_process_group(4):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = meshplan.parallelize(model, mesh, strategy="tensor-parallel-only", tp_plan={"0": "colwise", "2": "rowwise"})
    assert isinstance(model[0].weight, DTensor) and model[0].weight.to_local().shape == (8, 8)
    print(meshplan.get_report(model)["strategy"])
"""

#: The plugin's ``model_parallel_only`` (supports tp and ep) gets EP through the contract; its ``tp_only`` (supports
#: tp) is refused ep_size and a cp dim with the typed error, on the first and the last rank alike.
USE_EP = """
import torch
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig, AutoModelForCausalLM
import meshplan
from meshplan.plugins.testing import fake_process_group

config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                              num_experts_per_tok=2)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
with fake_process_group(4, rank=1):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = meshplan.parallelize(model, mesh, strategy="model_parallel_only", ep_size=2)
    weight = model.model.layers[0].mlp.experts.gate_up_proj
    report = meshplan.get_report(model)
    print(report["strategy"], weight.device_mesh.mesh_dim_names, tuple(weight.to_local().shape), report["roles"]["ep"])
for rank in (0, 3):
    with fake_process_group(4, rank=rank):
        for dims, options in ((("dp", "tp"), {"ep_size": 2}), (("cp", "tp"), {})):
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=dims)
            try:
                meshplan.prepare(model, mesh, strategy="tp_only", **options)
            except meshplan.UnsupportedAxisError as exc:
                print(rank, exc)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example, built from a copy (the checkout stays clean) and installed into a fresh folder."""
    work = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPLAN_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_installed_example_is_listed_with_provenance(site):
    result = _run(site, "-m", "meshplan", "strategies", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    row = rows["tp_only"]
    assert row["plugin"] == "example_strategy" and row["distribution"] == "meshplan-example-strategy"
    assert row["version"] == "0.1.0" and row["tier"] == "plugin" and row["status"] == "active"
    assert row["aliases"] == ["tensor-parallel-only"]
    assert {"name": "require_tp", "type": "bool", "default": "True"} in row["options"]
    assert row["supports"] == ["tp"] and rows["model_parallel_only"]["supports"] == ["ep", "tp"]


def test_installed_example_is_used_by_parallelize(site):
    result = _run(site, "-c", USE_IT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tp_only"


def test_installed_example_gets_expert_parallelism_through_the_contract(site):
    result = _run(site, "-c", USE_EP)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # 4 experts split over ep=2 (ranks carved from dp), each expert's intermediate rows over tp=2
    assert lines[0] == "model_parallel_only ('ep', 'tp') (2, 128, 64) {'dims': ['dp'], 'size': 2}"
    refused = [line.split(" ", 1) for line in lines[1:]]
    assert [rank for rank, _ in refused] == ["0", "0", "3", "3"]
    assert "'tp_only' does not support expert parallelism ('ep'), asked for by ep_size=2" in refused[0][1]
    assert "'tp_only' does not support context parallelism ('cp'), asked for by mesh dim 'cp'" in refused[1][1]
    assert [message for _, message in refused[:2]] == [message for _, message in refused[2:]]


def test_example_own_tests_pass(site):
    result = _run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(site),
                  str(EXAMPLE / "tests"))
    assert result.returncode == 0, result.stdout + result.stderr
