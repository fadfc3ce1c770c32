"""``make gpu-check`` (bench/gpu_check.py) without a GPU: the real no-CUDA path, the check bodies on CPU, and
the orchestration (time limits, budget, summary table, gpu-check.json) with fake checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
HAS_CUDA_NODE = any(Path("/dev").glob("nvidia[0-9]*"))

# Records every subprocess the script starts, and whether it imported torch, in $SPAWN_RECORD.
SPY = """
import atexit, os, subprocess, sys
_record = os.environ["SPAWN_RECORD"]
_init = subprocess.Popen.__init__
def _spy(self, args, *rest, **kwargs):
    with open(_record, "a") as sink:
        sink.write("spawn " + (args if isinstance(args, str) else " ".join(map(str, args))) + "\\n")
    _init(self, args, *rest, **kwargs)
subprocess.Popen.__init__ = _spy
atexit.register(lambda: open(_record, "a").write(f"torch imported: {'torch' in sys.modules}\\n"))
"""


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.skipif(HAS_CUDA_NODE, reason="this machine has a CUDA device")
def test_without_cuda_it_says_so_exits_0_and_starts_or_installs_nothing(tmp_path):
    hook, bin_dir, record = tmp_path / "hook", tmp_path / "bin", tmp_path / "spawned.txt"
    hook.mkdir()
    bin_dir.mkdir()
    (hook / "sitecustomize.py").write_text(SPY)
    for name in ("pip", "pip3"):
        _fake_command(bin_dir, name, f"touch {tmp_path}/{name}-was-run; exit 9")
    _fake_command(bin_dir, "nvidia-smi", "exit 9")  # a driver-less machine with the tools installed
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPU_CHECK_PYTHON")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(hook), SPAWN_RECORD=str(record),
               GPU_CHECK_OUT=str(tmp_path / "out"), GPU_CHECK_PYTHON=sys.executable)
    start = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("gpu-check: no CUDA device (no /dev/nvidia* device node and no GPU listed")
    assert "nothing installed" in result.stdout
    assert record.read_text().splitlines() == [f"spawn {bin_dir}/nvidia-smi -L", "torch imported: False"]
    assert not list(tmp_path.glob("pip*-was-run")) and not (tmp_path / "out").exists()
    assert time.monotonic() - start < 30


def test_cuda_detection_reads_device_nodes_nvidia_smi_and_cuda_visible_devices(gc, tmp_path):
    dev, bin_dir = tmp_path / "dev", tmp_path / "bin"
    dev.mkdir()
    bin_dir.mkdir()
    assert gc.cuda_device_visible({"PATH": str(bin_dir)}, dev) == (
        False, "no /dev/nvidia* device node and no GPU listed by nvidia-smi")
    _fake_command(bin_dir, "nvidia-smi", "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'")
    assert gc.cuda_device_visible({"PATH": str(bin_dir)}, dev) == (True, "nvidia-smi lists a GPU")
    (dev / "nvidiactl").touch()
    (dev / "nvidia0").touch()
    assert gc.cuda_device_visible({"PATH": ""}, dev) == (True, "device node /dev/nvidia0")
    assert gc.cuda_device_visible({"PATH": "", "CUDA_VISIBLE_DEVICES": ""}, dev)[0] is False


def _report(gc):
    tests = [{"id": "tests/a.py::test_ring", "outcome": "pass", "seconds": 1.5, "message": ""},
             {"id": "tests/a.py::test_a2a", "outcome": "skip", "seconds": 0.0, "message": "needs 2 GPUs"}]
    report = gc.Report("2026-11-30 14:00 UTC", {"python": "/opt/py", "torch": "2.13.0+cu130", "cuda": "13.0",
                                                "gpus": 1, "device_name": "NVIDIA H200"}, ["setup note"], 470.0)
    report.checks = [
        gc.CheckResult("fsdp2_cpu_offload_bf16", "pass", 12.345, {"loss_first": 6.2559, "loss_last": 3.5868,
                                                                   "param_shard_device": "cpu", "losses": [6.3, 3.6]}),
        gc.CheckResult("megatron_fsdp", "skip", 0.0, {}, "megatron_fsdp not importable in /opt/py"),
        gc.CheckResult("throughput_llama8b_4layers", "fail", 80.0, {"ratio": 0.9812},
                       "Traceback...\nratio 0.9812 is below the goal 0.99"),
        gc.CheckResult("pytest_gpu", "pass", 30.0, {"tests_pass": 1, "tests_fail": 0, "tests_skip": 1, "tests": tests}),
    ]
    report.total_seconds = 123.4
    return report


def test_report_json_holds_every_check_with_status_seconds_figures_and_error(gc, tmp_path):
    report = _report(gc)
    path = gc.write_report(report, tmp_path / "new" / "dir")
    data = json.loads(path.read_text())
    assert path.name == "gpu-check.json" and report.failed
    assert data["environment"]["device_name"] == "NVIDIA H200" and data["budget_s"] == 470.0
    assert [(c["name"], c["status"]) for c in data["checks"]] == [
        ("fsdp2_cpu_offload_bf16", "pass"), ("megatron_fsdp", "skip"), ("throughput_llama8b_4layers", "fail"),
        ("pytest_gpu", "pass")]
    assert data["checks"][0] == {"name": "fsdp2_cpu_offload_bf16", "status": "pass", "seconds": 12.345,
                                 "figures": {"loss_first": 6.2559, "loss_last": 3.5868, "param_shard_device": "cpu",
                                             "losses": [6.3, 3.6]}, "error": ""}
    assert data["checks"][3]["figures"]["tests"][1]["message"] == "needs 2 GPUs"


def test_summary_table_has_a_row_per_check_and_per_gpu_test(gc):
    lines = gc.format_summary(_report(gc)).splitlines()
    assert lines[0] == "gpu-check 2026-11-30 14:00 UTC: NVIDIA H200 x1, torch 2.13.0+cu130 (CUDA 13.0), /opt/py"
    assert lines[1].split() == ["check", "status", "s", "figures", "error"]
    rows = [line.split() for line in lines[3:-1]]
    assert [row[:3] for row in rows] == [
        ["fsdp2_cpu_offload_bf16", "pass", "12.3"], ["megatron_fsdp", "skip", "0.0"],
        ["throughput_llama8b_4layers", "fail", "80.0"], ["pytest_gpu", "pass", "30.0"],
        ["tests/a.py::test_ring", "pass", "1.5"], ["tests/a.py::test_a2a", "skip", "0.0"]]
    assert "loss_first=6.256, loss_last=3.587, param_shard_device=cpu" in lines[3]  # lists are left to the JSON
    assert lines[5].split()[3:] == ["ratio=0.9812", "ratio", "0.9812", "is", "below", "the", "goal", "0.99"]
    assert lines[-1] == "2 passed, 1 failed, 1 skipped in 123 s (budget 470 s)"


def _check(gc, name, code, limit_s=30.0, **kwargs):
    return gc.Check(name, ("-c", code, "{result}"), limit_s, needs=(), parse=kwargs.pop("parse", None), **kwargs)


WRITE_RESULT = ("import json, sys; "
                "json.dump({'status': 'pass', 'figures': {'x': 1.5}, 'error': ''}, open(sys.argv[1], 'w'))")
# Starts a process in its own session (as torch's launcher does with ranks), prints its pid, then hangs.
HANG = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True); print('grandchild', p.pid, flush=True); time.sleep(120)")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_checks_run_in_order_within_limits_budget_and_gpu_count(gc, tmp_path):
    info = {"gpus": 1, "modules": {"pytest": True}}
    env = gc.child_env(dict(os.environ), None)
    logs = {}
    checks = [
        _check(gc, "writes_result", WRITE_RESULT),
        _check(gc, "crashes", "raise SystemExit('boom: the body failed')"),
        _check(gc, "hangs", HANG, limit_s=2.0),
        gc.Check("needs_missing", ("-c", "pass"), 30, needs=("pytest", "no_such_module")),
        gc.Check("two_gpus", ("-c", "pass"), 30, needs=(), min_gpus=2),
    ]
    results = gc.run_checks(checks, sys.executable, info, env, tmp_path, time.monotonic() + 120,
                            lambda name, text: logs.__setitem__(name, text), lambda line: None)
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == [c.name for c in checks]
    assert (by_name["writes_result"].status, by_name["writes_result"].figures) == ("pass", {"x": 1.5})
    assert by_name["crashes"].status == "fail" and "boom: the body failed" in by_name["crashes"].error
    hung = by_name["hangs"]
    assert hung.status == "fail" and hung.error.startswith("timed out after 2 s (killed with its processes)")
    assert 2 <= hung.seconds < 2 + gc.KILL_GRACE_S + 5
    grandchild = int(logs["hangs"].split("grandchild ")[1].split()[0])
    time.sleep(0.2)
    assert not _alive(grandchild)
    assert (by_name["needs_missing"].status, by_name["needs_missing"].error) == (
        "skip", f"no_such_module not importable in {sys.executable}")
    assert (by_name["two_gpus"].status, by_name["two_gpus"].error) == ("skip", "needs 2 GPUs, 1 visible")

    late = gc.run_checks([_check(gc, "late", WRITE_RESULT)], sys.executable, info, env, tmp_path,
                         time.monotonic() + gc.MIN_CHECK_S - 1, lambda *a: None, lambda line: None)
    assert late[0].status == "skip" and late[0].error.startswith("not started:")


def test_a_check_gets_at_most_what_is_left_of_the_budget(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_CHECK_S", 1.0)
    env = gc.child_env(dict(os.environ), None)
    result = gc.run_check(_check(gc, "slow", "import time; time.sleep(60)", limit_s=100), sys.executable,
                          {"gpus": 1}, env, tmp_path, 2.2, lambda *a: None)
    assert result.status == "fail" and result.error.startswith("timed out after 2 s") and result.seconds < 10


def test_orchestrate_writes_report_and_log_and_fails_when_a_check_fails(gc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "cuda_device_visible", lambda environ: (True, "a fake device"))
    info = {"gpus": 1, "torch": "2.13.0+cu130", "cuda": "13.0", "device_name": "Fake GPU", "modules": {}}
    monkeypatch.setattr(gc, "setup", lambda environ, scratch, say: gc.Setup(sys.executable, info, None, ["fake"]))
    checks = [_check(gc, "good", WRITE_RESULT), _check(gc, "bad", "raise SystemExit('broken')")]
    status = gc.orchestrate(dict(os.environ), tmp_path / "out", 100.0, checks)
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert status == 1 and [c["status"] for c in data["checks"]] == ["pass", "fail"] and data["setup"] == ["fake"]
    assert "1 passed, 1 failed, 0 skipped" in out and "Fake GPU x1" in out
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "===== good =====" in log and "broken" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-check.json", "gpu-check.log"]


def test_pytest_demo_and_junit_parsing(gc, tmp_path):
    (tmp_path / "pytest-gpu.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.cp.test_ring" name="test_ring_gpu" time="2.5"/>'
        '<testcase classname="tests.ep.test_a2a" name="test_a2a_gpu" time="0.1"><skipped message="needs 2 GPUs"/>'
        '</testcase><testcase classname="tests.x" name="test_x" time="1"><failure message="assert 1 == 2">tb'
        '</failure></testcase></testsuite></testsuites>')
    done = gc.Finished(1, 9.0, "FAILED tests/x.py::test_x - assert 1 == 2")
    result = gc.parse_pytest(done, tmp_path)
    assert result.status == "fail"
    assert [(t["id"], t["outcome"], t["message"]) for t in result.figures["tests"]] == [
        ("tests/cp/test_ring.py::test_ring_gpu", "pass", ""), ("tests/ep/test_a2a.py::test_a2a_gpu", "skip",
                                                                "needs 2 GPUs"),
        ("tests/x.py::test_x", "fail", "assert 1 == 2")]
    cut = gc.parse_pytest(gc.Finished(None, 300, "tests/a.py::test_one PASSED [ 50%]\ntests/a.py::test_two "),
                          tmp_path / "no-junit-here")
    assert [(t["id"], t["outcome"]) for t in cut.figures["tests"]] == [("tests/a.py::test_one", "pass")]
    assert gc.parse_pytest(gc.Finished(5, 3, "no tests ran"), tmp_path / "none").status == "skip"
    demo = gc.parse_demo(gc.Finished(0, 30, "summary: loss 6.2840 -> 2.5390 (decreased); ranks agree; time/step "
                                            "47.3 ms; parameter bytes per rank 0: 1,706,496"), tmp_path)
    assert (demo.status, demo.figures) == ("pass", {"loss_first": 6.284, "loss_last": 2.539, "ms_per_step": 47.3})


def test_check_bodies_run_on_cpu(tmp_path):
    """The bodies' code on CPU (gloo, small shapes, no offload): what a CUDA run executes, minus the device.
    Both run in one process (each destroys its process group), as ``--run NAME --smoke`` would run them."""
    code = ("import sys, gpu_check; from pathlib import Path; "
            "sys.exit(max(gpu_check.run_body(name, Path(sys.argv[1]) / f'{name}.json', True) for name in "
            "('fsdp2_cpu_offload_bf16', 'throughput_llama8b_4layers')))")
    path = [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    fsdp2 = json.loads((tmp_path / "fsdp2_cpu_offload_bf16.json").read_text())
    assert fsdp2["status"] == "pass", done.stdout + done.stderr
    assert fsdp2["figures"]["loss_last"] < fsdp2["figures"]["loss_first"]
    assert fsdp2["figures"]["compute_dtype"] == "bfloat16" and fsdp2["figures"]["steps"] == 4
    # The ratio of two CPU timings is noise here; the layouts and the figures are what is checked.
    figures = json.loads((tmp_path / "throughput_llama8b_4layers.json").read_text())["figures"]
    assert figures["same_layout"] is True, done.stdout + done.stderr
    assert figures["tokens_per_step"] == 64 and figures["meshplan_tokens_per_s"] > 0 and figures["ratio"] > 0
    assert figures["torch_tokens_per_s"] > 0 and figures["meshplan_mfu"] is None


def _pure_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-python wheel of a package ``name`` whose ``VALUE`` is 42."""
    import zipfile

    info = f"{name}-1.0.dist-info"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_missing_packages_come_offline_from_the_wheel_folder(gc, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _pure_wheel(wheels, "gpu_check_fake_pkg")
    environ = {**os.environ, "GPU_CHECK_WHEELS": str(wheels), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    notes = []
    site = gc._install_wheels({"python": sys.executable}, environ, tmp_path, notes.append)
    assert site == str(tmp_path / "site") and notes[0].startswith(f"installed from {wheels} (offline)")
    found = gc.probe(sys.executable, ["gpu_check_fake_pkg", "no_such_module"], gc.child_env(environ, site),
                     torch=False)
    assert found["modules"] == {"gpu_check_fake_pkg": True, "no_such_module": False} and "torch" not in found
    assert gc._install_wheels({"python": sys.executable}, {**environ, "GPU_CHECK_WHEELS": str(tmp_path / "none")},
                              tmp_path, notes.append) is None


def test_setup_without_a_cuda_torch_or_an_index_installs_nothing(gc, tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(gc, "candidate_pythons", lambda environ: ["/a/python3", "/b/python"])
    monkeypatch.setattr(gc, "probe", lambda python, modules, env, limit_s=90, torch=True: probes.append(python) or {
        "python": python, "torch": "2.13.0+cpu", "cuda_available": False, "gpus": 0, "modules": {}})
    monkeypatch.setattr(gc, "index_reachable", lambda *a: (False, "pypi.org:443"))
    monkeypatch.setattr(gc, "run_limited", lambda *a, **k: pytest.fail(f"started {a}"))
    lines = []
    found = gc.setup({"PATH": ""}, tmp_path, lines.append)
    assert found.python is None and probes == ["/a/python3", "/b/python"]
    assert lines == ["setup: no python here has a torch that sees CUDA (/a/python3 (torch 2.13.0+cpu, CUDA no); "
                     "/b/python (torch 2.13.0+cpu, CUDA no)), and the package index (pypi.org:443) did not answer "
                     "within 5 s: nothing installed, no check can run"]


def test_setup_takes_the_first_cuda_python_and_never_installs_into_a_foreign_one(gc, tmp_path, monkeypatch):
    def fake_probe(python, modules, env, limit_s=90, torch=True):
        return {"python": python, "torch": "2.11.0+cu130", "cuda": "13.0", "cuda_available": python == "/gpu/python3",
                "gpus": 1, "device_name": "NVIDIA H200",
                "modules": {m: m not in ("megatron_fsdp", "importlib_metadata") for m in modules}}

    monkeypatch.setattr(gc, "candidate_pythons", lambda environ: ["/cpu/python", "/gpu/python3", "/other/python"])
    monkeypatch.setattr(gc, "probe", fake_probe)
    monkeypatch.setattr(gc, "run_limited", lambda *a, **k: pytest.fail(f"started {a}"))
    lines = []
    found = gc.setup({"PATH": "", "GPU_CHECK_WHEELS": str(tmp_path / "none")}, tmp_path, lines.append)
    assert found.python == "/gpu/python3" and found.site == str(tmp_path / "site") and found.info["gpus"] == 1
    assert found.info["modules"]["importlib_metadata"] and not found.info["modules"]["megatron_fsdp"]
    assert lines[0] == "setup: checks run under /gpu/python3: torch 2.11.0+cu130, CUDA 13.0, 1 x NVIDIA H200"
    assert lines[1].startswith("setup: importlib_metadata, megatron_fsdp not found; not installing into /gpu/python3")
    assert lines[2].startswith(f"setup: importlib_metadata not found: {tmp_path}/site/importlib_metadata.py re-exports")
    assert lines[3] == "setup: missing in /gpu/python3: megatron_fsdp (the checks that need them are skipped)"


def test_plugin_discovery_works_on_the_importlib_metadata_stand_in(gc, tmp_path):
    site = gc._importlib_metadata_stand_in(tmp_path / "site")
    code = ("import importlib_metadata, meshplan; print(importlib_metadata.__file__); "
            "print(sorted(r['name'] for r in meshplan.list_strategies()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=gc.child_env(dict(os.environ), site))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{site}/importlib_metadata.py", "['ddp', 'fsdp2', 'megatron_fsdp']"]
