"""A long prefill into a power-retention decoding state: ``power_retention_step`` through the chunked Triton kernel
(``power_retention_continued``: the default on CUDA) against the PyTorch chunked form (``use_kernel=False``).

    PYTHONPATH=. python benchmarks/power_prefill.py --out benchmarks/results/power_prefill.json

For every prompt length: the prompt in two steps (the first ``T - 1000`` tokens from an empty state, then 1000 more
continuing it, as a chat turn would), no gradients; the best of ``--reps`` timed repetitions after one untimed, the
peak of allocated memory above the inputs, and the largest relative difference of the outputs and of the state
``S`` between the two paths. bf16, batch 1, 8 query / 8 KV heads, d = e = 64, deg 2, gated, chunk 128,
``switch_over`` 256. The JSON is written atomically after each length.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from longctx.atomic import atomic_write_json
from longctx.bench.measure import device_name
from longctx.mechanisms.power import init_power_state, power_retention_step

CHUNK, SWITCH_OVER, TAIL = 128, 256, 1000


def prefill(q, k, v, log_g, use_kernel):
    """``(o [B, Hq, T, e], state)``: the prompt in two steps from an empty state."""
    B, Hkv, T, d = k.shape
    state = init_power_state(B, Hkv, d, v.shape[-1], gated=True, device=q.device, dtype=q.dtype)
    outs = []
    for part in (slice(0, T - TAIL), slice(T - TAIL, T)):
        o, state = power_retention_step(q[:, :, part], k[:, :, part], v[:, :, part], state, log_g[:, :, part],
                                        chunk_size=CHUNK, switch_over=SWITCH_OVER, use_kernel=use_kernel)
        outs.append(o)
    return torch.cat(outs, 2), state


def timed(fn, reps: int, device) -> tuple[float, int, tuple]:
    """Best seconds of ``reps`` calls after one untimed, peak allocated bytes above the start, the last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = fn()
    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return best, peak, result


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="4096,32768,131072")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="benchmarks/results/power_prefill.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"device": device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": f"B=1, Hq=Hkv=8, d=e=64, deg 2, gated, chunk {CHUNK}, switch_over {SWITCH_OVER}, {dtype}",
              "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for T in [int(x) for x in args.lengths.split(",")]:
        q, k, v = (torch.randn(1, 8, T, 64, device=device, dtype=dtype, generator=gen) for _ in range(3))
        log_g = torch.nn.functional.logsigmoid(torch.randn(1, 8, T, device=device, generator=gen) + 4)
        row = {"tokens": T}
        with torch.no_grad():
            outs = {}
            for name, use_kernel in (("kernel", None), ("chunked", False)):
                seconds, peak, outs[name] = timed(lambda: prefill(q, k, v, log_g, use_kernel), args.reps, device)
                row[f"{name}_ms"], row[f"{name}_peak_bytes"] = 1000 * seconds, peak
        (o_k, st_k), (o_c, st_c) = outs["kernel"], outs["chunked"]
        row.update(speedup=row["chunked_ms"] / row["kernel_ms"], out_rel_diff=rel(o_k, o_c),
                   state_rel_diff=rel(st_k.S, st_c.S))
        result["rows"].append(row)
        print(row, flush=True)
        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
