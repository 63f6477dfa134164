"""Which parallel form of power retention is fastest at a model's own shapes: the Triton kernel at several
chunk sizes, the quadratic form (``power_retention_naive``), the PyTorch chunked form, and flash SDPA (causal)
as the yardstick, forward+backward, on one GPU.

    PYTHONPATH=. python3 benchmarks/power_forms.py --out benchmarks/results

Default shapes are the GPU bench's power layer (``longctx bench --preset gpu``): batch 32, 8 query / 4 KV heads,
head dim 32, deg 2, gated, bf16; T from 256 to 4096 at 16K tokens per step (batch = tokens / T: 32 at T = 512).
Every form is checked against the float32 chunked form first. Times: median of ``triton.testing.do_bench``;
forward+backward = one forward and ``torch.autograd.grad`` of q, k, v and the gate. Writes
``<out>/power_forms.json`` atomically.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.atomic import atomic_write_json
from longctx.mechanisms.power import power_retention_chunk
from longctx.mechanisms.power.chunk import power_retention
from longctx.mechanisms.power.naive import power_retention_naive


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seqs", default="256,512,1024,2048,4096")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / T)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--kernel-chunks", default="32,64,128,256")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return ap.parse_args()


def make_inputs(B, Hq, Hkv, T, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(B, Hkv, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
    v = torch.randn(B, Hkv, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
    log_g = F.logsigmoid(4 + torch.randn(B, Hkv, T, device="cuda", generator=g)).requires_grad_()
    return q, k, v, log_g


def fwd_bwd(fn, q, k, v, log_g):
    o = fn(q, k, v, log_g)
    do = torch.ones_like(o)
    return torch.autograd.grad(o, [q, k, v] + ([log_g] if log_g is not None and log_g.requires_grad else []), do,
                               allow_unused=True)


def main() -> None:
    import triton

    args = parse()
    d, Hq, Hkv = args.head_dim, args.heads, args.kv_heads
    forms = {f"kernel c={c}": (lambda c: lambda q, k, v, g: power_retention(q, k, v, g, 2, c, use_kernel=True))(c)
             for c in map(int, args.kernel_chunks.split(","))}
    forms["quadratic"] = lambda q, k, v, g: power_retention_naive(q, k, v, g, 2)
    forms["chunked (PyTorch) c=64"] = lambda q, k, v, g: power_retention(q, k, v, g, 2, 64, use_kernel=False)
    rep = Hq // Hkv
    forms["flash SDPA (no gate)"] = lambda q, k, v, g: F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    out = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "tokens": args.tokens, "heads": [Hq, Hkv], "head_dim": d, "dtype": "bfloat16",
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": []}
    for T in map(int, args.seqs.split(",")):
        B = max(1, args.tokens // T)
        q, k, v, log_g = make_inputs(B, Hq, Hkv, T, d)
        ref = power_retention_chunk(q.float(), k.float(), v.float(), log_g, 2, 64)
        for name, fn in forms.items():
            row = {"T": T, "batch": B, "form": name}
            try:
                if "SDPA" not in name:
                    o = fn(q, k, v, log_g).float()
                    row["rel_err_out"] = float((o - ref).norm() / ref.norm())
                row["fwd_ms"] = triton.testing.do_bench(lambda: fn(q, k, v, log_g), rep=args.rep)
                row["fwd_bwd_ms"] = triton.testing.do_bench(lambda: fwd_bwd(fn, q, k, v, log_g), rep=args.rep)
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            except Exception as e:  # noqa: BLE001 — a failing form is a result
                row["error"] = f"{type(e).__name__}: {e}"
            torch.cuda.empty_cache()
            out["rows"].append(row)
            print(row, flush=True)
        atomic_write_json(Path(args.out) / "power_forms.json", out)


if __name__ == "__main__":
    main()
