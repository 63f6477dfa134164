"""One-query decode attention on CUDA: which SDPA backend, when the key length grows by one every call.

A decoding step attends one query to a cache one token longer than at the previous step. cuDNN's attention
builds an execution plan per new shape; this script times that next to the flash kernel and to what
``longctx.attention`` dispatches to (``GROWING_KEYS_BACKENDS``), each variant on key lengths no other variant
has used (so no variant profits from another's cached plans), and the default dispatch at one fixed length.

    PYTHONPATH=. python benchmarks/decode_attention.py --out benchmarks/results/decode_attention_gpu.json

Shapes: batch 1, 8 query heads, 4 KV heads, head_dim 32, bf16 (the GPU bench preset's layer). Writes JSON
atomically. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longctx.atomic import atomic_write_json
from longctx.attention import attention, attention_reference
from longctx.bench.measure import device_name

VARIANTS = {
    "sdpa default dispatch": None,
    "sdpa cuDNN only": [SDPBackend.CUDNN_ATTENTION],
    "sdpa flash only": [SDPBackend.FLASH_ATTENTION],
    "longctx.attention": "longctx",
}


def time_calls(call, lengths: list[int]) -> float:
    """Mean milliseconds of ``call(n)`` over ``lengths`` (after two untimed calls at the first length)."""
    call(lengths[0])
    call(lengths[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for n in lengths:
        call(n)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / len(lengths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="16384,65536,262144,1048576")
    p.add_argument("--calls", type=int, default=20, help="timed calls per variant (default 20)")
    p.add_argument("--out", default="benchmarks/results/decode_attention_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention.py needs a CUDA device")
    dev, dt, (B, hq, hkv, d) = torch.device("cuda"), torch.bfloat16, (1, 8, 4, 32)
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        spare = (len(VARIANTS) + 1) * (args.calls + 2)
        k = torch.randn(B, hkv, n + spare, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q = torch.randn(B, hq, 1, d, device=dev, dtype=dt)
        ref = attention_reference(q.double(), k[:, :, :n].double(), v[:, :, :n].double())[0]
        row = {"context": n}
        for i, (name, backends) in enumerate(VARIANTS.items()):
            lengths = [n + i * (args.calls + 2) + j for j in range(args.calls)]

            def call(m, backends=backends):
                if backends == "longctx":
                    return attention(q, k[:, :, :m], v[:, :, :m], causal=True)
                if backends is None:
                    return F.scaled_dot_product_attention(q, k[:, :, :m], v[:, :, :m], enable_gqa=True)
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, k[:, :, :m], v[:, :, :m], enable_gqa=True)
            try:
                row[f"{name} ms"] = time_calls(call, lengths)
                err = (call(n).double() - ref).abs().max().item()
                row[f"{name} max abs err vs float64"] = err
            except RuntimeError as e:
                row[f"{name} ms"] = f"error: {str(e)[:160]}"
        row["sdpa default dispatch, fixed length ms"] = time_calls(
            lambda m: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True), [n] * args.calls)
        rows.append(row)
        print(row, flush=True)
        del k, v
        torch.cuda.empty_cache()
    atomic_write_json(Path(args.out), {"meta": {"command": " ".join(sys.argv), "device": device_name(dev),
                                          "torch": torch.__version__, "dtype": "bfloat16",
                                          "shape": {"batch": B, "q_heads": hq, "kv_heads": hkv, "head_dim": d},
                                          "date": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
