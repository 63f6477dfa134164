"""Tensor Cache on one GPU: exactness, parallel-form speed vs SDPA, decode step time and memory vs context.

Run on a CUDA machine:
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/tensor_cache.py --out benchmarks/results
On a CPU, a tiny smoke run of the same code: ``--device cpu --tiny``.

1. Exactness: float64 parallel form == float64 token-by-token definition (``naive``) on the device; float32
   and bf16 parallel forms (outputs and input gradients) vs float64 at a long length; the step form (prefill +
   one token at a time) vs the parallel form in float32.
2. Parallel form, forward and forward+backward, bf16 inputs (the memory branch runs in float32), vs causal
   SDPA (full attention) and vs the window part alone (blocked sliding-window attention), with peak memory.
3. Decoding: one-token step time and peak memory after contexts up to 1M tokens (prefilled through the step
   form in pieces), vs one SDPA decode step over a full KV cache of the same context.
Writes ``tensor_cache.json`` atomically and prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.atomic import atomic_write_json
from longctx.mechanisms import build_mechanism, tensor_bytes
from longctx.mechanisms.tensor_cache import blocked_window_attention, tensor_cache_naive


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, budget_s: float = 0.5, max_reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` after a warm-up; repetitions fit ``budget_s`` (at least 3)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = time.perf_counter() - t0
    times = []
    for _ in range(max(3, min(max_reps, int(budget_s / max(est, 1e-6))))):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def live_gib(device) -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None


def peak_gib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def mechanism(hq, hkv, d, window, device, seed=0, **opts):
    """A Tensor Cache with random (not initial) decay, write rate and gates."""
    m = build_mechanism("tensor_cache", hq, hkv, d, window=window, **opts).to(device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.decay_offset, m.eta_offset, m.gate_offset):
            p.copy_(torch.randn(p.shape, generator=g).to(device))
    return m


def randn(shape, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, device=device, dtype=torch.float32, generator=g).to(dtype)


def exactness(device, tiny: bool) -> dict:
    B, hq, hkv, d, W = 2, 8, 2, 64, 64
    res = {}
    # (a) float64 parallel == float64 token-by-token definition
    T = 80 if tiny else 700
    m = mechanism(hq, hkv, d, W, device).double()
    q, k, v = (randn((B, h, T, d), device, torch.float64, i) for i, h in enumerate((hq, hkv, hkv)))
    ref = tensor_cache_naive(q, k, v, W, m.decay, m.eta, m.gate, chunk=m.chunk)
    res["float64_parallel_vs_naive"] = {"T": T, "rel_err": rel(m(q, k, v), ref)}
    # (b) float32 / bf16 parallel vs float64 parallel at length, outputs and input gradients
    T = 300 if tiny else 16384
    q64, k64, v64 = (randn((B, h, T, d), device, torch.float64, 10 + i).requires_grad_()
                     for i, h in enumerate((hq, hkv, hkv)))
    out64 = m(q64, k64, v64)
    cot = randn(out64.shape, device, torch.float64, 20)
    g64 = torch.autograd.grad(out64, (q64, k64, v64), cot)
    for dt in (torch.float32, torch.bfloat16):
        mm = mechanism(hq, hkv, d, W, device)                     # same seed: same parameters, float32
        x = [t.detach().to(dt).requires_grad_() for t in (q64, k64, v64)]
        out = mm(*x)
        gs = torch.autograd.grad(out, x, cot.to(dt))
        res[f"{str(dt).split('.')[-1]}_parallel_vs_float64"] = {
            "T": T, "out": rel(out, out64), "dq": rel(gs[0], g64[0]), "dk": rel(gs[1], g64[1]), "dv": rel(gs[2], g64[2])}
    # (c) step form (prefill then single tokens) vs parallel, float32
    T, pre = (120, 70) if tiny else (3000, 2500)
    mm = mechanism(hq, hkv, d, W, device)
    q, k, v = (randn((B, h, T, d), device, torch.float32, 30 + i) for i, h in enumerate((hq, hkv, hkv)))
    with torch.no_grad():
        ref = mm(q, k, v)
        o, state = mm.step(q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], mm.init_state(B, device, torch.float32))
        outs = [o]
        for t in range(pre, T):
            o, state = mm.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            outs.append(o)
    res["float32_step_vs_parallel"] = {"T": T, "prefill": pre, "rel_err": rel(torch.cat(outs, 2), ref)}
    return res


def parallel_speed(device, tiny: bool, deadline: float) -> list[dict]:
    B, H, d, W, chunk = (1, 2, 16, 32, 16) if tiny else (4, 16, 64, 512, 64)
    lengths = [256, 512] if tiny else [4096, 8192, 16384, 32768, 65536]
    dtype = torch.float32 if tiny else torch.bfloat16
    rows = []
    for T in lengths:
        if time.perf_counter() > deadline:
            print(f"time budget reached, skipping T >= {T}")
            break
        q, k, v = (randn((B, H, T, d), device, dtype, i).requires_grad_() for i in range(3))
        cot = randn((B, H, T, d), device, dtype, 9)
        variants = {
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "window_only": lambda: blocked_window_attention(q, k, v, W),
            "tensor_cache": mechanism(H, H, d, W, device, chunk=chunk).to(dtype),
            "tensor_cache_2x_chunk": mechanism(H, H, d, W, device, chunk=2 * chunk).to(dtype),
            "tensor_cache_chunk_mean": mechanism(H, H, d, W, device, chunk=chunk, write="chunk_mean").to(dtype),
        }
        for name, f in variants.items():
            fwd = (lambda f=f: f(q, k, v)) if isinstance(f, torch.nn.Module) else f

            def fwd_bwd(fwd=fwd):
                q.grad = k.grad = v.grad = None
                fwd().backward(cot)

            row = {"T": T, "variant": name, "B": B, "H": H, "d": d, "window": W,
                   "chunk": f.chunk if isinstance(f, torch.nn.Module) else None,
                   "dtype": str(dtype).split(".")[-1]}
            try:
                with torch.no_grad():
                    row["fwd_ms"] = timed(fwd, device)
                    row["fwd_peak_gib"] = peak_gib(fwd, device)
                row["fwd_bwd_ms"] = timed(fwd_bwd, device)
                row["fwd_bwd_peak_gib"] = peak_gib(fwd_bwd, device)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            q.grad = k.grad = v.grad = None
            rows.append(row)
            print(row, flush=True)
    return rows


def prefill(m, state, ctx: int, piece: int, device, dtype):
    """Feed random tokens through the step form, ``piece`` at a time, until ``ctx`` tokens were seen."""
    B, H, d = state.window.k.shape[0], m.n_head, m.head_dim
    while state.seen < ctx:
        n = min(piece, ctx - state.seen)
        q, k, v = (randn((B, h, n, d), device, dtype, state.seen + i) for i, h in enumerate((H, m.n_kv_head, m.n_kv_head)))
        _, state = m.step(q, k, v, state)
    return state


def full_kv_step(q1, ctx: int, device, dtype) -> dict:
    """Baseline: one decode step of full attention over a KV cache of ``ctx`` tokens."""
    try:
        kc, vc = (randn((q1.shape[0], q1.shape[1], ctx, q1.shape[3]), device, dtype, 50 + i) for i in range(2))
        full = lambda: F.scaled_dot_product_attention(q1, kc, vc)  # noqa: E731
        return {"full_kv_step_ms": timed(full, device, budget_s=0.3, max_reps=200),
                "full_kv_cache_bytes": 2 * kc.numel() * kc.element_size(), "full_kv_step_peak_gib": peak_gib(full, device)}
    except torch.cuda.OutOfMemoryError:
        return {"full_kv_error": "out of memory"}


def decode_speed(device, tiny: bool, deadline: float) -> list[dict]:
    B, H, d, W = (1, 2, 16, 32) if tiny else (1, 16, 64, 512)
    contexts = [256, 1024] if tiny else [1024, 16384, 131072, 1 << 20]
    piece = 100 if tiny else 65536
    dtype = torch.float32 if tiny else torch.bfloat16
    m = mechanism(H, H, d, W, device).to(dtype)
    state, rows = m.init_state(B, device, dtype), []
    q1, k1, v1 = (randn((B, H, 1, d), device, dtype, 40 + i) for i in range(3))
    with torch.no_grad():
        for ctx in contexts:
            if time.perf_counter() > deadline:
                print(f"time budget reached, skipping context >= {ctx}")
                break
            state = prefill(m, state, ctx, piece, device, dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            step = lambda: m.step(q1, k1, v1, state)              # noqa: E731 - pure: the state is not changed
            row = {"context": ctx, "B": B, "H": H, "d": d, "window": W, "dtype": str(dtype).split(".")[-1],
                   "live_gib_before_step": live_gib(device),
                   "step_ms": timed(step, device, budget_s=0.3, max_reps=200),
                   "step_peak_gib": peak_gib(step, device),
                   "state_bytes_formula": m.state_bytes(ctx, B, dtype), "state_bytes_measured": tensor_bytes(state)}
            row.update(full_kv_step(q1, ctx, device, dtype))
            rows.append(row)
            print(row, flush=True)
    return rows


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--time-budget", type=float, default=170.0, help="seconds before skipping larger sizes")
    args = ap.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    deadline_parallel = start + 0.6 * args.time_budget
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "command": "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/tensor_cache.py --out benchmarks/results"}
    res["exactness"] = exactness(device, args.tiny)
    print(res["exactness"], flush=True)
    res["parallel"] = parallel_speed(device, args.tiny, deadline_parallel)
    res["decode"] = decode_speed(device, args.tiny, start + args.time_budget)
    res["seconds"] = time.perf_counter() - start
    path = atomic_write_json(Path(args.out) / ("tensor_cache_tiny.json" if args.tiny else "tensor_cache.json"), res)

    print("\n| T | variant | chunk | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB |\n|---|---|---|---|---|---|---|")
    for r in res["parallel"]:
        print(f"| {r['T']} | {r['variant']} | {r['chunk'] or '—'} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
              f"{fmt(r.get('fwd_peak_gib'))} | {fmt(r.get('fwd_bwd_peak_gib'))} |")
    print("\n| context | step ms | live GiB before step | step peak GiB | state bytes (formula = measured) | "
          "full-KV step ms | full KV cache GiB |\n|---|---|---|---|---|---|---|")
    for r in res["decode"]:
        same = "=" if r["state_bytes_formula"] == r["state_bytes_measured"] else "!="
        kv = r.get("full_kv_cache_bytes")
        print(f"| {r['context']} | {r['step_ms']:.3f} | {fmt(r['live_gib_before_step'], '.3f')} | "
              f"{fmt(r['step_peak_gib'], '.3f')} | "
              f"{r['state_bytes_formula']} {same} {r['state_bytes_measured']} | {fmt(r.get('full_kv_step_ms'), '.3f')} | "
              f"{fmt(None if kv is None else kv / 2**30, '.3f')} |")
    print(f"\nwrote {path} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
