"""Packed rows under context parallelism: tokens/s of documents kept apart vs. the same tokens unpacked.

Two gloo ranks on CPU, mesh ``dp_shard=1 x cp=2``, a small Llama (SDPA, fp32, ``fsdp2``) and one set of
documents of mixed lengths (fixed seed) trained three ways, steps interleaved in the same processes:

* ``packed``: one row, position ids restarting at every document (``DataCollatorWithFlattening``'s layout);
  the CP attention keeps documents apart and skips the key blocks no query of a document can see.
* ``one-row``: the same row as one causal sequence (documents attending each other): the attention work
  packing saves.
* ``padded``: one document per row, right-padded to the longest (the usual unpacked batch; padding is
  computed too).

Each reports tokens/s of real (document) tokens over both ranks: the median step time of ``--steps`` steps
after one warm-up step, between barriers.

    .venv/bin/python bench/cp_packed.py [--seq-len 8192] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=2048, max_position_embeddings=16384)
LAYOUTS = ("packed", "one-row", "padded")


def document_lengths(seq_len: int, seed: int = 0) -> list[int]:
    """Mixed lengths between seq_len / 64 and seq_len / 4 that fill ``seq_len`` exactly."""
    generator = torch.Generator().manual_seed(seed)
    lengths, left = [], seq_len
    while left > 0:
        length = int(torch.randint(seq_len // 64, seq_len // 4 + 1, (1,), generator=generator))
        lengths.append(min(length, left))
        left -= lengths[-1]
    return lengths


def batches(vocab_size: int, lengths: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """The same documents as a packed row, as one causal row and as padded rows (length a multiple of 4)."""
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, vocab_size, (n,), generator=generator) for n in lengths]
    ids = torch.cat(documents).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.masked_fill(positions == 0, -100)  # no document predicts the next one's first token
    width = -(-max(lengths) // 4) * 4
    rows = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(rows)
    for row, document in enumerate(documents):
        rows[row, :len(document)], mask[row, :len(document)] = document, 1
    return {"packed": {"input_ids": ids, "position_ids": positions, "labels": labels},
            "one-row": {"input_ids": ids, "labels": labels},
            "padded": {"input_ids": rows, "attention_mask": mask, "labels": rows.masked_fill(mask == 0, -100)}}


def run_rank(seq_len: int, steps: int) -> dict[str, float]:
    """Runs on every rank: parallelize once, then the layouts' steps interleaved; median step time of each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM

    import meshplan
    from meshplan.context_parallel import shard_batch

    config = AutoConfig.for_model("llama", **CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp_shard", "cp"))
    model = meshplan.parallelize(model, mesh, mp_policy=MixedPrecisionPolicy())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    shards = {name: shard_batch(batch, mesh["cp"])
              for name, batch in batches(config.vocab_size, document_lengths(seq_len)).items()}
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(steps + 1):
        for name in LAYOUTS:
            dist.barrier()
            start = time.perf_counter()
            model(**shards[name]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    from meshplan.plugins.testing import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    lengths = document_lengths(args.seq_len)
    print(f"{len(lengths)} documents, lengths {lengths}, {args.seq_len} tokens; cp=2 on 2 gloo ranks")
    step = run_on_ranks(run_rank, 2, args.seq_len, args.steps, timeout=3600)[0]
    rate = {name: args.seq_len / seconds for name, seconds in step.items()}
    for name in LAYOUTS:
        ratio = "" if name == "packed" else f"; packed / {name} = {rate['packed'] / rate[name]:.2f}x"
        print(f"{name:>8}: step {step[name]:.2f} s, {rate[name]:,.0f} document tokens/s{ratio}")


if __name__ == "__main__":
    main()
