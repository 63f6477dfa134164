"""GPU check of graph-captured decoding with transformers caches (``longctx.kv.graphs``): greedy tokens and kept
positions against the eager caches, on CUDA.

1. A tiny random Llama in float32: ``generate_slots`` (CUDA graphs, the Triton slot attention) against eager
   decoding through transformers' SDPA: ``StaticCache`` against ``DynamicCache``, and each fixed-budget
   ``CompressedCache`` against the growing one (same tokens, same kept positions).
2. SmolLM2-135M's shape in bfloat16, batch 4: graphs against the same slot decoder without graphs (same kernels,
   so the tokens must be identical: this isolates the capture from the attention kernel's rounding).

    PYTHONPATH=. python benchmarks/kv_graphs_check.py --out benchmarks/results/kv_graphs_check.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from longctx.atomic import atomic_write_json
from longctx.bench.measure import device_name
from longctx.kv import CompressedCache, calibrate
from longctx.kv.evaluate import greedy_steps
from longctx.kv.graphs import generate_slots
from longctx.kv.model import random_llama
from longctx.kv.throughput_presets import SMOLLM2_135M, TINY_LLAMA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/kv_graphs_check.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    checks = []
    model = random_llama(TINY_LLAMA, dev, torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (3, 300), generator=gen).to(dev)
    stats = calibrate(model, torch.randint(0, 512, (1, 256), generator=gen).to(dev), "tiny")
    want = greedy_steps(model, DynamicCache(), ids, 64)
    got = generate_slots(model, ids, 64, StaticCache(config=model.config, max_cache_len=400))
    checks.append({"case": "tiny fp32: StaticCache graphs vs DynamicCache eager",
                   "tokens_equal": torch.equal(got, want)})
    for method in ("triattention", "streamingllm", "keynorm", "snapkv", "h2o"):
        extra = {"stats": stats} if method == "triattention" else {}
        if method in ("snapkv", "h2o"):
            extra["model"] = model
        grow = CompressedCache(method, budget=96, slack=16, **extra)
        fixed = CompressedCache(method, budget=96, slack=16, fixed=True, **extra)
        want = greedy_steps(model, grow, ids, 64)
        got = generate_slots(model, ids, 64, fixed)
        checks.append({"case": f"tiny fp32: {method} fixed graphs vs growing eager",
                       "tokens_equal": torch.equal(got, want),
                       "positions_equal": all(torch.equal(a.positions, b.positions)
                                              for a, b in zip(grow.layers, fixed.layers)),
                       "prunes": fixed.layers[0].n_pruned})
        grow.detach(), fixed.detach()
    model = random_llama(SMOLLM2_135M, dev, torch.bfloat16)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (4, 1000), generator=gen).to(dev)
    stats = calibrate(model, ids[:1], "smollm2-shaped")
    for name, make in (("static", lambda: StaticCache(config=model.config, max_cache_len=1200)),
                       ("triattention", lambda: CompressedCache("triattention", budget=256, slack=64, fixed=True,
                                                                stats=stats))):
        a, b = make(), make()
        plain = generate_slots(model, ids, 150, a, graphs=False)
        graphed = generate_slots(model, ids, 150, b, graphs=True)
        checks.append({"case": f"smollm2-shaped bf16 batch 4: {name} graphs vs no graphs",
                       "tokens_equal": torch.equal(plain, graphed)})
    result = {"device": device_name(dev), "torch": torch.__version__, "checks": checks,
              "all_passed": all(all(v for k, v in c.items() if k.endswith("_equal")) for c in checks)}
    for c in checks:
        print(c)
    atomic_write_json(Path(args.out), result)
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
