"""Memory and time of loading and saving a Hugging Face folder on 4 gloo ranks (dp_shard=2 x tp=2).

A Llama-shaped checkpoint of about 1.1 GB in bf16 (hidden 2048, 9 layers, vocabulary 32,000, untied) is written
by transformers' ``save_pretrained`` in files of at most 300 MB. Then, each in fresh processes:

* **load, meshplan**: ``meshplan.from_pretrained`` (each rank reads its own shards);
* **load, rank-0 broadcast** (the former README path): meta model, ``parallelize``, rank 0 ``load_file``s every file,
  ``materialize_meta_model(..., broadcast_from_rank0=True)``;
* **load, one process**: ``AutoModelForCausalLM.from_pretrained`` of the same folder;
* **save, meshplan**: ``meshplan.save_pretrained`` of the loaded model;
* **save, gather to rank 0** (the former README path): ``gather_full_state_dict`` then ``save_pretrained`` on rank 0;
* **save, one process**: transformers' ``save_pretrained``.

Memory is each rank's peak resident set size during the step (``VmHWM``, reset before it) minus its RSS just
before, next to 1.5x the bytes of its own shards (the goal for meshplan's load). The ranks run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live tensors (as ``bench/long_context.py``). Time is wall time
of the step on the slowest rank.

    .venv/bin/python bench/checkpoint_io.py [--folder /tmp/meshplan-bench-llama] [--layers 9]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
              vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
MESH = {"dp_shard": 2, "tp": 2}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak_rss() -> None:
    """Start a new peak: Linux resets the process's VmHWM when 5 is written to clear_refs (ru_maxrss cannot be
    reset, and a spawned rank's ru_maxrss starts at its parent's)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kilobytes


def write_folder(folder: Path, layers: int) -> int:
    """transformers' save_pretrained of a random bf16 Llama; returns its bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="300MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _own_bytes(model: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def _timed(fn) -> tuple[float, float]:
    """(seconds on the slowest rank, peak RSS minus RSS before, MB) of ``fn()``, between barriers; the modules the
    steps use are imported first, so that their code is not counted as the step's memory."""
    import safetensors.torch  # noqa: F401
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401

    import meshplan.state.hf_load  # noqa: F401
    import meshplan.state.hf_save  # noqa: F401

    dist.barrier()
    _reset_peak_rss()
    before, start = _rss_mb(), time.perf_counter()
    fn()
    dist.barrier()
    seconds = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds), _peak_rss_mb() - before


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", tuple(MESH.values()), mesh_dim_names=tuple(MESH))


def _policy():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy()  # compute in the parameters' dtype (bf16)


def rank_load_meshplan(folder: str, out: str, save: str) -> dict[str, float]:
    """Runs on every rank: meshplan.from_pretrained, then one of the two distributed saves."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import meshplan

    mesh = _mesh()
    box = {}
    seconds, peak = _timed(lambda: box.setdefault("model", meshplan.from_pretrained(folder, mesh, mp_policy=_policy())))
    model = box["model"]
    result = {"load_s": seconds, "load_peak_mb": peak, "own_mb": _own_bytes(model) / 2**20}
    if save == "meshplan":
        seconds, peak = _timed(lambda: meshplan.save_pretrained(model, out, max_shard_size="300MB"))
    else:
        def gather_and_save() -> None:
            state = meshplan.gather_full_state_dict(model)
            if dist.get_rank() == 0:
                with torch.device("meta"):
                    shell = AutoModelForCausalLM.from_config(model.config)
                shell.save_pretrained(out, state_dict=state, max_shard_size="300MB")

        seconds, peak = _timed(gather_and_save)
    result.update(save_s=seconds, save_peak_mb=peak)
    return result


def rank_load_broadcast(folder: str) -> dict[str, float]:
    """Runs on every rank: the rank-0 broadcast path."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import meshplan

    def load() -> None:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = meshplan.parallelize(model, _mesh(), mp_policy=_policy())
        full = None
        if dist.get_rank() == 0:
            full = {}
            for file in sorted(Path(folder).glob("*.safetensors")):
                full.update(load_file(file))
        meshplan.materialize_meta_model(model, full, broadcast_from_rank0=True)
        box["own_mb"] = _own_bytes(model) / 2**20

    box: dict[str, float] = {}
    seconds, peak = _timed(load)
    return {"load_s": seconds, "load_peak_mb": peak, "own_mb": box["own_mb"]}


def rank_one_process(folder: str, out: str) -> dict[str, float]:
    """Runs on one rank of a 1-rank pool: transformers alone."""
    from transformers import AutoModelForCausalLM

    box = {}
    seconds, peak = _timed(lambda: box.setdefault("model", AutoModelForCausalLM.from_pretrained(folder)))
    save_s, save_peak = _timed(lambda: box["model"].save_pretrained(out, max_shard_size="300MB"))
    return {"load_s": seconds, "load_peak_mb": peak, "save_s": save_s, "save_peak_mb": save_peak}


def main() -> None:
    from meshplan.plugins.testing import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/meshplan-bench-llama")
    parser.add_argument("--layers", type=int, default=9)
    args = parser.parse_args()
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        size = write_folder(folder, args.layers)
        print(f"wrote {folder}: {size / 2**30:.2f} GiB of bf16 parameters")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the rank processes start
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    out = str(folder) + "-saved"
    runs = {
        "meshplan (save: meshplan.save_pretrained)": run_on_ranks(rank_load_meshplan, 4, str(folder), out,
                                                                  "meshplan", timeout=1800),
        "meshplan load (save: gather to rank 0)": run_on_ranks(rank_load_meshplan, 4, str(folder),
                                                                  out + "-gathered", "gather", timeout=1800),
        "rank-0 broadcast load": run_on_ranks(rank_load_broadcast, 4, str(folder), timeout=1800),
        "one process (transformers)": run_on_ranks(rank_one_process, 1, str(folder), out + "-hf", timeout=1800),
    }
    for name, ranks in runs.items():
        for rank, result in enumerate(ranks):
            goal = f" / own shards {result['own_mb']:,.0f} MB = {result['load_peak_mb'] / result['own_mb']:.2f}x " \
                   "(goal <= 1.5x)" if "own_mb" in result else ""
            save = f"; save {result['save_s']:.1f} s, peak +{result['save_peak_mb']:,.0f} MB" \
                if "save_s" in result else ""
            print(f"{name}, rank {rank}: load {result['load_s']:.1f} s, peak +{result['load_peak_mb']:,.0f} MB"
                  f"{goal}{save}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(json.dumps(runs))
    for path in (out, out + "-gathered", out + "-hf"):
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
