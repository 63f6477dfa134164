"""GPU check of longctx.attention: every dispatch path against a float64 reference, and its speed vs SDPA.

Run on a CUDA machine:  PYTHONPATH=. python benchmarks/attention_gpu_check.py --out benchmarks/results
Prints a table; writes attention_gpu_check.json (atomically).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.atomic import atomic_write_json
from longctx.attention import attention, attention_flops


def reference(q, k, v, causal):
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(torch.arange(tk, device=s.device)[None] > torch.arange(tq, device=s.device)[:, None]
                          + tk - tq, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (hq, hkv, tq, tk, d, causal) in [(8, 8, 1000, 1000, 64, True), (8, 2, 777, 777, 128, True),
                                             (8, 2, 1, 4096, 64, False), (4, 1, 33, 515, 64, True),
                                             (8, 4, 512, 512, 64, False)]:
            g = torch.Generator(device=dev).manual_seed(len(rows))
            q = torch.randn(2, hq, tq, d, device=dev, dtype=dtype, generator=g)
            k = torch.randn(2, hkv, tk, d, device=dev, dtype=dtype, generator=g)
            v = torch.randn(2, hkv, tk, d, device=dev, dtype=dtype, generator=g)
            ro, rl = reference(q, k, v, causal)
            o1 = attention(q, k, v, causal=causal)
            o2, l2 = attention(q, k, v, causal=causal, return_lse=True)
            rows.append({"dtype": str(dtype), "shape": [hq, hkv, tq, tk, d], "causal": causal,
                         "err_out": rel(o1, ro), "err_out_lse_path": rel(o2, ro), "err_lse": rel(l2, rl)})
    timing = []
    for T in (4096, 16384):
        q, k, v = (torch.randn(4, 16, T, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        from triton.testing import do_bench
        t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
        t_ours = do_bench(lambda: attention(q, k, v, causal=True), return_mode="median")
        t_lse = do_bench(lambda: attention(q, k, v, causal=True, return_lse=True), return_mode="median")
        fl = attention_flops(4, 16, T, T, 128, True)
        timing.append({"T": T, "sdpa_ms": t_sdpa, "attention_ms": t_ours, "attention_lse_ms": t_lse,
                       "attention_lse_tflops": fl / t_lse / 1e9})
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "accuracy": rows, "timing": timing}
    atomic_write_json(Path(args.out) / "attention_gpu_check.json", res)
    worst = max(max(r["err_out"], r["err_out_lse_path"], r["err_lse"]) for r in rows)
    for r in rows:
        print(r)
    for t in timing:
        print(t)
    print(f"worst relative error: {worst:.2e}")


if __name__ == "__main__":
    main()
