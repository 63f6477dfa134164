"""What longctx attention costs inside a transformers model on one GPU: SmolLM2-135M's shape (random weights),
forward + backward of the next-token loss at 8K-64K tokens with ``attn_implementation`` = ``sdpa`` (transformers),
``longctx`` and ``longctx_ring`` on a group of one (``longctx.hf.SequenceParallel``); tokens/s and peak memory.

    PYTHONPATH=. python benchmarks/hf_ring_overhead.py --out benchmarks/results/hf_ring_overhead.json

Each (length, attention) row: 2 untimed steps, then ``--reps`` timed (CUDA-synchronised), bf16 weights and
activations, the loss in float32. The JSON is rewritten atomically after every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import longctx.hf as hf
from longctx.atomic import atomic_write_json
from longctx.bench.measure import device_name, timed
from longctx.kv.model import random_llama
from longctx.kv.throughput import SMOLLM2_135M


def step(model, attn: str, ids: torch.Tensor) -> None:
    model.config._attn_implementation = attn
    if attn == hf.RING:
        sp = hf.SequenceParallel()
        inputs, targets = sp.shard(ids)
        loss = sp.loss(model(**inputs).logits, targets)
    else:
        logits = model(ids).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:])
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (for the longest rows)")
    p.add_argument("--out", default="benchmarks/results/hf_ring_overhead.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    model = random_llama(SMOLLM2_135M, dev, torch.bfloat16).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    result = {"device": device_name(dev), "torch": torch.__version__, "model": "SmolLM2-135M shape, random weights",
              "dtype": "bfloat16", "checkpointing": args.checkpointing, "reps": args.reps,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for T in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, T), device=dev)
        for attn in ("sdpa", hf.EXACT, hf.RING):
            row = {"tokens": T, "attention": attn}
            try:
                for _ in range(2):
                    step(model, attn, ids)
                torch.cuda.reset_peak_memory_stats(dev)
                seconds = timed(dev, lambda: [step(model, attn, ids) for _ in range(args.reps)]) / args.reps
                row.update(ms=1000 * seconds, tokens_per_s=T / seconds,
                           peak_allocated_bytes=torch.cuda.max_memory_allocated(dev))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            torch.cuda.empty_cache()
            sdpa = next((r for r in result["rows"] if r["tokens"] == T and r["attention"] == "sdpa" and "ms" in r), None)
            if sdpa and "ms" in row:
                row["time_vs_sdpa"] = row["ms"] / sdpa["ms"]
            result["rows"].append(row)
            print(row, flush=True)
            atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
