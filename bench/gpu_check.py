"""``make gpu-check``: every GPU path of meshplan on a CUDA machine, in one command, within 8 minutes.

    bash bench/gpu_check.sh          # or: make gpu-check; or: python3 bench/gpu_check.py

On a machine without a CUDA device it prints "no CUDA device", starts nothing, installs nothing, writes
nothing and exits 0. On a CUDA machine it

1. **sets up**: picks the first python whose torch sees CUDA (``GPU_CHECK_PYTHON``, this repo's ``.venv``,
   ``python3``, ``python``); installs packages that python lacks (``megatron_fsdp``, ``importlib_metadata``,
   ...) offline from a wheel folder (``GPU_CHECK_WHEELS``, default ``./.whl``, filled on a networked
   machine by ``--fetch-wheels``) into a temporary folder on ``PYTHONPATH``; and, only when the package
   index answers within seconds, installs a CUDA torch and the pinned packages into this repo's ``.venv``.
   Without an index it says so and goes on with what the machine has;
2. **runs each check in its own process** under that python, with its own time limit, inside one budget
   for the whole run (``GPU_CHECK_BUDGET_S``, default 470 s): a check that hangs is killed with every
   process it started, and the next one starts;
3. **reports**: one summary table on stdout, and ``gpu-check.json`` (each check: name, status
   pass/fail/skip, seconds, figures, error text) plus ``gpu-check.log`` (every check's output) in
   ``GPU_CHECK_OUT`` (default ``./gpu-check-out``). Exit status 1 when a check failed, else 0.

The checks: ``fsdp2`` with ``CPUOffloadPolicy`` and bf16 mixed precision on one rank; ``megatron_fsdp``
(through its alias ``nvfsdp``) on one rank; ``meshplan demo --device cuda`` on 1 GPU (and ``--nproc 2 --tp 2``
on 2 or more); a throughput benchmark (Llama-3-8B shape cut to 4 layers, bf16, ``meshplan.parallelize``
vs. the same layout by hand, paired steps, tokens/s, MFU, ratio); and every test marked ``gpu``
(``pytest -m gpu``: the CP ring-attention and EP all-to-all GPU tests are among them), one table row each.

This file runs in two roles: the orchestrator (standard library only, never imports torch) and, with
``--run NAME``, one check's body in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

#: Default budget for the whole run (set-up included), under the 8 minutes the issue allows.
BUDGET_S = 470.0
#: A check is not started with less than this left of the budget.
MIN_CHECK_S = 20.0
#: Seconds a killed check gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0
#: How long the package index may take to accept a connection before it counts as unreachable.
INDEX_PROBE_S = 5.0
#: Dense bf16 peak of an H200 SXM (the H100 SXM's, per NVIDIA's datasheet: 989.4 TFLOP/s; 1,979 is with
#: 2:4 sparsity). MFU is reported only on devices of this table; others get ``mfu: null``.
H200_BF16_DENSE_FLOPS = 989e12
PEAK_BF16_FLOPS = {"H200": H200_BF16_DENSE_FLOPS, "H100 80GB HBM3": H200_BF16_DENSE_FLOPS}
#: Throughput goal: meshplan's tokens/s over the hand-written layout's, median of the pairs.
RATIO_GOAL = 0.99
#: What ``--fetch-wheels`` downloads: pure-python packages meshplan's checks need that the nvidia-h200 image
#: (python 3.12, CUDA torch, transformers, pluggy, pytest, einops, packaging, zipp) lacks. Pins come from
#: requirements-dev.txt; ``lazy-importer`` is a dependency of importlib-metadata 10.
GPU_IMAGE_WHEELS = ("megatron-fsdp", "importlib-metadata", "lazy-importer")
#: Modules the checks use (besides torch), and what each one's package is called on the index.
REQUIRED_MODULES = {"transformers": "transformers", "pluggy": "pluggy", "importlib_metadata": "importlib-metadata",
                    "pytest": "pytest", "megatron_fsdp": "megatron-fsdp"}
#: Environment variables of a launched torch job: the demo would take itself for a worker.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------ results
@dataclass
class CheckResult:
    """One row of the report."""

    name: str
    status: str  # "pass" | "fail" | "skip"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Report:
    """What ``gpu-check.json`` holds."""

    date: str
    environment: dict[str, Any]
    setup: list[str]
    budget_s: float
    checks: list[CheckResult] = field(default_factory=list)
    total_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return any(check.status == "fail" for check in self.checks)


def write_report(report: Report, out_dir: Path) -> Path:
    """Write ``gpu-check.json`` into ``out_dir`` (created); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu-check.json"
    path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return path


def _figures_text(figures: dict[str, Any], limit: int = 90) -> str:
    shown = []
    for key, value in figures.items():
        if isinstance(value, (list, dict)):
            continue
        if isinstance(value, float):
            shown.append(f"{key}={value:,.0f}" if abs(value) >= 1000 else f"{key}={value:.4g}")
        else:
            shown.append(f"{key}={value}")
    text = ", ".join(shown)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summary_rows(report: Report) -> list[dict[str, str]]:
    """One row per check, then one per test of a check that ran tests (``figures["tests"]``)."""
    rows = []
    for check in report.checks:
        last_line = check.error.strip().splitlines()[-1] if check.error.strip() else ""
        rows.append({"check": check.name, "status": check.status, "seconds": f"{check.seconds:.1f}",
                     "figures": _figures_text(check.figures), "error": last_line[:100]})
        for test in check.figures.get("tests", []):
            rows.append({"check": f"  {test['id']}", "status": test["outcome"], "seconds": f"{test['seconds']:.1f}",
                         "figures": "", "error": test.get("message", "")[:100]})
    return rows


def format_summary(report: Report) -> str:
    """The summary table printed at the end of a run."""
    from meshplan.tables import format_table  # meshplan's own table; needs nothing beyond the stdlib

    columns = (("check", "check"), ("status", "status"), ("seconds", "s"), ("figures", "figures"), ("error", "error"))
    counts = {status: sum(c.status == status for c in report.checks) for status in ("pass", "fail", "skip")}
    env = report.environment
    head = (f"gpu-check {report.date}: {env.get('device_name')} x{env.get('gpus')}, torch {env.get('torch')} "
            f"(CUDA {env.get('cuda')}), {env.get('python')}")
    tail = (f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in "
            f"{report.total_seconds:.0f} s (budget {report.budget_s:.0f} s)")
    return "\n".join([head, format_table(summary_rows(report), columns), tail])


# ----------------------------------------------------------------------------- processes and limits
def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), including those in their own sessions."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` and every process it started (torch's launcher puts ranks in new sessions), then
    SIGKILL what is left after :data:`KILL_GRACE_S`."""
    pids = [proc.pid, *_children(proc.pid)] if Path("/proc").is_dir() else [proc.pid]
    _signal_all(pids, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_all([*pids, *(_children(proc.pid) if Path("/proc").is_dir() else [])], signal.SIGKILL)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): leave it, report the timeout
        pass


@dataclass
class Finished:
    """How a child process ended."""

    returncode: int | None  # None: killed at its time limit
    seconds: float
    output: str


def run_limited(argv: Sequence[str], limit_s: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> Finished:
    """Run ``argv`` (output to ``log`` or a temporary file) for at most ``limit_s`` seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        path = log or Path(scratch) / "output.log"
        start = time.monotonic()
        with open(path, "wb") as sink:
            proc = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=REPO, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=max(limit_s, 0.1))
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                code = None
        return Finished(code, time.monotonic() - start, path.read_text(errors="replace"))


def tail(text: str, lines: int = 15, chars: int = 2000) -> str:
    """The end of a log, for the report's error text."""
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


# --------------------------------------------------------------------------------- CUDA detection
def cuda_device_visible(environ: dict[str, str] | None = None, dev: Path = Path("/dev")) -> tuple[bool, str]:
    """``(visible, why)`` from the device nodes and ``nvidia-smi``, without importing torch."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    nodes = sorted(p.name for p in dev.glob("nvidia[0-9]*")) if dev.is_dir() else []
    if nodes:
        return True, f"device node /dev/{nodes[0]}"
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        if re.search(r"^GPU \d+", listing, flags=re.M):
            return True, "nvidia-smi lists a GPU"
    return False, "no /dev/nvidia* device node and no GPU listed by nvidia-smi"


# ------------------------------------------------------------------------------------------ set-up
PROBE = r"""
import importlib.util, json, sys
info = {"python": sys.executable, "version": sys.version.split()[0], "modules": {}}
for name in sys.argv[2:]:
    try:
        info["modules"][name] = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        info["modules"][name] = False
if sys.argv[1] == "torch":
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        info["gpus"] = torch.cuda.device_count() if info["cuda_available"] else 0
        info["device_name"] = torch.cuda.get_device_name(0) if info["gpus"] else None
    except Exception as exc:
        info.update(torch=None, cuda_available=False, gpus=0, error=f"{type(exc).__name__}: {exc}")
print("PROBE " + json.dumps(info))
"""


def probe(python: str, modules: Sequence[str], env: dict[str, str], limit_s: float = 90.0,
          torch: bool = True) -> dict[str, Any]:
    """What ``python`` offers: which of ``modules`` it finds and (``torch=True``) its torch, whether that
    sees CUDA, and the GPUs."""
    done = run_limited([python, "-c", PROBE, "torch" if torch else "modules-only", *modules], limit_s, env)
    match = re.search(r"^PROBE (.*)$", done.output, flags=re.M)
    if done.returncode != 0 or not match:
        why = "timed out" if done.returncode is None else tail(done.output, 3)
        return {"python": python, "torch": None, "cuda_available": False, "gpus": 0, "modules": {},
                "error": f"probe failed: {why}"}
    return json.loads(match.group(1))


def candidate_pythons(environ: dict[str, str]) -> list[str]:
    """``GPU_CHECK_PYTHON`` alone when set; else this repo's .venv, ``python3``, ``python`` (first found)."""
    if environ.get("GPU_CHECK_PYTHON"):
        return [environ["GPU_CHECK_PYTHON"]]
    found = [str(REPO / ".venv" / "bin" / "python")] if (REPO / ".venv" / "bin" / "python").exists() else []
    for name in ("python3", "python"):
        path = shutil.which(name, path=environ.get("PATH"))
        if path:
            found.append(path)
    found.append(sys.executable)
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def index_reachable(url: str | None = None, limit_s: float = INDEX_PROBE_S) -> tuple[bool, str]:
    """Whether the package index accepts a connection within ``limit_s`` (DNS included; never hangs)."""
    url = url or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).is_dir(), url
    host, port = parts.hostname or "pypi.org", parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=limit_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(limit_s)
    return bool(outcome and outcome[0]), f"{host}:{port}"


def pins(requirements: Path = REPO / "requirements-dev.txt") -> dict[str, str]:
    """``{distribution: "name==version"}`` from the pinned development requirements."""
    found = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            found[line.split("==", 1)[0].strip().lower()] = line
    return found


def _wheel_module(wheel: Path) -> str:
    """The import name a wheel most likely provides: its normalized distribution name."""
    return wheel.name.split("-", 1)[0].lower()


@dataclass
class Setup:
    """The python the checks run under, what it offers, the extra ``PYTHONPATH`` entry, what was done."""

    python: str | None
    info: dict[str, Any]
    site: str | None
    notes: list[str]


def _pip(python: str, args: Sequence[str], limit_s: float, env: dict[str, str]) -> tuple[bool, str]:
    done = run_limited([python, "-m", "pip", *args], limit_s, env)
    ok = done.returncode == 0
    return ok, "" if ok else ("timed out" if done.returncode is None else tail(done.output, 3, 400))


def setup(environ: dict[str, str], scratch: Path, say: Callable[[str], None]) -> Setup:
    """Find a python whose torch sees CUDA; add missing packages from wheels, or from a reachable index."""
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        say(f"setup: {message}")

    env = child_env(environ, None)
    modules = list(REQUIRED_MODULES)
    tried = []
    chosen: dict[str, Any] | None = None
    for python in candidate_pythons(environ):
        info = probe(python, modules, env)
        tried.append(f"{python} (torch {info.get('torch')}, CUDA {'yes' if info.get('cuda_available') else 'no'})")
        if info.get("cuda_available"):
            chosen = info
            break
    venv_python = str(REPO / ".venv" / "bin" / "python")
    if chosen is None:
        online, where = index_reachable()
        if not online:
            note(f"no python here has a torch that sees CUDA ({'; '.join(tried)}), and the package index ({where}) "
                 f"did not answer within {INDEX_PROBE_S:.0f} s: nothing installed, no check can run")
            return Setup(None, {}, None, notes)
        note(f"no python here has a torch that sees CUDA ({'; '.join(tried)}); installing a CUDA torch and the "
             f"pinned packages into {REPO / '.venv'}")
        _install_cuda_venv(environ, note)
        chosen = probe(venv_python, modules, env)
        if not chosen.get("cuda_available"):
            note(f"the .venv's torch still does not see CUDA ({chosen.get('torch')}, {chosen.get('error', '')})")
            return Setup(None, chosen, None, notes)
    note(f"checks run under {chosen['python']}: torch {chosen['torch']}, CUDA {chosen.get('cuda')}, "
         f"{chosen['gpus']} x {chosen.get('device_name')}")
    site = _install_wheels(chosen, environ, scratch, note)
    if site:
        chosen["modules"] = probe(chosen["python"], modules, child_env(environ, site), torch=False)["modules"]
    missing = [m for m, found in chosen.get("modules", {}).items() if not found]
    if missing:
        _install_missing(chosen["python"], missing, environ, venv_python, note)
        chosen["modules"] = probe(chosen["python"], modules, child_env(environ, site), torch=False)["modules"]
        missing = [m for m, found in chosen.get("modules", {}).items() if not found]
    if "importlib_metadata" in missing:
        site = _importlib_metadata_stand_in(scratch / "site")
        note(f"importlib_metadata not found: {site}/importlib_metadata.py re-exports the standard library's "
             "importlib.metadata (all meshplan's plugin discovery uses)")
        chosen["modules"]["importlib_metadata"] = True
        missing.remove("importlib_metadata")
    if missing:
        note(f"missing in {chosen['python']}: {', '.join(missing)} (the checks that need them are skipped)")
    return Setup(chosen["python"], chosen, site, notes)


def _install_wheels(info: dict[str, Any], environ: dict[str, str], scratch: Path,
                    note: Callable[[str], None]) -> str | None:
    """Install, offline, the wheels of ``GPU_CHECK_WHEELS`` whose module ``info``'s python lacks."""
    folder = Path(environ.get("GPU_CHECK_WHEELS") or REPO / ".whl")
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return None
    have = probe(info["python"], [_wheel_module(w) for w in wheels], child_env(environ, None), torch=False)["modules"]
    needed = [w for w in wheels if not have.get(_wheel_module(w))]
    if not needed:
        return None
    site = scratch / "site"
    ok, why = _pip(info["python"], ["install", "--no-index", "--no-deps", "--no-compile", "--quiet",
                                    "--disable-pip-version-check", "--target", str(site),
                                    *map(str, needed)], 180, child_env(environ, None))
    names = ", ".join(w.name for w in needed)
    note(f"installed from {folder} (offline) into {site}: {names}" if ok else f"could not install {names}: {why}")
    return str(site) if ok else None


STAND_IN = """\"\"\"Written by bench/gpu_check.py for a python without the importlib-metadata package: meshplan's plugin
discovery needs only entry_points(group=...) and EntryPoint (with .dist), as in the standard library (3.10+).\"\"\"
from importlib.metadata import *  # noqa: F403
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points, version  # noqa: F401
"""


def _importlib_metadata_stand_in(site: Path) -> str:
    """Write :data:`STAND_IN` as ``importlib_metadata.py`` into ``site``; returns ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "importlib_metadata.py").write_text(STAND_IN)
    return str(site)


def _install_missing(python: str, missing: Sequence[str], environ: dict[str, str], venv_python: str,
                     note: Callable[[str], None]) -> None:
    """Install pinned packages for ``missing`` modules from the index, only into this repo's .venv."""
    if os.path.abspath(python) != os.path.abspath(venv_python):
        note(f"{', '.join(missing)} not found; not installing into {python} (not this repo's .venv): put wheels "
             f"in {REPO / '.whl'} (python3 bench/gpu_check.py --fetch-wheels on a networked machine)")
        return
    online, where = index_reachable()
    if not online:
        note(f"{', '.join(missing)} not found, and the package index ({where}) did not answer within "
             f"{INDEX_PROBE_S:.0f} s: not installed")
        return
    wanted = [pins().get(REQUIRED_MODULES[m], REQUIRED_MODULES[m]) for m in missing]
    ok, why = _pip(python, ["install", "--timeout", "20", "--retries", "1", "--quiet", *wanted], 300,
                   child_env(environ, None))
    note(f"installed {', '.join(wanted)} into .venv" if ok else f"could not install {', '.join(wanted)}: {why}")


def _install_cuda_venv(environ: dict[str, str], note: Callable[[str], None]) -> None:
    """Create this repo's .venv if needed; install torch (PyPI's Linux wheel is the CUDA build, or
    ``GPU_CHECK_TORCH_INDEX``) over a CPU build, then the pinned development packages."""
    env = child_env(environ, None)
    venv_python = str(REPO / ".venv" / "bin" / "python")
    if not Path(venv_python).exists():
        done = run_limited([sys.executable, "-m", "venv", str(REPO / ".venv")], 120, env)
        if done.returncode != 0:
            note(f"could not create .venv: {tail(done.output, 3, 400)}")
            return
    index = ["--index-url", environ["GPU_CHECK_TORCH_INDEX"]] if environ.get("GPU_CHECK_TORCH_INDEX") else []
    common = ["install", "--timeout", "20", "--retries", "1", "--quiet", "--disable-pip-version-check"]
    ok, why = _pip(venv_python, [*common, "--force-reinstall", pins()["torch"], *index], 900, env)
    if not ok:
        note(f"could not install a CUDA torch: {why}")
        return
    ok, why = _pip(venv_python, [*common, "-r", str(REPO / "requirements-dev.txt")], 600, env)
    note("installed the pinned packages into .venv" if ok else f"could not install the pinned packages: {why}")


def fetch_wheels(folder: Path) -> int:
    """Download :data:`GPU_IMAGE_WHEELS` (pure python) into ``folder``, for machines without an index."""
    pinned = pins()
    wanted = [pinned.get(name, name) for name in GPU_IMAGE_WHEELS]
    done = run_limited([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-d", str(folder), *wanted], 300)
    print(done.output.strip())
    print(f"wheels for the GPU machine in {folder}: {sorted(p.name for p in folder.glob('*.whl'))}")
    return 0 if done.returncode == 0 else 1


# ------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Check:
    """One check: the command after the python (``{result}`` and ``{junit}`` are filled in), its time limit,
    the modules it needs and the GPUs it needs."""

    name: str
    argv: tuple[str, ...]
    limit_s: float
    needs: tuple[str, ...] = ("transformers", "pluggy", "importlib_metadata")
    min_gpus: int = 1
    parse: Callable[[Finished, Path], CheckResult] | None = None


def _body(name: str) -> tuple[str, ...]:
    return (str(SCRIPT), "--run", name, "--result", "{result}")


DEMO_SUMMARY = re.compile(r"summary: loss (\S+) -> (\S+) \((decreased|did NOT decrease)\).*?time/step (\S+) ms")


def parse_demo(done: Finished, scratch: Path) -> CheckResult:
    """Status from the exit code; figures from the demo's summary line."""
    match = DEMO_SUMMARY.search(done.output)
    figures = {}
    if match:
        figures = {"loss_first": float(match.group(1)), "loss_last": float(match.group(2)),
                   "ms_per_step": float(match.group(4))}
    ok = done.returncode == 0
    return CheckResult("", "pass" if ok else "fail", figures=figures, error="" if ok else tail(done.output))


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a pytest JUnit XML file: id, outcome (pass/fail/skip), seconds, message."""
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "pass", ""
        for tag, status in (("failure", "fail"), ("error", "fail"), ("skipped", "skip")):
            element = case.find(tag)
            if element is not None:
                outcome, message = status, (element.get("message") or element.text or "").strip()
                break
        module = case.get("classname", "").replace(".", "/")
        tests.append({"id": f"{module}.py::{case.get('name')}" if module else str(case.get("name")),
                      "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return tests


PYTEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", flags=re.M)
PYTEST_OUTCOMES = {"PASSED": "pass", "XPASS": "pass", "FAILED": "fail", "ERROR": "fail", "SKIPPED": "skip",
                   "XFAIL": "skip"}


def parse_pytest(done: Finished, scratch: Path) -> CheckResult:
    """Per-test outcomes from the JUnit file, or (cut off at the time limit) from the ``-v`` lines."""
    junit = scratch / "pytest-gpu.xml"
    if junit.exists():
        tests = parse_junit(junit)
    else:
        tests = [{"id": test, "outcome": PYTEST_OUTCOMES[word], "seconds": 0.0, "message": ""}
                 for test, word in PYTEST_LINE.findall(done.output)]
    counts = {f"tests_{status}": sum(t["outcome"] == status for t in tests) for status in ("pass", "fail", "skip")}
    figures = {**counts, "tests": tests}
    if done.returncode == 5 or (done.returncode == 0 and not tests):
        return CheckResult("", "skip", figures=figures, error="no test is marked gpu")
    ok = done.returncode == 0 and not counts["tests_fail"]
    return CheckResult("", "pass" if ok else "fail", figures=figures, error="" if ok else tail(done.output))


def parse_body(done: Finished, scratch: Path, name: str) -> CheckResult:
    """A check body writes its own result; without one (it crashed) the log's end is the error."""
    path = scratch / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        error = data.get("error", "")
        if data["status"] == "fail" and done.returncode not in (0, None):
            error = (error + "\n" + tail(done.output, 8)).strip()
        return CheckResult("", data["status"], figures=data.get("figures", {}), error=error)
    return CheckResult("", "fail", error=tail(done.output) or f"exited with {done.returncode} and wrote no result")


CHECKS: tuple[Check, ...] = (
    Check("fsdp2_cpu_offload_bf16", _body("fsdp2_cpu_offload_bf16"), 150),
    Check("megatron_fsdp", _body("megatron_fsdp"), 150,
          needs=("transformers", "pluggy", "importlib_metadata", "megatron_fsdp")),
    Check("demo_cuda_nproc1", ("-m", "meshplan", "demo", "--device", "cuda", "--nproc", "1"), 150, parse=parse_demo),
    Check("demo_cuda_nproc2_tp2", ("-m", "meshplan", "demo", "--device", "cuda", "--nproc", "2", "--tp", "2"), 150,
          min_gpus=2, parse=parse_demo),
    Check("throughput_llama8b_4layers", _body("throughput_llama8b_4layers"), 240),
    Check("pytest_gpu", ("-m", "pytest", "-m", "gpu", "-v", "--continue-on-collection-errors",
                         "--junitxml", "{junit}", "tests"), 300, needs=("pytest",), parse=parse_pytest),
)


def child_env(environ: dict[str, str], site: str | None) -> dict[str, str]:
    """The checks' environment: this repo (and the wheel site) first on ``PYTHONPATH``, no launcher
    variables, unbuffered output, and Hugging Face offline (nothing is ever downloaded)."""
    env = {k: v for k, v in environ.items() if k not in LAUNCH_VARS}
    path = [str(REPO), *([site] if site else []), *filter(None, [environ.get("PYTHONPATH")])]
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_check(check: Check, python: str, info: dict[str, Any], env: dict[str, str], scratch: Path,
              remaining_s: float, log: Callable[[str, str], None]) -> CheckResult:
    """Run one check under its own limit (cut to ``remaining_s``); never raises for a check's failure."""
    missing = [m for m in check.needs if not info.get("modules", {}).get(m, False)]
    if missing:
        return CheckResult(check.name, "skip", error=f"{', '.join(missing)} not importable in {python}")
    if info.get("gpus", 0) < check.min_gpus:
        return CheckResult(check.name, "skip", error=f"needs {check.min_gpus} GPUs, {info.get('gpus', 0)} visible")
    if remaining_s < MIN_CHECK_S:
        return CheckResult(check.name, "skip", error=f"not started: {remaining_s:.0f} s of the budget left")
    limit = min(check.limit_s, remaining_s)
    values = {"{result}": str(scratch / f"{check.name}.json"), "{junit}": str(scratch / "pytest-gpu.xml")}
    argv = [python, *(values.get(part, part) for part in check.argv)]
    done = run_limited(argv, limit, env, scratch / f"{check.name}.log")
    log(check.name, f"$ {' '.join(argv)}\n{done.output}")
    parse = check.parse or (lambda d, s: parse_body(d, s, check.name))
    result = parse(done, scratch)
    result.name, result.seconds = check.name, round(done.seconds, 2)
    if done.returncode is None:
        result.status = "fail"
        result.error = f"timed out after {limit:.0f} s (killed with its processes)\n{tail(done.output, 8)}"
    return result


def run_checks(checks: Sequence[Check], python: str, info: dict[str, Any], env: dict[str, str], scratch: Path,
               deadline: float, log: Callable[[str, str], None], say: Callable[[str], None]) -> list[CheckResult]:
    """Every check in order, each within what is left until ``deadline`` (``time.monotonic()``)."""
    results = []
    for check in checks:
        say(f"check {check.name} ...")
        result = run_check(check, python, info, env, scratch, deadline - time.monotonic(), log)
        say(f"check {check.name}: {result.status} ({result.seconds:.1f} s)"
            + (f": {result.error.strip().splitlines()[-1]}" if result.error.strip() else ""))
        results.append(result)
    return results


def orchestrate(environ: dict[str, str], out_dir: Path, budget_s: float,
                checks: Sequence[Check] = CHECKS) -> int:
    """The whole command; returns its exit status."""
    start = time.monotonic()
    visible, why = cuda_device_visible(environ)
    if not visible:
        print(f"gpu-check: no CUDA device ({why}); nothing to check, nothing installed.")
        return 0
    say = _say
    say(f"gpu-check: CUDA device found ({why}); budget {budget_s:.0f} s; report in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "gpu-check.log"
    log_path.write_text("")

    def log(name: str, text: str) -> None:
        with open(log_path, "a") as sink:
            sink.write(f"\n===== {name} =====\n{text}\n")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch_name:
        scratch = Path(scratch_name)
        found = setup(environ, scratch, say)
        report = Report(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), _environment(found),
                        found.notes, budget_s)
        if found.python is None:
            report.checks = [CheckResult(c.name, "skip", error="no python with a CUDA torch (see setup)")
                             for c in checks]
        else:
            env = child_env(environ, found.site)
            report.checks = run_checks(checks, found.python, found.info, env, scratch, start + budget_s, log, say)
    report.total_seconds = round(time.monotonic() - start, 1)
    path = write_report(report, out_dir)
    try:
        print(format_summary(report))
    except ImportError:  # meshplan itself is not importable by this python: the JSON says it all
        for row in summary_rows(report):
            print(" | ".join(row.values()))
    print(f"report: {path}; every check's output: {log_path}")
    return 1 if report.failed else 0


def _environment(found: Setup) -> dict[str, Any]:
    info = found.info
    return {"python": found.python, "python_version": info.get("version"), "torch": info.get("torch"),
            "cuda": info.get("cuda"), "gpus": info.get("gpus", 0), "device_name": info.get("device_name"),
            "modules": info.get("modules", {}), "host": socket.gethostname()}


def _say(line: str) -> None:
    print(line, flush=True)


# ------------------------------------------------------------------------ check bodies (child side)
def _one_rank(device_type: str) -> Any:
    """A one-rank default process group (NCCL on CUDA, gloo on CPU) on an in-memory store: no port."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return device


def _tiny_llama(device: Any) -> Any:
    from meshplan.dryrun.modelsource import build_model, resolve_source

    return build_model(resolve_source("tiny-llama"), {"use_cache": False}, device=device, seed=0)


def _fixed_batch(vocab_size: int, batch: int, seq_len: int, device: Any) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(device)


def _train(model: Any, optimizer: Any, ids: Any, steps: int) -> list[float]:
    """``steps`` AdamW steps on one batch (memorizing it: the loss must fall); the losses."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))
    return losses


def _loss_verdict(losses: list[float]) -> str:
    import math

    if not all(math.isfinite(x) for x in losses):
        return f"non-finite loss: {losses}"
    if not losses[-1] < losses[0]:
        return f"the loss did not decrease: {losses[0]:.4f} -> {losses[-1]:.4f}"
    return ""


def body_fsdp2_cpu_offload_bf16(device_type: str, steps: int = 8) -> tuple[str, dict[str, Any], str]:
    """fsdp2 with ``CPUOffloadPolicy`` (CUDA only) and bf16 parameters / fp32 reduction on one rank."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    import meshplan

    device = _one_rank(device_type)
    mesh = init_device_mesh(device_type, (1,), mesh_dim_names=("dp_shard",))
    model = _tiny_llama(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32)
    options: dict[str, Any] = {"mp_policy": policy}
    if device_type == "cuda":  # on a CPU mesh fsdp2 rejects offload: the parameters live there already
        options["offload_policy"] = CPUOffloadPolicy()
    model = meshplan.parallelize(model, mesh, strategy="fsdp2", **options)
    seen: list[Any] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _fixed_batch(model.config.vocab_size, 4, 64, device)
    losses = _train(model, optimizer, ids, steps)
    shard = next(model.parameters()).to_local()
    figures = {"loss_first": losses[0], "loss_last": losses[-1], "steps": steps,
               "param_shard_device": shard.device.type, "param_shard_dtype": str(shard.dtype).replace("torch.", ""),
               "compute_dtype": str(seen[0]).replace("torch.", ""), "losses": losses}
    if device_type == "cuda":
        figures["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    errors = [_loss_verdict(losses)]
    if device_type == "cuda" and shard.device.type != "cpu":
        errors.append(f"CPUOffloadPolicy: parameter shards live on {shard.device}, expected cpu")
    if seen[0] != torch.bfloat16:
        errors.append(f"compute dtype {seen[0]}, expected bfloat16")
    error = "; ".join(filter(None, errors))
    return ("fail" if error else "pass"), figures, error


def body_megatron_fsdp(device_type: str, steps: int = 8) -> tuple[str, dict[str, Any], str]:
    """``megatron_fsdp`` through its alias ``nvfsdp`` on one rank: a few AdamW steps of the tiny Llama."""
    import importlib.util

    if importlib.util.find_spec("megatron_fsdp") is None:
        return "skip", {}, "megatron_fsdp is not importable (pip install 'meshplan[megatron]')"
    if device_type != "cuda":
        return "skip", {}, "Megatron-FSDP runs on CUDA only"
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan

    device = _one_rank(device_type)
    mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("dp", "tp"))
    model = _tiny_llama(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    wrapped = meshplan.parallelize(model, mesh, strategy="nvfsdp", optimizer=optimizer)
    ids = _fixed_batch(model.config.vocab_size, 4, 64, device)
    losses = _train(wrapped, optimizer, ids, steps)
    report = meshplan.get_report(wrapped) or {}
    figures = {"loss_first": losses[0], "loss_last": losses[-1], "steps": steps,
               "strategy": report.get("strategy"), "wrapper": type(wrapped).__name__,
               "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "losses": losses}
    error = _loss_verdict(losses)
    return ("fail" if error else "pass"), figures, error


def flops_per_token(model: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters outside the input embedding) + 12 x layers x heads x
    head_dim x seq_len for attention scores (the usual MFU convention; causal masking not discounted)."""
    config = model.config
    dense = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6.0 * dense + 12.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len


def body_throughput(device_type: str, preset: str = "llama3-8b", layers: int = 4, batch: int = 2,
                    seq_len: int = 2048, warmup: int = 3, pairs: int = 30) -> tuple[str, dict[str, Any], str]:
    """Tokens/s and MFU of ``meshplan.parallelize`` (fsdp2, bf16) vs. the same layout by hand, paired steps."""
    import statistics

    import torch
    from handwritten import layout_of, shard_llama_by_hand
    from overhead import policies
    from torch.distributed.device_mesh import init_device_mesh

    import meshplan
    from meshplan.dryrun.modelsource import build_model, resolve_source

    device = _one_rank(device_type)
    mesh = init_device_mesh(device_type, (1,), mesh_dim_names=("dp_shard",))
    source = resolve_source(preset)

    def build() -> Any:
        return build_model(source, {"num_hidden_layers": layers, "use_cache": False}, device=device, seed=0)

    first = build()
    per_token = flops_per_token(first, seq_len)
    parameters = sum(p.numel() for p in first.parameters())
    block, root = policies("bf16")  # the same policies as fsdp2's default: bf16 compute, fp32 reduce and output
    models = {"meshplan": meshplan.parallelize(first, mesh, strategy="fsdp2"),
              "torch": shard_llama_by_hand(build(), None, mesh, block, root)}
    same_layout = layout_of(models["meshplan"]) == layout_of(models["torch"])
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}
    ids = _fixed_batch(first.config.vocab_size, batch, seq_len, device)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step(name: str) -> float:
        sync()
        start = time.perf_counter()
        models[name](input_ids=ids, labels=ids).loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in models:
            step(name)
    times: dict[str, list[float]] = {"meshplan": [], "torch": []}
    for index in range(pairs):
        for name in (("meshplan", "torch") if index % 2 == 0 else ("torch", "meshplan")):
            times[name].append(step(name))
    tokens = batch * seq_len
    ratio = statistics.median(t / m for m, t in zip(times["meshplan"], times["torch"]))  # tokens/s ratio
    peak = next((f for key, f in PEAK_BF16_FLOPS.items()
                 if device_type == "cuda" and key in torch.cuda.get_device_name(0)), None)
    medians = {name: statistics.median(series) for name, series in times.items()}
    figures: dict[str, Any] = {"ratio": round(ratio, 4)}  # the table shows the first figures: most telling first
    for name, median in medians.items():
        figures[f"{name}_tokens_per_s"] = round(tokens / median, 1)
    for name, median in medians.items():
        figures[f"{name}_mfu"] = round(tokens / median * per_token / peak, 4) if peak else None
    figures |= {f"{name}_ms": round(median * 1e3, 2) for name, median in medians.items()}
    figures |= {"same_layout": same_layout, "parameters": parameters, "tokens_per_step": tokens, "pairs": pairs,
                "flops_per_token": per_token}
    if device_type == "cuda":
        figures["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    errors = []
    if not same_layout:
        errors.append("meshplan's layout differs from the hand-written one")
    if ratio < RATIO_GOAL:
        errors.append(f"tokens/s ratio meshplan/torch {ratio:.4f} is below the goal {RATIO_GOAL}")
    error = "; ".join(errors)
    return ("fail" if error else "pass"), figures, error


BODIES: dict[str, Callable[..., tuple[str, dict[str, Any], str]]] = {
    "fsdp2_cpu_offload_bf16": body_fsdp2_cpu_offload_bf16,
    "megatron_fsdp": body_megatron_fsdp,
    "throughput_llama8b_4layers": body_throughput,
}
#: ``--smoke``: the same bodies on CPU with gloo and small shapes (a test of the code, not of a GPU).
SMOKE_ARGS: dict[str, dict[str, Any]] = {
    "fsdp2_cpu_offload_bf16": {"steps": 4},
    "throughput_llama8b_4layers": {"preset": "tiny-llama", "layers": 2, "batch": 2, "seq_len": 32, "warmup": 1,
                                   "pairs": 2},
}


def run_body(name: str, result: Path, smoke: bool) -> int:
    """Run one check body in this process and write ``{status, figures, error}`` to ``result``."""
    import traceback

    status, figures, error = "fail", {}, ""
    try:
        kwargs = SMOKE_ARGS.get(name, {}) if smoke else {}
        status, figures, error = BODIES[name]("cpu" if smoke else "cuda", **kwargs)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    result.write_text(json.dumps({"status": status, "figures": figures, "error": error}, default=str))
    print(f"{name}: {status} {json.dumps(figures, default=str)} {error}")
    return 1 if status == "fail" else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=sorted(BODIES), help="(child) run one check body in this process")
    parser.add_argument("--result", type=Path, help="(child) where --run writes its result")
    parser.add_argument("--smoke", action="store_true", help="(child) run the body on CPU with small shapes")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", nargs="?", const=REPO / ".whl",
                        help="download the wheels the GPU machine lacks into DIR (default ./.whl) and exit")
    args = parser.parse_args(argv)
    if args.run:
        return run_body(args.run, args.result or Path(os.devnull), args.smoke)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    if str(REPO) not in sys.path:  # the summary table is meshplan's (meshplan.tables)
        sys.path.insert(1, str(REPO))
    environ = dict(os.environ)
    out_dir = Path(environ.get("GPU_CHECK_OUT") or REPO / "gpu-check-out").resolve()
    return orchestrate(environ, out_dir, float(environ.get("GPU_CHECK_BUDGET_S") or BUDGET_S))


if __name__ == "__main__":
    sys.exit(main())
