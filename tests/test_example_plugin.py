"""The example plugin package under examples/: pip-installed (offline), listed, and used by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "meshplan-example-strategy"

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


def test_installed_example_is_used_by_parallelize(site):
    result = _run(site, "-c", USE_IT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tp_only"


def test_example_own_tests_pass(site):
    result = _run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(site),
                  str(EXAMPLE / "tests"))
    assert result.returncode == 0, result.stdout + result.stderr
