"""Power retention kernel configurations side by side in one GPU job, beside an earlier copy of the kernel file
(the baseline): exactness, forward and forward+backward time, per-kernel device time, registers and spills; then
the chosen configuration against the baseline and flash over T, at d = 128, and at the GPU bench's small shape.

    git show <commit>:longctx/mechanisms/power/chunk_triton.py > /tmp/baseline_chunk_triton.py
    PYTHONPATH=. python3 benchmarks/power_variants.py --baseline /tmp/baseline_chunk_triton.py --out <dir>

CPU dry run of every path at toy sizes (interpreter; wall-clock times, no profile, flash refused on the CPU):

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/power_variants.py --device cpu --baseline /tmp/b.py \
        --out /tmp/pv --tokens 256 --seqs 128,256 --variant-seqs 256 --chunk 64 --chunks 64,128 --head-dim 16 \
        --variants default,r64 --sections checks,variants,sweep

Shapes (as ``power_retention.py``): 128K tokens per step, batch = 128K / T, 8 heads, d = e = 64, deg 2, gated,
bf16, chunk 512. Configurations are compiled first in parallel processes (Triton's cache is shared), so the
timed process only loads them. Sections: ``warm`` (compile), ``checks`` (exactness), ``variants`` (each
configuration at ``--variant-seqs`` and ``--chunks``; the fastest goes on), ``profile`` (per-kernel device time,
registers), ``sweep`` (over T, beside flash), ``d128``, ``small`` (the GPU bench's shape, with its device time),
``train`` (the GPU bench's model trained on random tokens) and ``host`` (a call's time at a size with almost no
device work, and where it goes). Results go to ``<out>/power_variants.json``
(atomically) after every section.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import power_retention as pr  # noqa: E402 - its timing, checking and profiling helpers (pr.DEVICE set in main)
from power_retention import kernel_info, profile, rel, time_pair  # noqa: E402

from longctx.atomic import atomic_write_json  # noqa: E402
from longctx.mechanisms.power import power_retention_chunk  # noqa: E402
from longctx.mechanisms.power.chunk_triton import LAUNCHES, KernelConfig, power_retention_triton  # noqa: E402

# today's defaults and one change each (earlier runs' configurations are written out in their JSON)
VARIANTS = {
    "default": KernelConfig(),                    # cuda="auto": the CUDA deltas where they sum the states
    "triton": KernelConfig(cuda=()),              # every kernel Triton's (the default before v10)
    "r32": KernelConfig(state_rows=32),
    "st2": KernelConfig(stages_state=2),
    "cst2": KernelConfig(stages_chunk=2),
    "cst4": KernelConfig(stages_chunk=4),
    "wc8": KernelConfig(warps_chunk=8),           # the backward's in-chunk kernels on 8 warps
    "wo8": KernelConfig(warps_out=8),             # the forward's
    "w8": KernelConfig(warps_chunk=8, warps_out=8),
    "b32": KernelConfig(block=32),                # 32-row in-chunk blocks
    "cuda_d": KernelConfig(cuda=("deltas",)),     # the hand-written Hopper kernels (hopper.py)
    "cuda_o": KernelConfig(cuda=("out",)),
    "cuda": KernelConfig(cuda=("deltas", "out")),
    "cuda_dq": KernelConfig(cuda=("deltas", "dq")),
    "cuda_dqo": KernelConfig(cuda=("deltas", "dq", "out_state")),
    "cuda_dkv": KernelConfig(cuda=("deltas", "dq", "dkv")),
    "cuda_all_b128": KernelConfig(block=128, warps_chunk=8, warps_out=8,   # the default's kernels, 128-row in-chunk
                                  cuda=("deltas", "dq", "dkv", "out_state")),   # blocks (notes v16: slower)
}
CHUNK = 512
DEVICE = "cuda"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def load_baseline(path: str):
    """The ``power_retention_triton`` of an earlier kernel file, imported inside ``longctx.mechanisms.power`` (its
    relative imports resolve) under another name, with its own ``LAUNCHES``."""
    spec = importlib.util.spec_from_file_location("longctx.mechanisms.power._baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_inputs(B, Hq, Hkv, T, d, seed=0, gate_shift=0.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, Hq, T, d, device=DEVICE, generator=g).bfloat16()
    k, v = (torch.randn(B, Hkv, T, d, device=DEVICE, generator=g).bfloat16() for _ in range(2))
    log_g = F.logsigmoid(gate_shift + torch.randn(B, Hkv, T, device=DEVICE, generator=g))
    return q, k, v, log_g


def check(fn, T, d, Hq=8, Hkv=8, seed=1):
    """Errors of o, dq, dk, dv, d log_g against the float32 PyTorch chunked form, and whether two runs on the
    same inputs agree bitwise."""
    ins = [t.requires_grad_() for t in make_inputs(2, Hq, Hkv, T, d, seed)]
    out = fn(*ins)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, do)
    out2 = fn(*ins)
    grads2 = torch.autograd.grad(out2, ins, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in ins]
    ref = power_retention_chunk(*ref_leaves, 2, 128)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    same = torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    return {"errors_o_dq_dk_dv_dlogg": errs, "bitwise_repeatable": same,
            "finite": all(bool(torch.isfinite(x).all()) for x in (out, *grads))}


def warm(jobs, timeout) -> dict:
    """Compile every (configuration, chunk, d, heads) of ``jobs`` in parallel processes (one tiny forward and
    backward each); returns ``{job: "ok" | error}``."""
    def one(job):
        cmd = [sys.executable, __file__, "--compile-only", json.dumps(job)] + sys.argv[1:]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            return "ok" if run.returncode == 0 else run.stderr[-800:]
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s (a hang?)"
    with ThreadPoolExecutor(12) as pool:
        return dict(zip(map(json.dumps, jobs), pool.map(one, jobs)))


def compile_only(job, baseline):
    name, c, d, hq, hkv = job
    fn = runner(name, baseline, c)
    ins = [t.requires_grad_() for t in make_inputs(2, hq, hkv, 3 * c + 7, d)]   # B * hkv: the scan's band
    torch.autograd.grad(fn(*ins).sum(), ins)
    torch.cuda.synchronize()


CONFIGS: dict = dict(VARIANTS)


def tiny_call():
    """Inputs where the device work is a few microseconds (batch 1, 1 head, T = 64, d = 32): ``(q, k, v, log_g)``
    as autograd leaves, and an output gradient."""
    leaves = [t.requires_grad_() for t in make_inputs(1, 1, 1, 64, 32)]
    return leaves, torch.randn_like(leaves[0])


def host_ms(call, n=None, warmup=None) -> float:
    """Milliseconds a call of ``call`` takes, between device synchronisations around ``n`` calls (the host's time
    where the device work is small)."""
    n = n or (300 if DEVICE == "cuda" else 2)
    for _ in range(warmup if warmup is not None else (10 if DEVICE == "cuda" else 1)):
        call()
    pr.sync()
    t = time.perf_counter()
    for _ in range(n):
        call()
    pr.sync()
    return (time.perf_counter() - t) / n * 1e3


def host_costs(fn) -> dict:
    """Milliseconds a call of ``fn`` (forward; forward+backward) and of flash takes on ``tiny_call``'s inputs: the
    host's share of a small shape's time."""
    leaves, do = tiny_call()
    q, k, v, g = leaves
    calls = {"fwd": lambda: fn(q, k, v, g),
             "fwd_bwd": lambda: torch.autograd.grad(fn(q, k, v, g), leaves, do),
             "flash_fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "flash_fwd_bwd": lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                                          leaves[:3], do)}
    return {name + "_ms": host_ms(call) for name, call in calls.items()}


def host_breakdown(module, fn) -> dict:
    """Where a small call's host time goes, on ``tiny_call``'s inputs: microseconds of each Triton launch of one
    forward+backward replayed alone (``launch_us``; the device work of each is a few microseconds), and the
    forward+backward with the launches skipped (``glue_ms``: PyTorch operations, autograd, Python). ``module``:
    the kernel module ``fn`` runs (its ``_launch`` is patched)."""
    leaves, do = tiny_call()

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, do)
    recorded, launch = [], module._launch

    def record(name, kernel, grid, *args, **kw):
        recorded.append((name, kernel, grid, args, kw))
        launch(name, kernel, grid, *args, **kw)
    module._launch = record
    try:
        fwd_bwd()
    finally:
        module._launch = launch
    out = {"launch_us": {f"{i}:{name}": 1e3 * host_ms(functools.partial(kernel[grid], *args, **kw), warmup=0)
                         for i, (name, kernel, grid, args, kw) in enumerate(recorded)}}
    module._launch = lambda *a, **kw: None
    try:
        out["glue_ms"] = host_ms(fwd_bwd)
    finally:
        module._launch = launch
    out["launches_ms"] = sum(out["launch_us"].values()) / 1e3
    return out


def train_speed(baseline, steps=200, warmup=20) -> dict:
    """Training tokens/s of the GPU bench's text model (``longctx bench --preset gpu``: 4 layers, width 256, 8 / 4
    heads of 32, 512 tokens, batch 32, bf16, AdamW; its power layers run the kernel at chunk 32) on random tokens,
    ``steps`` timed after ``warmup``: power through today's kernel file and through the baseline's, full
    attention, in the order A B C B A (``{label: [tok/s, ...]}``: a drift of the host's speed shows as a spread).
    The bench itself (its corpus, 1000 steps, two seeds) is not run here."""
    from longctx.bench.presets import settings_for
    from longctx.bench.run import _model
    from longctx.bench.train import train
    from longctx.mechanisms.power import chunk_triton
    s = settings_for("gpu")
    today = chunk_triton.power_retention_triton
    out = {}
    runs = [("power", "power", today), ("power baseline", "power", baseline.power_retention_triton),
            ("full", "full", today)]
    for label, mech, kernel in runs + runs[-2::-1]:
        chunk_triton.power_retention_triton = kernel    # power_retention imports it from the module at each call
        try:
            model = _model(s, mech, torch.device(DEVICE), 0)

            def batch(g, vocab=model.config.vocab_size):
                x = torch.randint(0, vocab, (s.batch_size, s.block_size + 1), generator=g)
                return x[:, :-1], x[:, 1:]
            train(model, batch, warmup, s.lr, 0, progress=False)
            out.setdefault(label, []).append(train(model, batch, steps, s.lr, 1, progress=False)["tokens_per_s"])
        finally:
            chunk_triton.power_retention_triton = today
        log(f"train {label}: {out[label][-1]:,.0f} tok/s")
    return out


def runner(name, baseline, c):
    if name == "baseline":
        return lambda q, k, v, g: baseline.power_retention_triton(q, k, v, g, chunk_size=c)
    cfg = CONFIGS[name] if name in CONFIGS else KernelConfig(**json.loads(name))
    return lambda q, k, v, g: power_retention_triton(q, k, v, g, chunk_size=c, config=cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--baseline", required=True, help="an earlier chunk_triton.py to time beside")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="configurations to compare (VARIANTS' names)")
    ap.add_argument("--sections", default="warm,checks,variants,profile,sweep,d128,small,train,host")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later sections are skipped")
    ap.add_argument("--variant-seqs", default="4096,131072", help="T at which the configurations are compared")
    ap.add_argument("--chunk", type=int, default=CHUNK, help="chunk of the checks and the first --chunks")
    ap.add_argument("--chunks", default="512,1024", help="chunks at which the configurations are timed; the sweep "
                    "also tries chunk = T up to 2048 (the same function: the chunk only moves work)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--rep", type=int, default=150)
    ap.add_argument("--v4", default=None, help="a KernelConfig as JSON for the later sections (else the fastest)")
    ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    global DEVICE
    DEVICE, c0, d = args.device, args.chunk, args.head_dim
    pr.DEVICE = DEVICE
    vseqs = [int(x) for x in args.variant_seqs.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    baseline = load_baseline(args.baseline)
    if args.compile_only:
        compile_only(json.loads(args.compile_only), baseline)
        return
    import triton
    deadline = T0 + args.budget
    sections = args.sections.split(",")
    path = Path(args.out) / "power_variants.json"
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
           "shapes": {"tokens": args.tokens, "heads": 8, "head_dim": d, "chunk": c0, "dtype": "bf16",
                      "gated": True}, "variants": {n: c.__dict__ for n, c in VARIANTS.items()}}
    save = lambda: atomic_write_json(path, res)  # noqa: E731
    res["matmul_tflops"] = pr.matmul_ceiling()
    log(f"{res['device']}: matmul {res['matmul_tflops']:.0f} TFLOP/s")
    names = ["baseline", *args.variants.split(",")]
    if "warm" in sections:
        jobs = [[nm, c, d, 8, 8] for nm in names for c in chunks]
        jobs += [[nm, c, d, 8, 8] for nm in ("baseline", "default") for c in (1024, 2048) if c not in chunks]
        jobs += [[nm, c, 32, 8, 4] for nm in ("baseline", "default") for c in (32, 64, 128) if "small" in sections]
        jobs += [[nm, c, 128, 8, 8] for nm in ("baseline", "default") for c in (512, 1024) if "d128" in sections]
        res["warm"] = warm(jobs, timeout=240)
        log(f"warm: {sum(v == 'ok' for v in res['warm'].values())}/{len(jobs)} ok; "
            + "; ".join(f"{k}: {v[-300:]}" for k, v in res["warm"].items() if v != "ok"))
        bad = {json.loads(k)[0] for k, v in res["warm"].items() if v != "ok"}
        names = [nm for nm in names if nm not in bad]
        save()
    if "checks" in sections:
        res["checks"] = {}
        for nm in names:
            try:
                res["checks"][nm] = check(runner(nm, baseline, c0), 4 * c0 + 77, d)
            except Exception as err:  # noqa: BLE001 - recorded
                traceback.print_exc()
                res["checks"][nm] = {"error": repr(err)}
            log(f"check {nm}: {res['checks'][nm]}")
        save()
    times, best = {}, ("default", c0)
    if "variants" in sections:
        res["times"] = {}
        for nm in names:
            for c in chunks:
                times[nm, c] = 0.0
                for T in vseqs:
                    try:
                        f, fb = time_pair(runner(nm, baseline, c), *make_inputs(args.tokens // T, 8, 8, T, d),
                                          args.rep)
                    except Exception as err:  # noqa: BLE001
                        traceback.print_exc()
                        res["times"][f"{nm} c={c} T={T}"] = repr(err)
                        times[nm, c] = float("inf")
                        continue
                    times[nm, c] += fb
                    res["times"][f"{nm} c={c} T={T}"] = {"fwd_ms": f, "fwd_bwd_ms": fb}
                    log(f"{nm:10s} chunk {c:5d} T={T:6d}: fwd {f:6.2f}  fwd+bwd {fb:6.2f} ms")
                save()
        best = min((k for k in times if k[0] != "baseline"), key=times.get)
        res["best"] = {"name": best[0], "chunk": best[1], **CONFIGS[best[0]].__dict__}
        log(f"fastest: {best}")
        save()
        CONFIGS["v4"] = CONFIGS[best[0]]
    if args.v4:
        CONFIGS["v4"] = KernelConfig(**json.loads(args.v4))
    v4 = "v4" if "v4" in CONFIGS else "default"
    if "profile" in sections and DEVICE == "cuda":
        res["profile"], res["kernel_info"] = {}, {}
        for nm in dict.fromkeys((*names, v4)):      # every configuration at the first T and chunk, v4 at each T
            for T in (vseqs if nm == v4 else vseqs[:1]):
                key = f"{nm} T={T}" + (f" c={best[1]}" if nm == v4 else f" c={c0}")
                res["profile"][key] = profile(runner(nm, baseline, best[1] if nm == v4 else c0),
                                              *make_inputs(args.tokens // T, 8, 8, T, d))
                log(f"profile {key}: {res['profile'][key]}")
            res["kernel_info"][nm] = kernel_info(baseline.LAUNCHES if nm == "baseline" else LAUNCHES)
            log(f"kernel info {nm}: {res['kernel_info'][nm]}")
        save()

    def row(label, T, d, hq, hkv, B, c, gate_shift=0.0, v4_chunks=()):
        """Baseline at chunk ``c``, v4 at ``c`` and at each of ``v4_chunks`` (keys ``v4 c=...``), flash."""
        ins = make_inputs(B, hq, hkv, T, d, gate_shift=gate_shift)
        r = {"T": T, "batch": B, "d": d, "heads": [hq, hkv], "chunk": c}
        for nm in ("baseline", v4, *(f"{v4} c={x}" for x in v4_chunks), "flash"):
            try:
                if nm == "flash":
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    rep_ = hq // hkv
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        f, fb = time_pair(lambda q, k, v, g: F.scaled_dot_product_attention(
                            q, k.repeat_interleave(rep_, 1), v.repeat_interleave(rep_, 1), is_causal=True),
                            *ins[:3], None, args.rep)                                  # no gate
                else:
                    name, _, cx = nm.partition(" c=")
                    f, fb = time_pair(runner(name, baseline, int(cx) if cx else c), *ins, args.rep)
                r[nm] = {"fwd_ms": f, "fwd_bwd_ms": fb}
            except Exception as err:  # noqa: BLE001
                r[nm] = repr(err)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        res.setdefault(label, []).append(r)
        log(f"{label}: {r}")
        save()

    for T in map(int, args.seqs.split(",")):
        if "sweep" not in sections or time.time() > deadline:
            break
        more = sorted({c for c in (*chunks, T) if c <= min(T, 2048)} - {min(best[1], T)})
        row("sweep", T, d, 8, 8, args.tokens // T, min(best[1], T), v4_chunks=more)
    for T in vseqs:
        for c in (c0, 2 * c0):
            if "d128" in sections and time.time() < deadline:
                row("d128", T, 128, 8, 8, args.tokens // T, c)
    for c in (32, 64, 128):
        if "small" in sections and time.time() < deadline:
            row("small", 512, 32, 8, 4, 32 if DEVICE == "cuda" else 1, c, gate_shift=4.0)
            if DEVICE == "cuda":   # device time of one forward+backward against the wall time above: host-bound?
                kernels = profile(runner(v4, baseline, c), *make_inputs(32, 8, 4, 512, 32, gate_shift=4.0), top=100)
                res.setdefault("small_device", []).append({"chunk": c, "device_ms": sum(kernels.values()),
                                                           "kernels": kernels})
                log(f"small chunk {c}: device {sum(kernels.values()):.3f} ms: {kernels}")
                save()
    if "train" in sections and time.time() < deadline:
        res["train_tokens_per_s"] = train_speed(baseline)
        save()
    if "host" in sections and time.time() < deadline:
        from longctx.mechanisms.power import chunk_triton
        for _ in range(3):   # alternated: the host's speed drifts within a job
            for key, nm in (("host", v4), ("host_baseline", "baseline")):
                res.setdefault(key + "_runs", []).append(host_costs(runner(nm, baseline, 32)))
        for key in ("host", "host_baseline"):
            runs = res[key + "_runs"]
            res[key] = {m: sorted(r[m] for r in runs)[1] for m in runs[0]}     # medians
        res["host_breakdown"] = host_breakdown(chunk_triton, runner(v4, baseline, 32))
        res["host_breakdown_baseline"] = host_breakdown(baseline, runner("baseline", baseline, 32))
        log(f"host: {res['host']}; baseline {res['host_baseline']}")
        log(f"host breakdown: {res['host_breakdown']}; baseline {res['host_breakdown_baseline']}")
    res["wall_s"] = time.time() - T0
    save()
    log(f"done: {path}")


if __name__ == "__main__":
    main()
