"""Ring attention on several GPUs: speed against single-GPU SDPA in the same job, zigzag vs contiguous,
peak memory, exactness against a float32 single-GPU reference, and PyTorch's own context parallel.

Run with torchrun, one process per GPU (keep NVLink multicast off on the lent machines):

    NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH=. torchrun --nproc-per-node 4 \
        benchmarks/ring_attention.py --out benchmarks/results

CPU dry run of every code path with tiny sizes (gloo):

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/ring_attention.py --device cpu --seqs 256,512 \
        --heads 4 --kv-heads 2 --head-dim 64 --check-seq 64 --out /tmp/ring_bench

Definitions. Causal forward flops of the whole sequence: ``4 B Hq T^2 D / 2``; the ring's per-GPU share is
that over N; forward+backward counts the backward as 2.5 forwards (3.5x). Ring efficiency = per-GPU
TFLOP/s of the ring / TFLOP/s of single-GPU causal ``scaled_dot_product_attention`` (default backend,
same GQA shapes) at the per-GPU length T/N, both measured in this job. Times: CUDA events, median over
repetitions after a warm-up, the slowest rank's median. Writes ``ring_attention_{N}gpu.json`` atomically
after every configuration, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.atomic import atomic_write_json
from longctx.attention import attention_flops
from longctx.distributed import ring_attention, shard
from longctx.distributed.ring import kernel_runs, pick_kernel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}" if abs(x) < 10 else f"{x:.0f}"
    return str(x)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seqs", default="65536,131072,262144,524288,1048576", help="total sequence lengths")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--kernels", default="auto,flash", help="ring block kernels to time (zigzag)")
    ap.add_argument("--second-kernel-max", type=int, default=262144, help="longest T for kernels after the first")
    ap.add_argument("--contiguous-max", type=int, default=262144, help="longest T timed with the contiguous layout")
    ap.add_argument("--cp-max", type=int, default=262144, help="longest T for torch context_parallel (0: off)")
    ap.add_argument("--headline-max", type=int, default=524288,
                    help="zigzag runs up to this T come first; longer ones after the comparisons, without warm-up")
    ap.add_argument("--compare-max", type=int, default=262144,
                    help="comparisons (contiguous, other kernels) up to this T come before the longest zigzag runs")
    ap.add_argument("--check-seq", type=int, default=16384, help="total T of the exactness check")
    ap.add_argument("--time-budget", type=float, default=400.0, help="seconds; later configurations are skipped")
    ap.add_argument("--out", default="benchmarks/results")
    return ap.parse_args()


class Bench:
    def __init__(self, args):
        self.args = args
        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self.dev = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
            else torch.device("cpu")
        self.dtype = DTYPES[args.dtype]
        self.t0 = time.monotonic()
        self.mesh = None
        self.path = Path(args.out) / f"ring_attention_{self.n}gpu.json"
        self.res = {"config": vars(args), "world_size": self.n, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(self.dev) if args.device == "cuda" else "cpu",
                    "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
                    "checks": [], "sdpa": [], "ring": [], "context_parallel": [], "sdpa_backends": [],
                    "skipped": []}

    # --- helpers ------------------------------------------------------------------------------------------
    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def reduce(self, x: float, op) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.dev)
        dist.all_reduce(t, op=op)
        return t.item()

    def elapsed(self) -> float:
        return self.reduce(time.monotonic() - self.t0, dist.ReduceOp.MAX)

    def time_ms(self, fn, reps: int, warmup: int = 1) -> float:
        """Median ms of ``fn`` on this rank (after ``warmup`` calls), every repetition started together."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            dist.barrier()
            self.sync()
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)

    def reset_peak(self):
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return self.reduce(torch.cuda.max_memory_allocated(self.dev) / 2**30, dist.ReduceOp.MAX)

    def save(self):
        if self.rank == 0:
            self.res["elapsed_s"] = time.monotonic() - self.t0
            atomic_write_json(self.path, self.res)

    def log(self, msg: str):
        if self.rank == 0:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def over_budget(self, what: str, predicted_s: float = 0.0) -> bool:
        if self.elapsed() + predicted_s > self.args.time_budget:
            self.res["skipped"].append(what)
            self.log(f"skip {what} (time budget)")
            return True
        return False

    def reps(self, T: int) -> int:
        return 5 if T <= 131072 else 3 if T <= 262144 else 2 if T <= 524288 else 1

    def warmup(self, T: int) -> int:
        """Past --headline-max one call takes tens of seconds and the kernels are warm from shorter runs."""
        return 1 if T <= self.args.headline_max else 0

    def calls(self, T: int) -> int:
        return self.reps(T) + self.warmup(T)

    def randn(self, *shape, dtype=None, grad=False):
        # [B, T, H, D] memory seen as [B, H, T, D], as a model's projections produce it
        B, H, T, D = shape
        x = torch.randn(B, T, H, D, device=self.dev, dtype=dtype or self.dtype).transpose(1, 2)
        return x.requires_grad_(grad)

    def kernel_works(self, kernel: str, dtype: torch.dtype) -> str | None:
        """Probe ``kernel`` on one local block (no communication), agreed over the ranks, so that a kernel
        this machine lacks fails before any ring transfer is posted. None, or why not."""
        if kernel == "auto":
            return None
        a = self.args
        ok = kernel_runs(kernel, self.dev, dtype, a.heads, a.kv_heads, a.head_dim)
        if self.reduce(float(not ok), dist.ReduceOp.MAX) == 0.0:
            return None
        return f"kernel {kernel!r} does not run {dtype} blocks of this geometry here (probe failed)"

    # --- exactness -----------------------------------------------------------------------------------------
    def check(self):
        """bf16 / fp16 / fp32 ring (each layout and kernel) vs a float32 single-GPU reference on the whole
        sequence: relative errors of the output and the three gradients, worst rank."""
        a, T = self.args, self.args.check_seq
        g = torch.Generator(device=self.dev).manual_seed(1234)
        q, k, v, dout = (torch.randn(a.batch, h, T, a.head_dim, device=self.dev, generator=g)
                         for h in (a.heads, a.kv_heads, a.kv_heads, a.heads))
        cuda = self.dev.type == "cuda"
        plans = {True: [("bf16", "auto"), ("bf16", "flash"), ("fp16", "auto"), ("fp32", "auto")] if cuda
                 else [("bf16", "auto"), ("fp32", "auto")],
                 False: [("bf16", "auto")]}
        for causal, variants in plans.items():
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            rep = a.heads // a.kv_heads  # repeated KV: the fused float32 kernels take equal head counts
            ref = F.scaled_dot_product_attention(ref_in[0], ref_in[1].repeat_interleave(rep, 1),
                                                 ref_in[2].repeat_interleave(rep, 1), is_causal=causal)
            ref_grads = torch.autograd.grad(ref, ref_in, dout)
            for dname, kernel in variants:
                for layout in ("zigzag", "contiguous") if causal else ("zigzag",):
                    row = {"dtype": dname, "kernel": kernel, "layout": layout, "causal": causal, "T": T,
                           "kernel_used": pick_kernel(kernel, q.to(DTYPES[dname]), a.kv_heads)}
                    probe = self.kernel_works(kernel, DTYPES[dname])
                    if probe is not None:
                        row["error"] = probe
                        self.res["checks"].append(row)
                        self.log(f"check {row}")
                        continue
                    try:
                        loc = [shard(t, self.n, self.rank, layout).to(DTYPES[dname]).requires_grad_()
                               for t in (q, k, v)]
                        out = ring_attention(*loc, causal=causal, layout=layout, kernel=kernel)
                        grads = torch.autograd.grad(out, loc,
                                                    shard(dout, self.n, self.rank, layout).to(DTYPES[dname]))
                        for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                            r = shard(r, self.n, self.rank, layout)
                            e = ((x.double() - r.double()).norm() / r.double().norm()).item()
                            row[name] = self.reduce(e if e == e else float("inf"), dist.ReduceOp.MAX)
                    except Exception as e:  # noqa: BLE001 - recorded; a kernel missing here is a result
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    self.res["checks"].append(row)
                    self.log(f"check {row}")
            del ref_in, ref, ref_grads
        self.save()

    # --- speed -----------------------------------------------------------------------------------------------
    def sdpa(self, L: int):
        """Single-GPU causal SDPA at the per-GPU length, on every GPU at once; the fastest GPU's median."""
        a = self.args
        q = self.randn(a.batch, a.heads, L, a.head_dim, grad=True)
        k, v = (self.randn(a.batch, a.kv_heads, L, a.head_dim, grad=True) for _ in range(2))
        dout = self.randn(a.batch, a.heads, L, a.head_dim)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)

        T = L * self.n
        reps = self.reps(T)
        t_f = self.reduce(self.time_ms(fwd, reps, self.warmup(T)), dist.ReduceOp.MIN)
        t_fb = self.reduce(self.time_ms(fwd_bwd, reps, self.warmup(T)), dist.ReduceOp.MIN)
        fl = attention_flops(a.batch, a.heads, L, L, a.head_dim, True)
        row = {"L": L, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": fl / t_f / 1e9,
               "fwd_bwd_tflops": 3.5 * fl / t_fb / 1e9}
        self.res["sdpa"].append(row)
        self.log(f"sdpa {row}")
        self.save()
        return row

    def ring(self, T: int, layout: str, kernel: str, base: dict | None):
        a = self.args
        L = T // self.n
        self.reset_peak()
        q = self.randn(a.batch, a.heads, L, a.head_dim, grad=True)
        k, v = (self.randn(a.batch, a.kv_heads, L, a.head_dim, grad=True) for _ in range(2))
        dout = self.randn(a.batch, a.heads, L, a.head_dim)

        def fwd():
            with torch.no_grad():
                ring_attention(q, k, v, layout=layout, kernel=kernel)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            ring_attention(q, k, v, layout=layout, kernel=kernel).backward(dout)

        reps = self.reps(T)
        t_fb = self.reduce(self.time_ms(fwd_bwd, reps, self.warmup(T)), dist.ReduceOp.MAX)
        peak = self.peak_gib()
        t_f = self.reduce(self.time_ms(fwd, reps, self.warmup(T)), dist.ReduceOp.MAX)
        fl = attention_flops(a.batch, a.heads, T, T, a.head_dim, True) / self.n
        row = {"T": T, "per_gpu": L, "layout": layout, "kernel": kernel,
               "kernel_used": pick_kernel(kernel, q, a.kv_heads), "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
               "fwd_tflops_per_gpu": fl / t_f / 1e9, "fwd_bwd_tflops_per_gpu": 3.5 * fl / t_fb / 1e9,
               "peak_gib": peak}
        if base is not None:
            row["eff_fwd"] = row["fwd_tflops_per_gpu"] / base["fwd_tflops"]
            row["eff_fwd_bwd"] = row["fwd_bwd_tflops_per_gpu"] / base["fwd_bwd_tflops"]
        self.res["ring"].append(row)
        self.log(f"ring {row}")
        self.save()
        del q, k, v, dout
        return row

    def context_parallel(self, T: int, base: dict | None):
        """PyTorch's context parallel around SDPA (default options), same shapes; if it refuses GQA, with the
        KV heads repeated to the query heads (recorded as ``kv_heads``); errors recorded."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        a = self.args
        for kv_heads in dict.fromkeys((a.kv_heads, a.heads)):
            row = {"T": T, "kv_heads": kv_heads}
            try:
                if self.mesh is None:
                    self.mesh = init_device_mesh(self.dev.type, (self.n,))
                q = self.randn(a.batch, a.heads, T, a.head_dim).contiguous()
                k, v = (self.randn(a.batch, kv_heads, T, a.head_dim).contiguous() for _ in range(2))
                dout = self.randn(a.batch, a.heads, T, a.head_dim).contiguous()
                gqa = kv_heads != a.heads
                self.reset_peak()
                with context_parallel(self.mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2],
                                      no_restore_buffers={q, k, v, dout}):
                    for t in (q, k, v):
                        t.requires_grad_()

                    def fwd():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

                    def fwd_bwd():
                        q.grad = k.grad = v.grad = None
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).backward(dout)

                    reps = self.reps(T)
                    t_fb = self.reduce(self.time_ms(fwd_bwd, reps, self.warmup(T)), dist.ReduceOp.MAX)
                    t_f = self.reduce(self.time_ms(fwd, reps, self.warmup(T)), dist.ReduceOp.MAX)
                fl = attention_flops(a.batch, a.heads, T, T, a.head_dim, True) / self.n
                row.update({"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops_per_gpu": fl / t_f / 1e9,
                            "fwd_bwd_tflops_per_gpu": 3.5 * fl / t_fb / 1e9, "peak_gib": self.peak_gib()})
                if base is not None:
                    row["eff_fwd"] = row["fwd_tflops_per_gpu"] / base["fwd_tflops"]
                    row["eff_fwd_bwd"] = row["fwd_bwd_tflops_per_gpu"] / base["fwd_bwd_tflops"]
            except Exception as e:  # noqa: BLE001 - the comparison is optional; its failure is reported
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            self.res["context_parallel"].append(row)
            self.log(f"context_parallel {row}")
            self.save()
            if "error" not in row:
                return

    def sdpa_backends(self, L: int):
        """Which single-GPU SDPA backend is fastest at this length (fwd and fwd+bwd), for the record."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        a = self.args
        q = self.randn(a.batch, a.heads, L, a.head_dim, grad=True)
        k, v = (self.randn(a.batch, a.kv_heads, L, a.head_dim, grad=True) for _ in range(2))
        dout = self.randn(a.batch, a.heads, L, a.head_dim)
        fl = attention_flops(a.batch, a.heads, L, L, a.head_dim, True)
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            row = {"L": L, "backend": name}
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    def fwd():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

                    def fwd_bwd():
                        q.grad = k.grad = v.grad = None
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)
                    t_f, t_fb = self.time_ms(fwd, 3), self.time_ms(fwd_bwd, 3)
                row.update({"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": fl / t_f / 1e9,
                            "fwd_bwd_tflops": 3.5 * fl / t_fb / 1e9})
            except Exception as e:  # noqa: BLE001 - a backend that refuses these shapes is a result
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            self.res["sdpa_backends"].append(row)
            self.log(f"sdpa backend {row}")
        self.save()

    # --- the plan ------------------------------------------------------------------------------------------
    def run(self):
        """Exactness first, then zigzag up to --headline-max tokens, the comparisons up to --compare-max, the
        longest zigzag runs, then the longer comparisons, while the time budget lasts. Each task's time is
        predicted from the zigzag runs (quadratic in T) and a task that would overrun is skipped."""
        a = self.args
        seqs = [int(s) for s in a.seqs.split(",")]
        for T in seqs:
            if T % (2 * self.n):
                raise ValueError(f"--seqs: {T} is not a multiple of 2 * world_size = {2 * self.n}")
        kernels = a.kernels.split(",") if self.dev.type == "cuda" else ["auto"]
        self.check()
        failed = {k for k in kernels[1:] if self.kernel_works(k, self.dtype) is not None}
        mid, long = a.compare_max, a.headline_max
        tasks = [("zigzag", kernels[0], T, 1.0) for T in seqs if T <= long]
        tasks += [("contiguous", kernels[0], T, 1.8) for T in seqs if T <= min(mid, a.contiguous_max)]
        tasks += [("zigzag", k, T, 1.1) for k in kernels[1:] for T in seqs if T <= min(mid, a.second_kernel_max)]
        tasks += [("torch CP", "sdpa", T, 2.0) for T in seqs if T <= a.cp_max]
        tasks += [("zigzag", kernels[0], T, 1.0) for T in seqs if T > long]
        tasks += [("contiguous", kernels[0], T, 1.8) for T in seqs if mid < T <= a.contiguous_max]
        tasks += [("zigzag", k, T, 1.1) for k in kernels[1:] for T in seqs if mid < T <= a.second_kernel_max]
        bases, zig_s = {}, {}            # zig_s[T]: seconds of one (sdpa + zigzag) measurement at T
        for layout, kernel, T, factor in tasks:
            headline = layout == "zigzag" and kernel == kernels[0]
            if not headline and (T not in bases or kernel in failed):
                continue
            if headline:
                done = [t for t in zig_s if t < T]
                pred = 1.3 * zig_s[max(done)] * (T / max(done)) ** 2 * self.calls(T) / self.calls(max(done)) \
                    if done else 0.0
            else:
                pred = factor * zig_s[T]
            if self.over_budget(f"T={T} {layout} {kernel}", pred):
                continue
            t = time.monotonic()
            if headline:
                bases[T] = self.sdpa(T // self.n)
                self.ring(T, layout, kernel, bases[T])
                zig_s[T] = time.monotonic() - t
            elif layout == "torch CP":
                self.context_parallel(T, bases[T])
            else:
                try:
                    self.ring(T, layout, kernel, bases[T])
                except Exception as e:  # noqa: BLE001 - a kernel this machine lacks is a result, not a crash
                    failed.add(kernel)
                    self.res["ring"].append({"T": T, "layout": layout, "kernel": kernel,
                                             "error": f"{type(e).__name__}: {e}"[:300]})
                    self.save()
        if self.dev.type == "cuda":
            for T in seqs[:2]:
                if not self.over_budget(f"sdpa backends L={T // self.n}", 10.0):
                    self.sdpa_backends(T // self.n)
        self.save()
        self.table()

    def table(self):
        if self.rank != 0:
            return
        r = self.res
        print(f"\n{r['device']} x{self.n}, torch {r['torch']}, cuDNN {r['cudnn']}, {self.args.dtype}, causal, "
              f"B={self.args.batch}, {self.args.heads}/{self.args.kv_heads} heads, d={self.args.head_dim}")
        print("| total T | layout | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s/GPU | fwd+bwd TFLOP/s/GPU | "
              "SDPA fwd TFLOP/s (T/N) | SDPA fwd+bwd TFLOP/s | eff fwd | eff fwd+bwd | peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = {s["L"]: s for s in r["sdpa"]}
        rows = [x for x in r["ring"] if "error" not in x] + \
            [dict(x, layout="torch CP", kernel=f"sdpa, {x['kv_heads']} KV heads", per_gpu=x["T"] // self.n)
             for x in r["context_parallel"] if "error" not in x]
        for x in sorted(rows, key=lambda x: (x["layout"] != "zigzag", x["layout"], x["kernel"], x["T"])):
            b = base.get(x["per_gpu"], {})
            peak = f"{x['peak_gib']:.1f}" if x.get("peak_gib") is not None else "-"
            cells = [x["T"], x["layout"], x.get("kernel_used", x["kernel"]), x["fwd_ms"], x["fwd_bwd_ms"], x["fwd_tflops_per_gpu"],
                     x["fwd_bwd_tflops_per_gpu"], b.get("fwd_tflops"), b.get("fwd_bwd_tflops"), x.get("eff_fwd"),
                     x.get("eff_fwd_bwd"), peak]
            print("| " + " | ".join(fmt(c) for c in cells) + " |")
        print("\nexactness vs float32 single-GPU reference (relative error, worst rank):")
        for c in r["checks"]:
            print("  ", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in c.items()})
        for e in r["ring"] + r["context_parallel"]:
            if "error" in e:
                print("   error:", e)
        if r["skipped"]:
            print("skipped:", r["skipped"])


def main():
    args = parse()
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.device == "cuda":
        dist.init_process_group(backend, timeout=timedelta(seconds=120),
                                device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    else:
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        Bench(args).run()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
