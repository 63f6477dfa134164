"""Where the time of one SmolLM2-shaped training step goes with ``sdpa`` and ``longctx`` attention (one GPU):
torch.profiler's CUDA kernel time by kernel and the step's wall time, at ``--length`` tokens. A diagnostic for
``benchmarks/hf_ring_overhead.py``'s short-sequence rows.

    PYTHONPATH=. python benchmarks/hf_attention_profile.py --length 8192 --out benchmarks/results/hf_attention_profile.json
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from hf_ring_overhead import step  # noqa: E402

import longctx.hf as hf  # noqa: E402
from longctx.atomic import atomic_write_json  # noqa: E402
from longctx.bench.measure import device_name  # noqa: E402
from longctx.kv.model import random_llama  # noqa: E402
from longctx.kv.throughput_presets import SMOLLM2_135M  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/hf_attention_profile.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    model = random_llama(SMOLLM2_135M, dev, torch.bfloat16).train()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, args.length), device=dev)
    result = {"device": device_name(dev), "torch": torch.__version__, "tokens": args.length, "rows": {}}
    walls = defaultdict(list)
    for attn in ("sdpa", hf.EXACT):
        for _ in range(3):
            step(model, attn, ids, 8192)
    for _ in range(args.rounds):                      # alternating, one step each, host clock around a sync
        for attn in ("sdpa", hf.EXACT):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step(model, attn, ids, 8192)
            torch.cuda.synchronize()
            walls[attn].append(1000 * (time.perf_counter() - t))
    for attn in ("sdpa", hf.EXACT):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(model, attn, ids, 8192)
            torch.cuda.synchronize()
        kernels = defaultdict(float)
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.key] += e.device_time_total / 1000
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
        result["rows"][attn] = {"wall_ms_rounds": walls[attn], "gpu_kernel_ms": sum(kernels.values()),
                                "top_kernels_ms": top,
                                "attention_ops": [(e.key, e.count, e.device_time_total / 1000)
                                                  for e in prof.key_averages() if "attention" in e.key.lower()
                                                  or "sdpa" in e.key.lower() or "cudnn" in e.key.lower()][:12]}
        print(attn, "wall", [round(w, 1) for w in walls[attn]], "gpu kernels ms", round(sum(kernels.values()), 1))
        for k, v in top:
            print(f"   {v:8.2f}  {k[:110]}")
        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
