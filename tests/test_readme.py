"""The README's quick start runs as written, on two gloo ranks; its CLI table names real commands."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from meshplan.cli.main import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section under ``heading`` (up to the next "## " heading)."""
    text = README.read_text()
    section = text[text.index(heading) + len(heading):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def quick_start() -> str:
    """The first ```python block after the "## Quick start" heading."""
    return python_blocks("## Quick start")[0]


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


def run_checkpoints(blocks: list[str], folder: str) -> dict:
    """Runs on every rank, in ``folder`` (which holds ``tiny-llama``): the README's "Checkpoints" blocks in
    order, then what they wrote is read back and compared with the trained model, bitwise."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    previous = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {"__name__": "__readme__"}
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
        dist.barrier()  # rank 0 wrote the save_pretrained folder
        gather = namespace["meshplan"].gather_full_state_dict
        trained = gather(namespace["model"], rank0_only=False)
        saved = AutoModelForCausalLM.from_pretrained("tiny-llama-trained", dtype=torch.float32).state_dict()
        resumed = gather(namespace["resumed"], rank0_only=False)
        original = AutoModelForCausalLM.from_pretrained("tiny-llama", dtype=torch.float32).state_dict()
        return {
            "saved_differs": sorted(k for k in trained if not torch.equal(trained[k], saved[k])),
            "resumed_differs": sorted(k for k in trained if not torch.equal(trained[k], resumed[k])),
            "trained_changed": not torch.equal(trained["model.norm.weight"], original["model.norm.weight"]),
            "optimizer_steps": sorted({int(s["step"]) for s in namespace["resumed_optimizer"].state.values()}),
        }
    finally:
        os.chdir(previous)


@pytest.mark.distributed
def test_checkpoints_section_runs_on_two_ranks(ranks2, tmp_path):
    """meta init -> parallelize -> load a tied save_pretrained folder -> train -> gather -> save_pretrained, and
    the DCP checkpoint loaded under another mesh with its optimizer state: all as the README says."""
    from tests.support import tiny_hf

    tiny_hf("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tiny-llama")
    blocks = python_blocks("## Checkpoints")
    assert len(blocks) == 2
    results = ranks2.run(run_checkpoints, blocks, str(tmp_path))
    assert results == [{"saved_differs": [], "resumed_differs": [], "trained_changed": True,
                        "optimizer_steps": [1]}] * 2


def run_cp_snippet(code: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)
    return {"loss": float(namespace["out"].loss), "logits": namespace["logits"], "batch": namespace["batch"],
            "local_tokens": namespace["shard"]["input_ids"].shape[1]}


@pytest.mark.distributed
def test_context_parallel_example_runs_on_two_ranks(ranks2):
    results = ranks2.run(run_cp_snippet, python_blocks("## Context parallelism")[0])
    assert [r["local_tokens"] for r in results] == [32, 32]
    assert results[0]["logits"].shape == (2, 64, 512)
    assert torch.equal(results[0]["logits"], results[1]["logits"])  # both ranks gathered the same sequence
    assert results[0]["loss"] > 0 and results[1]["loss"] > 0


def run_training_loop(code: str, folder: str) -> dict:
    """Runs on every rank, in ``folder`` (which holds ``tiny-mixtral``): the README's complete training loop."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(code, str(README), "exec"), namespace)
        return {"loss": float(namespace["global_loss"]), "grad_norm": float(namespace["grad_norm"]),
                "saved": os.path.isdir("tiny-mixtral-dcp")}
    finally:
        os.chdir(previous)


@pytest.mark.distributed
def test_training_loop_runs_on_four_ranks(ranks4, tmp_path):
    """load -> dp_shard x cp x tp with EP -> token-weighted loss, clip, log -> DCP save, as the README says."""
    from tests.support import tiny_hf

    tiny_hf("mixtral", intermediate_size=64, num_local_experts=4,
            num_experts_per_tok=2).save_pretrained(tmp_path / "tiny-mixtral")
    blocks = python_blocks("## Training loop")
    assert len(blocks) == 1
    results = ranks4.run(run_training_loop, blocks[0], str(tmp_path), timeout=300)
    assert all(r["saved"] for r in results)
    assert len({r["loss"] for r in results}) == 1 and len({r["grad_norm"] for r in results}) == 1  # all ranks agree
    assert 0 < results[0]["loss"] / 4 < 10 and 0 < results[0]["grad_norm"] < float("inf")  # summed over 4 ranks
