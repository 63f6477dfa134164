"""Power retention on one GPU: longctx's Triton kernel vs SDPA (flash, causal) vs the public ``retention``
package's kernel (PyPI ``retention==1.0.7``), forward and forward+backward, plus decode step time and state
memory from 1K to 1M tokens of context.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/retention-1.0.7-py3-none-any.whl
    PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site python3 benchmarks/power_retention.py --out benchmarks/results

CPU dry run of every code path at toy sizes (Triton interpreter, wall-clock timer, no ``retention``):

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/power_retention.py --device cpu --tokens 256 --seqs 64,128 \
        --heads 2 --head-dim 16 --chunk 32 --chunks 32,64 --variants default --decode-contexts 1024,2048 --no-retention --out /tmp/prb

Shapes: tokens per step fixed (``--tokens``, 128K), batch = tokens / T, 8 heads (query = KV), d = e = 64, deg 2,
chunk 128 for ``retention`` and the checks, ours at the fastest of ``--chunks`` (the same function), gated (``log_g = logsigmoid(randn)``, float32, with gradient), bf16. Times: median of
``triton.testing.do_bench``; forward+backward = one forward and ``torch.autograd.grad`` of all inputs.

Flops (useful work, each power kernel at its own chunk c): forward ``B H T (4 D e + c (d + e))`` with
``D = C(d+1, 2) = 2080`` (state update and query, ``2 D e`` each; causal half of the ``c x c`` chunk
attention), forward+backward 3x that. SDPA: forward ``2 B H T^2 d`` (causal), forward+backward 3.5x. The
matmul ceiling is a measured 8192^3 bf16 ``torch.matmul`` in the same run.

Before timing, every kernel configuration is checked on random inputs against the float32 PyTorch chunked
reference (and the ``retention`` kernel against the same reference). Results are written atomically to
``<out>/power_retention.json`` after every section.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.atomic import atomic_write_json
from longctx.mechanisms import build_mechanism, tensor_bytes
from longctx.mechanisms.power import expanded_dim, power_retention_chunk
from longctx.mechanisms.power.chunk_triton import KernelConfig, power_retention_triton
from longctx.mechanisms.power.recurrent import PowerState, recent_count

VARIANTS = {  # the defaults and one change each (the kernel's history of variants: power_retention_notes.md)
    "default": KernelConfig(),
    "f4": KernelConfig(feature_rows=4),
    "fb8": KernelConfig(feature_block=8, feature_rows=8),
    "r64": KernelConfig(state_rows=64),
    "st2": KernelConfig(stages_state=2),
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seqs", default="1024,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128, help="chunk of the retention kernel and the checks")
    ap.add_argument("--chunks", default="512,1024", help="chunk sizes of our kernel compared with the variants "
                    "(the result is the same function; the chunk trades in-chunk work for state snapshots)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="kernel configurations to compare")
    ap.add_argument("--profile-seqs", default="4096,131072", help="T at which per-kernel times are recorded")
    ap.add_argument("--variant-seqs", default="4096,131072", help="T at which the variants are compared")
    ap.add_argument("--check-seq", type=int, default=4096, help="length of the correctness checks")
    ap.add_argument("--no-retention", action="store_true")
    ap.add_argument("--quick-checks", action="store_true", help="one gated bf16 check per variant")
    ap.add_argument("--decode-contexts", default="1024,16384,131072,1048576")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds; later sections are skipped")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    return ap.parse_args()


DEVICE = "cuda"


def bench(fn, rep: int) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, a wall clock on the CPU dry run."""
    if DEVICE == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[1]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_inputs(B, H, T, d, dtype, gated=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, device=DEVICE, generator=g).to(dtype) for _ in range(3))
    log_g = F.logsigmoid(torch.randn(B, H, T, device=DEVICE, generator=g)) if gated else None
    return q, k, v, log_g


def power_flops(B, H, T, d, c) -> float:
    return B * H * T * (4 * expanded_dim(d, 2) * d + c * 2 * d)


def sdpa_flops(B, H, T, d) -> float:
    return 2 * B * H * T * T * d


def retention_fn():
    from retention import power_retention
    return power_retention


def run_ours(q, k, v, log_g, c, cfg):
    return power_retention_triton(q, k, v, log_g, chunk_size=c, config=cfg)


def to_retention_layout(q, k, v, log_g):
    """``[B, H, T, d] -> [B, T, H, d]`` (and log_g ``[B, T, H]``), contiguous: the ``retention`` package's layout."""
    return tuple(None if t is None else t.detach().transpose(1, 2).contiguous() for t in (q, k, v, log_g))


def run_retention(q, k, v, log_g, c):
    """The ``retention`` kernel on inputs already in its layout."""
    return retention_fn()(q, k, v, log_g, deg=2, chunk_size=c, scale=q.shape[-1] ** -0.5)


def check(fn, name, B, H, T, d, c, dtype, gated, seed, retention_layout=False):
    """Relative errors of out and every gradient against the float32 PyTorch chunked form."""
    q, k, v, log_g = make_inputs(B, H, T, d, dtype, gated, seed)
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([log_g.requires_grad_()] if gated else [])
    if retention_layout:
        theirs = [t.requires_grad_() for t in to_retention_layout(q, k, v, log_g) if t is not None]
        out = fn(*theirs, *([None] if not gated else [])).transpose(1, 2)
        do = torch.randn_like(out)
        grads = [g_.transpose(1, 2) for g_ in torch.autograd.grad(out, theirs, do)]
    else:
        out = fn(q, k, v, log_g)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = power_retention_chunk(*ref_leaves[:3], ref_leaves[3] if gated else None, 2, c)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    names = ["o", "dq", "dk", "dv"] + (["dlog_g"] if gated else [])
    errs = dict(zip(names, [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]))
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g_).all()) for g_ in grads)
    log(f"check {name:12s} T={T} {str(dtype)[6:]} gated={gated}: " +
          " ".join(f"{k_}={v_:.1e}" for k_, v_ in errs.items()) + ("" if finite else " NON-FINITE"))
    return {"name": name, "T": T, "dtype": str(dtype), "gated": gated, "finite": finite, **errs}


def time_pair(fn, q, k, v, log_g, rep):
    """(forward ms, forward+backward ms)."""
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([log_g.requires_grad_()] if log_g is not None else [])
    with torch.no_grad():
        fwd = bench(lambda: fn(q, k, v, log_g), rep)
    out = fn(q, k, v, log_g)
    do = torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v, log_g), leaves, do)
    return fwd, bench(fwd_bwd, rep)


def kernel_info(launches: dict | None = None) -> dict:
    """Registers, spills and shared memory of the last compiled launch of each kernel (``launches``: a kernel
    module's ``LAUNCHES``, default ``chunk_triton``'s)."""
    if launches is None:
        from longctx.mechanisms.power.chunk_triton import LAUNCHES as launches
    info = {}
    for name, k in launches.items():
        try:
            k._init_handles()
            info[name] = {"regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared}
        except Exception as err:  # noqa: BLE001 - diagnostics only
            info[name] = repr(err)
    return info


def profile(fn, q, k, v, log_g, top: int = 12) -> dict:
    """Device milliseconds per kernel name over one forward+backward (torch.profiler), the ``top`` longest."""
    from torch.profiler import ProfilerActivity
    leaves = [t.requires_grad_() for t in (q, k, v, log_g)]
    out = fn(q, k, v, log_g)
    do = torch.randn_like(out)
    torch.autograd.grad(out, leaves, do)
    sync()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(fn(q, k, v, log_g), leaves, do)
        sync()
    times = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t:
            times[e.key[:60]] = t / 1000
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])


def matmul_ceiling() -> float:
    n = 8192 if DEVICE == "cuda" else 512
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b, 200)
    return 2 * n ** 3 / ms / 1e9


def decode_section(args, results, deadline):
    """One-token decode steps from a state standing for ``N`` tokens of context (random S, z and the recent
    tokens the schedule keeps at N), averaged over ``chunk`` steps (so one fold is included), batch 1: through
    the Triton decode kernel and through the eager PyTorch step, checked against each other."""
    H, d, c = args.heads, args.head_dim, args.chunk
    mech = build_mechanism("power", H, H, d, chunk_size=c, switch_over=1024).to(DEVICE)
    D = expanded_dim(d, 2)
    rows = []
    for N in [int(x) for x in args.decode_contexts.split(",")]:
        if time.time() > deadline:
            break
        R = recent_count(N, c, 1024)
        st = PowerState(k=torch.randn(1, H, R, d, device=DEVICE, dtype=torch.bfloat16),
                        v=torch.randn(1, H, R, d, device=DEVICE, dtype=torch.bfloat16),
                        g=-0.01 * torch.arange(R, 0, -1, device=DEVICE, dtype=torch.float32).expand(1, H, R).clone(),
                        S=torch.randn(1, H, D, d, device=DEVICE) * N ** 0.5, z=torch.rand(1, H, D, device=DEVICE) * N,
                        seen=N)
        xs = torch.randn(c, 3, 1, H, 1, d, device=DEVICE, dtype=torch.bfloat16)

        def steps(use_kernel):
            mech.use_kernel = use_kernel
            s, outs = st, []
            for i in range(c):
                o, s = mech.step(xs[i, 0], xs[i, 1], xs[i, 2], s)
                outs.append(o)
            return s, torch.cat(outs, 2)

        timed = {}
        with torch.no_grad():
            for name, use_kernel in (("kernel", None), ("eager", False)):
                steps(use_kernel)
                sync()
                t0 = time.perf_counter()
                end, out = steps(use_kernel)
                sync()
                timed[name] = ((time.perf_counter() - t0) * 1000 / c, out)
            mech.use_kernel = None
            ms, eager_ms = timed["kernel"][0], timed["eager"][0]
            kv = torch.randn(2, 1, H, N, d, device=DEVICE, dtype=torch.bfloat16)
            qd = torch.randn(1, H, 1, d, device=DEVICE, dtype=torch.bfloat16)
            full_ms = bench(lambda: F.scaled_dot_product_attention(qd, kv[0], kv[1]), 50)
        row = {"context": N, "power_step_ms": ms, "power_step_eager_ms": eager_ms,
               "kernel_vs_eager_rel_err": rel(timed["kernel"][1], timed["eager"][1]),
               "power_state_bytes": mech.state_bytes(N, 1, torch.bfloat16),
               "power_state_bytes_measured_after": tensor_bytes(end), "recent_tokens": R,
               "full_attention_sdpa_ms": full_ms, "kv_cache_bytes": 2 * H * N * d * 2}
        rows.append(row)
        log(f"decode N={N}: power {ms:.3f} ms/token (eager {eager_ms:.3f}, rel diff "
            f"{row['kernel_vs_eager_rel_err']:.1e}), state {row['power_state_bytes'] / 2**20:.2f} MiB | "
              f"full-attention SDPA {full_ms:.3f} ms, KV {row['kv_cache_bytes'] / 2**20:.0f} MiB")
        del kv
    results["decode"] = {"batch": 1, "heads": H, "head_dim": d, "deg": 2, "chunk_size": c, "switch_over": 1024,
                         "gate": "decay", "kv_dtype": "bf16", "rows": rows}


def main() -> None:
    global DEVICE
    args = parse()
    DEVICE = args.device
    start = time.time()
    deadline = start + args.time_budget
    out_path = Path(args.out) / "power_retention.json"
    H, d, c = args.heads, args.head_dim, args.chunk
    device_name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (dry run)"
    results = {"device": device_name, "torch": torch.__version__, "command": "see module docstring",
               "shapes": {"tokens_per_step": args.tokens, "heads": H, "head_dim": d, "deg": 2, "chunk": c,
                          "gated": True, "dtype": "bf16"},
               "flops": "power fwd = B*H*T*(4*D*e + c*(d+e)), D=2080; fwd+bwd = 3x. SDPA fwd = 2*B*H*T^2*d "
                        "(causal); fwd+bwd = 3.5x", "checks": [], "variants": [], "rows": []}
    import triton
    results["triton"] = triton.__version__
    save = lambda: atomic_write_json(out_path, results)  # noqa: E731
    results["matmul_tflops"] = matmul_ceiling()
    log(f"{device_name}: bf16 matmul ceiling {results['matmul_tflops']:.0f} TFLOP/s")

    variants = {n: VARIANTS[n] for n in args.variants.split(",")}
    have_retention = not args.no_retention
    if have_retention:
        try:
            retention_fn()
        except Exception as err:  # noqa: BLE001 - recorded, the rest still runs
            have_retention = False
            results["retention_error"] = repr(err)
            print("retention unavailable:", repr(err), flush=True)

    # correctness first
    for name, cfg in variants.items():
        for gated, dtype in [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float16)]:
            try:
                results["checks"].append(check(lambda q, k, v, g, cfg=cfg: run_ours(q, k, v, g, c, cfg), name,
                                               2, H, args.check_seq + 77, d, c, dtype, gated, seed=len(results["checks"])))
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                results["checks"].append({"name": name, "error": repr(err)})
            if name != next(iter(variants)) or args.quick_checks:
                break  # other variants: one gated bf16 check
    if all("error" in r for r in results["checks"]):
        save()
        raise SystemExit("every check of our kernel failed: nothing to time (see the tracebacks above)")
    try:
        q, k, v, lg = make_inputs(2, H, args.check_seq // 2, d, torch.bfloat16, True, 99)
        k, v, lg = k[:, ::4].contiguous(), v[:, ::4].contiguous(), lg[:, ::4].contiguous()
        leaves = [t.requires_grad_() for t in (q, k, v, lg)]
        out = run_ours(q, k, v, lg, c, variants[next(iter(variants))])
        ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
        ref = power_retention_chunk(*ref_leaves, 2, c)
        do = torch.randn_like(out)
        errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(torch.autograd.grad(out, leaves, do),
                                                             torch.autograd.grad(ref, ref_leaves, do.float()))]
        results["checks"].append({"name": f"gqa_{H}:{k.shape[1]}", "T": args.check_seq // 2, "errors": errs})
        log(f"check GQA {H}:{k.shape[1]} T={args.check_seq // 2} bf16 gated (o dq dk dv dlog_g): " + " ".join(f"{x:.1e}" for x in errs))
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        results["checks"].append({"name": "gqa_8:2", "error": repr(err)})
    if have_retention:
        try:
            results["checks"].append(check(lambda q, k, v, g: run_retention(q, k, v, g, c), "retention",
                                           2, H, args.check_seq, d, c, torch.bfloat16, True, seed=7, retention_layout=True))
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            results["checks"].append({"name": "retention", "error": repr(err)})
    save()

    # choose the kernel configuration and our chunk size
    chunks = [int(x) for x in args.chunks.split(",")]
    candidates = [(name, oc) for oc in chunks for name in variants]
    (best, oc), best_ms = candidates[0], math.inf
    if len(candidates) > 1:
        for name, ch in candidates:
            cfg, total = variants[name], 0.0
            for T in [int(x) for x in args.variant_seqs.split(",")]:
                B = args.tokens // T
                try:
                    f, fb = time_pair(lambda q, k, v, g, cfg=cfg, ch=ch: run_ours(q, k, v, g, ch, cfg),
                                      *make_inputs(B, H, T, d, torch.bfloat16), args.rep)
                except Exception as err:  # noqa: BLE001
                    traceback.print_exc()
                    results["variants"].append({"name": name, "chunk": ch, "T": T, "error": repr(err)})
                    total = math.inf
                    continue
                total += fb
                results["variants"].append({"name": name, "chunk": ch, "T": T, "fwd_ms": f, "fwd_bwd_ms": fb})
                log(f"variant {name:10s} chunk {ch:4d} T={T:6d}: fwd {f:7.2f} ms  fwd+bwd {fb:7.2f} ms")
            if total < best_ms:
                (best, oc), best_ms = (name, ch), total
        save()
    results["kernel_config"] = {"name": best, "chunk": oc, **variants[best].__dict__}
    log(f"kernel configuration: {best}, chunk {oc}")
    if DEVICE == "cuda":
        results["kernel_info"] = kernel_info()
        log(f"kernel resources (last launches): {results['kernel_info']}")
        results["profile"] = {}
        for T in [int(x) for x in args.profile_seqs.split(",")]:
            try:
                prof = profile(lambda q, k, v, g: run_ours(q, k, v, g, oc, variants[best]),
                               *make_inputs(args.tokens // T, H, T, d, torch.bfloat16))
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                prof = {"error": repr(err)}
            results["profile"][str(T)] = prof
            log(f"profile T={T} (ms per fwd+bwd): " + ", ".join(f"{k_}={v_:.2f}" for k_, v_ in prof.items()
                                                            if isinstance(v_, float)))
        save()

    # the table
    cfg = variants[best]
    for T in [int(x) for x in args.seqs.split(",")]:
        if time.time() > deadline:
            log(f"time budget reached before T={T}")
            break
        B = args.tokens // T
        row = {"T": T, "batch": B}
        ins = make_inputs(B, H, T, d, torch.bfloat16)
        for label, fn in [("longctx", lambda q, k, v, g: run_ours(q, k, v, g, oc, cfg)),
                          ("sdpa", None), ("retention", lambda q, k, v, g: run_retention(q, k, v, g, c))]:
            if label == "retention" and not have_retention:
                continue
            try:
                if label == "sdpa":
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        f, fb = time_pair(lambda q, k, v, g: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                          *ins[:3], None, args.rep)
                elif label == "retention":
                    f, fb = time_pair(fn, *to_retention_layout(*ins), args.rep)
                else:
                    f, fb = time_pair(fn, *ins, args.rep)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                row[f"{label}_error"] = repr(err)
                continue
            flops = sdpa_flops(B, H, T, d) if label == "sdpa" else power_flops(B, H, T, d, oc if label == "longctx" else c)
            mult = 3.5 if label == "sdpa" else 3.0
            row.update({f"{label}_fwd_ms": f, f"{label}_fwd_bwd_ms": fb, f"{label}_fwd_tflops": flops / f / 1e9,
                        f"{label}_fwd_bwd_tflops": mult * flops / fb / 1e9})
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        results["rows"].append(row)
        save()
        log("T={T:6d} B={batch:3d} ".format(**row) + "  ".join(
            f"{lab}: {row.get(f'{lab}_fwd_ms', float('nan')):7.2f} / {row.get(f'{lab}_fwd_bwd_ms', float('nan')):7.2f} ms"
            for lab in ("longctx", "sdpa", "retention")))
        del ins

    if time.time() < deadline:
        try:
            decode_section(args, results, deadline)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            results["decode_error"] = repr(err)
    results["wall_s"] = time.time() - start
    save()

    print("\n| T | batch | longctx fwd ms | longctx fwd+bwd ms | longctx fwd TFLOP/s | SDPA fwd ms | SDPA fwd+bwd ms"
          " | retention fwd ms | retention fwd+bwd ms | fwd+bwd speed-up vs retention | vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        def g_(key):
            return r.get(key, float("nan"))
        print(f"| {r['T']} | {r['batch']} | {g_('longctx_fwd_ms'):.2f} | {g_('longctx_fwd_bwd_ms'):.2f} | "
              f"{g_('longctx_fwd_tflops'):.0f} | {g_('sdpa_fwd_ms'):.2f} | {g_('sdpa_fwd_bwd_ms'):.2f} | "
              f"{g_('retention_fwd_ms'):.2f} | {g_('retention_fwd_bwd_ms'):.2f} | "
              f"{g_('retention_fwd_bwd_ms') / g_('longctx_fwd_bwd_ms'):.2f} | "
              f"{g_('sdpa_fwd_bwd_ms') / g_('longctx_fwd_bwd_ms'):.2f} |")
    print(f"matmul ceiling {results['matmul_tflops']:.0f} TFLOP/s; wall {results['wall_s']:.0f} s; "
          f"json {out_path}")
    print(json.dumps(results["kernel_config"]))


if __name__ == "__main__":
    main()
