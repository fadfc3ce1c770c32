"""``meshplan demo``: train a small built-in model with a meshplan strategy on a few ranks.

Started by hand it launches ``--nproc`` local ranks itself (see :mod:`meshplan.cli.launch`); under
``torchrun`` (one node or many) every process is a rank already. Each rank builds the same model
from a config (fixed seed, random weights), ``meshplan.parallelize``s it on a
``[pp x] dp_replicate x dp_shard x cp x tp`` mesh (``cp`` only with ``--cp`` > 1: every sequence is then split
over the CP ranks with :func:`meshplan.context_parallel.shard_batch`; ``pp`` only with ``--pp`` > 1: the model is
split into stages that ``--pp-schedule`` runs, and each step is ``PipelineModel.step``), and trains on synthetic token
sequences that can be learned (each sequence counts upwards from a random token). Rank 0 prints one
line per step and a summary; every rank prints its final line. The run fails (non-zero exit) when the
loss did not decrease or the ranks do not hold the same model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..context_parallel.batch import shard_batch
from ..core.errors import MeshError, MeshplanError, OptionsError, UnsupportedConfigurationError
from ..introspection.config import text_config
from ..pipeline.model import PipelineModel
from .launch import in_launched_job, launch_local

#: Relative tolerance for "the ranks hold the same model" (checksums of gathered parameters).
AGREEMENT_RTOL = 1e-6


class DemoCheckError(MeshplanError, RuntimeError):
    """The demo trained but its result is wrong: the loss did not decrease, or ranks disagree."""


@dataclass
class DemoConfig:
    """What ``meshplan demo`` runs; the command-line flags map one to one onto these fields."""

    nproc: int = 2
    strategy: str = "fsdp2"
    tp: int = 1
    dp_replicate: int = 1
    cp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    sequence_parallel: bool = False
    activation_checkpointing: bool | str = False
    steps: int = 20
    model: str = "tiny-llama"
    overrides: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu" or "cuda"

    def use_cuda(self) -> bool:
        """Whether the ranks run on CUDA with NCCL (else on CPU with gloo)."""
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def to_argv(self) -> list[str]:
        """Command-line arguments of ``meshplan demo`` that reproduce this config (for launched ranks)."""
        argv = ["--strategy", self.strategy, "--tp", str(self.tp), "--dp-replicate", str(self.dp_replicate),
                "--cp", str(self.cp), "--pp", str(self.pp), "--pp-schedule", self.pp_schedule,
                "--steps", str(self.steps), "--model", self.model, "--batch-size", str(self.batch_size),
                "--seq-len", str(self.seq_len), "--lr", repr(self.lr), "--seed", str(self.seed),
                "--device", self.device]
        if self.sequence_parallel:
            argv.append("--sequence-parallel")
        if self.activation_checkpointing:
            argv += ["--activation-checkpointing", json.dumps(self.activation_checkpointing)]
        argv += [a for k, v in self.overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        argv += [a for k, v in self.options.items() for a in ("--option", f"{k}={json.dumps(v)}")]
        return argv


@dataclass
class DemoResult:
    """What one rank saw."""

    losses: list[float]
    step_seconds: list[float]
    checksum: float
    param_bytes: list[int]  # per rank, gathered on every rank


def main(config: DemoConfig) -> int:
    """Launch local ranks, or (inside a launched job) run this rank; 0 on success.

    Raises:
        MeshplanError: a rank failed (:class:`~meshplan.cli.launch.LaunchError`), or the result check failed.
    """
    if not in_launched_job():
        _check_before_launch(config)
        launch_local(config.nproc, ["-u", "-m", "meshplan", "demo", *config.to_argv()])
        return 0
    run_worker(config)
    _exit_without_teardown()
    return 0


def _exit_without_teardown() -> None:
    """End a rank that finished (its result printed and checked) without interpreter teardown: torch 2.13 aborts
    a gloo rank at exit now and then ("terminate called without an active exception", about 1 run in 5, with or
    without meshplan's changes), which the launcher would report as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_before_launch(config: DemoConfig) -> None:
    """Fail fast, in this process, on what every rank would reject: mesh shape, strategy, model, steps."""
    # loaded on use: keeps start-up light
    from ..api import get_strategy
    from ..dryrun.modelsource import resolve_source

    mesh_dims(config, config.nproc)
    if config.cp > 1:
        from ..context_parallel.sequence_layout import check_sequence_length  # loaded on use: keeps start-up light

        check_sequence_length(config.seq_len, config.cp, "--seq-len")
    if config.device not in ("auto", "cpu", "cuda"):
        raise OptionsError(f"--device must be auto, cpu or cuda, got {config.device!r}.")
    if config.use_cuda() and config.nproc > torch.cuda.device_count():
        raise UnsupportedConfigurationError(
            f"--nproc {config.nproc} needs {config.nproc} GPUs but {torch.cuda.device_count()} are visible; "
            "pass a smaller --nproc, or --device cpu.")
    get_strategy(config.strategy)
    resolve_source(config.model)
    if config.steps < 2:
        raise DemoCheckError(f"--steps must be at least 2 to see the loss decrease, got {config.steps}.")


def mesh_dims(config: DemoConfig, world: int) -> dict[str, int]:
    """``{"pp": pp, "dp_replicate": r, "dp_shard": world / (pp * r * cp * tp), "cp": cp, "tp": tp}`` (``pp`` and
    ``cp`` only when > 1), or a :class:`MeshError`."""
    fixed = config.pp * config.tp * config.dp_replicate * config.cp
    cp = f" x cp={config.cp}" if config.cp != 1 else ""
    pp = f"pp={config.pp} x " if config.pp != 1 else ""
    if min(config.tp, config.dp_replicate, config.cp, config.pp) < 1 or world % fixed:
        raise MeshError(f"{world} ranks cannot form {pp}dp_replicate={config.dp_replicate} x dp_shard{cp} x "
                        f"tp={config.tp}: the world size must be a multiple of {'pp x ' if pp else ''}"
                        f"dp_replicate{' x cp' if cp else ''} x tp.")
    dims = {"pp": config.pp} if config.pp > 1 else {}
    dims |= {"dp_replicate": config.dp_replicate, "dp_shard": world // fixed}
    if config.cp > 1:
        dims["cp"] = config.cp
    return {**dims, "tp": config.tp}


def synthetic_batch(step: int, config: DemoConfig, vocab_size: int) -> torch.Tensor:
    """The global batch of ``step``: sequences counting up (mod vocab) from random starts, same on all ranks."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    starts = torch.randint(0, vocab_size, (config.batch_size, 1), generator=generator)
    return (starts + torch.arange(config.seq_len)) % vocab_size


def _data_parallel_slice(mesh: Any, batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch: ranks differing only in ``pp``, ``tp`` or ``cp`` get the same rows."""
    names, coordinate = mesh.mesh_dim_names, mesh.get_coordinate()
    index, size = 0, 1
    for name, dim, coord in zip(names, mesh.shape, coordinate):
        if name not in ("pp", "tp", "cp"):
            index, size = index * dim + coord, size * dim
    if batch.shape[0] % size:
        raise MeshError(f"--batch-size {batch.shape[0]} must be a multiple of the data-parallel size {size}.")
    rows = batch.shape[0] // size
    return batch[index * rows:(index + 1) * rows]


def _checksum(model: nn.Module) -> float:
    """A weighted sum over every full (gathered) parameter; collective, same call order on every rank. A
    pipeline's parameters are those of the whole model (every stage), in name order."""
    # Gathering FSDP+TP parameters once makes DTensor warn that two all-gathers are "suboptimal".
    quiet = logging.getLogger("torch.distributed.tensor._redistribute")
    level, total = quiet.level, 0.0
    quiet.setLevel(logging.ERROR)
    try:
        params = list(model.parameters())
        if isinstance(model, PipelineModel):
            from ..state.distributed_checkpoint import gather_full_state_dict  # loaded on use: keeps start-up light

            full_state = gather_full_state_dict(model, rank0_only=False)
            params = [full_state[name] for name in sorted(full_state)]
        for index, param in enumerate(params):
            full = (param.full_tensor() if isinstance(param, DTensor) else param).detach().double()
            total += float(full.square().sum()) * (1 + index % 7) + float(full.sum())
    finally:
        quiet.setLevel(level)
    return total


def _local_param_bytes(model: nn.Module) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def _print_line(line: str) -> None:
    """One whole line in a single write, so lines of different ranks sharing a terminal do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _say(line: str) -> None:
    """User output of rank 0 (the demo is a command; its progress lines are its product)."""
    if dist.get_rank() == 0:
        _print_line(line)


def _setup(use_cuda: bool) -> torch.device:
    """Initialize the default process group from the launcher's environment; gloo on CPU, NCCL on CUDA."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("gloo")
    return device


def run_worker(config: DemoConfig) -> DemoResult:
    """This rank's part of the demo (inside a launched job); raises :class:`DemoCheckError` on a bad result."""
    device = _setup(config.use_cuda())
    try:
        return _train(config, device)
    finally:
        dist.destroy_process_group()


def _parallel_model(config: DemoConfig, device: torch.device) -> tuple[nn.Module, Any, str]:
    # loaded on use: keeps start-up light
    from ..api import get_strategy, parallelize
    from ..dryrun.meshspec import build_mesh
    from ..dryrun.modelsource import build_model, resolve_source

    dims = mesh_dims(config, dist.get_world_size())
    mesh = build_mesh(dims, device.type)
    strategy = get_strategy(config.strategy)
    options = dict(config.options)
    if config.sequence_parallel:
        options["sequence_parallel"] = True
    if config.activation_checkpointing:
        options["activation_checkpointing"] = config.activation_checkpointing
    if config.pp > 1:
        options["pp_schedule"] = config.pp_schedule
    model = build_model(resolve_source(config.model), config.overrides, device=device, seed=config.seed)
    total = sum(p.numel() for p in model.parameters())
    described = (f"{config.model} ({type(model).__name__}, {total:,} parameters), strategy {strategy.name}, "
                 f"mesh {' x '.join(f'{k}={v}' for k, v in dims.items())} on {dist.get_world_size()} ranks "
                 f"({device.type}, {dist.get_backend()})")
    return parallelize(model, mesh, strategy, **options), mesh, described


def _train(config: DemoConfig, device: torch.device) -> DemoResult:
    model, mesh, described = _parallel_model(config, device)
    _say(f"meshplan demo: {described}")
    vocab_size = text_config(model.config).vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    losses, seconds = [], []
    for step in range(config.steps):
        input_ids = _data_parallel_slice(mesh, synthetic_batch(step, config, vocab_size)).to(device)
        batch = {"input_ids": input_ids, "labels": input_ids}
        if config.cp > 1:
            batch = shard_batch(batch, mesh["cp"])
        start = time.perf_counter()
        if isinstance(model, PipelineModel):  # forward and backward over the microbatches
            loss = model.step(**batch)
        else:
            loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().float()
        dist.all_reduce(value)
        losses.append(float(value) / dist.get_world_size())
        seconds.append(time.perf_counter() - start)
        _say(f"step {step + 1:>4}/{config.steps}  loss {losses[-1]:.4f}  {seconds[-1] * 1000:7.1f} ms")
    result = DemoResult(losses, seconds, _checksum(model), _gather_ints(_local_param_bytes(model), device))
    _check(result, device)
    return result


def _gather_ints(value: int, device: torch.device) -> list[int]:
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t) for t in gathered]


def _check(result: DemoResult, device: torch.device) -> None:
    """Print the summary; raise :class:`DemoCheckError` (on every rank) when the run went wrong."""
    mine = torch.tensor([result.losses[-1] if result.losses else math.nan, result.checksum],
                        dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    reference = everyone[0]
    disagree = [r for r, t in enumerate(everyone)
                if not torch.allclose(t, reference, rtol=AGREEMENT_RTOL, atol=0, equal_nan=True)]
    decreased = len(result.losses) >= 2 and result.losses[-1] < result.losses[0]
    timed = result.step_seconds[1:] or result.step_seconds
    per_rank = ", ".join(f"{r}: {b:,}" for r, b in enumerate(result.param_bytes))
    if result.losses:
        _say(f"summary: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
             f"({'decreased' if decreased else 'did NOT decrease'}); "
             f"{'ranks agree' if not disagree else f'ranks {disagree} disagree with rank 0'}; "
             f"time/step {1000 * sum(timed) / max(len(timed), 1):.1f} ms; parameter bytes per rank {per_rank}")
    _print_line(f"[rank {dist.get_rank()}/{dist.get_world_size()}] final loss "
                f"{result.losses[-1] if result.losses else math.nan:.6f} checksum {result.checksum:.9e}")
    if disagree:
        raise DemoCheckError(f"ranks {disagree} hold a different model or loss than rank 0 after training.")
    if not decreased:
        raise DemoCheckError(f"the loss did not decrease over {len(result.losses)} steps "
                             f"({result.losses[0] if result.losses else math.nan:.4f} -> "
                             f"{result.losses[-1] if result.losses else math.nan:.4f}).")
