"""What longctx attention costs inside a transformers model on one GPU: SmolLM2-135M's shape (random weights),
forward + backward of the next-token loss at 8K-64K tokens with ``attn_implementation`` = ``sdpa`` (transformers),
``longctx`` and ``longctx_ring`` on a group of one (``longctx.hf.SequenceParallel``); tokens/s and peak memory.

    PYTHONPATH=. python benchmarks/hf_ring_overhead.py --out benchmarks/results/hf_ring_overhead.json

The loss is computed from the last hidden states in checkpointed slices of ``--loss-chunk`` tokens
(``SequenceParallel.hidden_loss``, the same for every attention; the recorded runs computed the same sums with a
copy of it in this script), so that the ``[T, 49152]`` logits never exist whole: with whole logits 64K tokens do
not fit in 80 GB. Each length runs ``--rounds`` rounds of the three attentions in turn (so that clock drift and
allocator state fall on every one alike); a round of one attention is 2 untimed steps and ``--reps`` timed ones
(CUDA-synchronised). ``ms`` is the best round's mean, ``ms_rounds`` every round's. bf16 weights and activations,
the loss in float32. The JSON is rewritten atomically after every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import longctx.hf as hf
from longctx.atomic import atomic_write_json
from longctx.bench.measure import device_name, timed
from longctx.kv.model import random_llama
from longctx.kv.throughput_presets import SMOLLM2_135M

ATTENTIONS = ("sdpa", hf.EXACT, hf.RING)


def step(model, attn: str, ids: torch.Tensor, loss_chunk: int) -> None:
    model.config._attn_implementation = attn
    sp = hf.SequenceParallel()                       # a group of one: the loss is the plain token mean
    if attn == hf.RING:
        inputs, targets = sp.shard(ids)
    else:
        inputs = {"input_ids": ids}
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    hidden = model.model(**inputs).last_hidden_state
    loss = sp.hidden_loss(model.lm_head, hidden, targets, chunk=loss_chunk)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results/hf_ring_overhead.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    model = random_llama(SMOLLM2_135M, dev, torch.bfloat16).train()
    result = {"device": device_name(dev), "torch": torch.__version__, "model": "SmolLM2-135M shape, random weights",
              "dtype": "bfloat16", "reps": args.reps, "rounds": args.rounds, "loss_chunk": args.loss_chunk,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    for T in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, T), device=dev)
        rows = {a: {"tokens": T, "attention": a, "ms_rounds": [], "peak_allocated_bytes": 0} for a in ATTENTIONS}
        for _ in range(args.rounds):
            for attn, row in rows.items():
                if "error" in row:
                    continue
                try:
                    for _ in range(2):
                        step(model, attn, ids, args.loss_chunk)
                    torch.cuda.reset_peak_memory_stats(dev)
                    seconds = timed(dev, lambda: [step(model, attn, ids, args.loss_chunk)
                                                  for _ in range(args.reps)]) / args.reps
                    row["ms_rounds"].append(1000 * seconds)
                    row["peak_allocated_bytes"] = max(row["peak_allocated_bytes"], torch.cuda.max_memory_allocated(dev))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                torch.cuda.empty_cache()
        for attn, row in rows.items():
            if row["ms_rounds"]:
                row["ms"] = min(row["ms_rounds"])
                row["tokens_per_s"] = 1000 * T / row["ms"]
            if attn != "sdpa" and "ms" in row and "ms" in rows["sdpa"]:
                row["time_vs_sdpa"] = row["ms"] / rows["sdpa"]["ms"]
            result["rows"].append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
