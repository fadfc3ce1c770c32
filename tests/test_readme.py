"""The README's quick start runs as written, on two gloo ranks; its CLI table names real commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshplan.cli.main import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    """The first ```python block after the "## Quick start" heading."""
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def run_snippet(code: str) -> dict:
    """Runs on every rank of the pool (a launched job: WORLD_SIZE is set, the process group exists)."""
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)
    report = namespace["meshplan"].get_report(namespace["model"])
    return {"loss": float(namespace["loss"]), "strategy": report["strategy"], "tp_size": report["tp_size"]}


def test_quick_start_is_about_fifteen_lines():
    code_lines = [line for line in quick_start().splitlines() if line.strip() and not line.startswith(("import",
                                                                                                        "from"))]
    assert len(code_lines) <= 16


@pytest.mark.distributed
def test_quick_start_runs_on_two_ranks(ranks2):
    results = ranks2.run(run_snippet, quick_start())
    assert [r["strategy"] for r in results] == ["fsdp2", "fsdp2"] and results[0]["tp_size"] == 2
    assert results[0]["loss"] == pytest.approx(results[1]["loss"]) and results[0]["loss"] > 0


def test_cli_commands_in_the_readme_exist():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    mentioned = set(re.findall(r"`meshplan (\w+)", README.read_text()))
    assert mentioned <= commands, mentioned - commands
    assert {"explain", "demo", "presets", "plugins", "strategies", "plans", "styles"} <= commands
