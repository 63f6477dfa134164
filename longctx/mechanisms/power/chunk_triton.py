"""Triton kernels for chunked power retention, deg 2, forward and backward (reference:
``longctx.mechanisms.power.chunk.power_retention_chunk``; oracle: ``...power.naive``).

Features. ``(q . k)^2 = sum_{a,b} q_a q_b k_a k_b``. The ``d`` coordinates are cut into ``NB = d / FB`` blocks
(``FB`` = 16 or 8, ``KernelConfig.feature_block``); for every pair of blocks ``A <= B`` the ``FB x FB`` features
``k_a k_b`` (``a in A, b in B``) are kept, the query side carrying weight 1 on diagonal pairs and 2 off them:
``NB (NB + 1) / 2`` pairs, 2560 features for ``d = 64`` at ``FB = 16`` and 2304 at ``FB = 8`` (the symmetric
power has 2080; the extra buys whole tensor-core tiles). The kernels walk the features in *steps* of ``FA``
values of ``a`` (``FA * FB`` features, contiguous in the state); a step's features are built in registers from
two column slices of the input, ``x_a[:, :, None] * x_b[:, None, :]`` (in bf16 when the inputs are bf16: the
product of two bf16 numbers rounded once is what a float32 product cast to bf16 gives), and the chain rule back
through a step is two reductions of the ``[rows, FA, FB]`` feature gradient. The normaliser's state is kept
apart as the dense ``Z = sum_j k_j k_j^T`` (``[d, d]`` float32), so ``phi(q) . z = q^T Z q``.

Kernels (``C`` = chunk, ``n`` = chunk index, ``G`` = the log-gate summed inside each chunk, float32: ``G_i`` is
the sum of ``log_g`` from the chunk's first token to ``i``; every gate factor is a difference inside one chunk or
a chunk's total, so no offset from earlier chunks is carried and long sequences lose no precision to it):

1. ``_state_deltas`` grid (steps + 1, chunks - 1, B*Hkv), every chunk at once: the chunk's own contribution to
   the state, ``phi(K_n)^T (beta V_n)`` for one feature step per program and ``Z`` in the last program; in the
   backward the same for the state gradients (``phi(Q_n)^T (r dO_n / den)``, summed over a KV head's queries).
   The state entering chunk 0 and the gradient of the one leaving the last chunk are zero: the last chunk's
   forward contribution and chunk 0's backward one are neither computed nor stored, nor read by 3-5.
2. ``_scan``         grid (slices of S, then of Z, B*Hkv): in place, turns the contributions into the states
   between chunks (forward) or their gradients (backward, reverse order): ``X <- decay_n X + delta_n``.
   Memory-bound; the only sequential walk, and it moves no features. With ``KernelConfig(cuda=("deltas",))``
   ``hopper.state_deltas`` makes the states of 1 and 2 in segments of chunks, each summed from zero, and
   ``_scan`` adds to every later segment what it inherits (the first segment's states are whole: not moved).
3. ``_fwd_out``      grid (T / BM, B*Hq): per query block, the attention-like part inside the chunk plus the
   state part ``scale^2 exp(G_i) (phi(q_i) . S_n, q_i^T Z_n q_i)``; writes ``o`` (and fp32 ``o``, the
   normaliser). With ``KernelConfig(cuda=("out_state",))`` the numerator's state part comes from
   ``hopper.state_out`` (``STATE_IN``; the default on Hopper).
4. ``_bwd_dq``       grid as 3; also writes ``delta_i = do_i . o_i``. The backward runs 4, then 1 and 2 for the
   state gradients, then 5. With ``KernelConfig(cuda=("dq",))`` (the default on Hopper) its state part comes from
   ``hopper.state_dq``, launched before it (``STATE_IN``).
5. ``_bwd_dkv``      grid (T / BM, B*Hkv), summing over the query heads of its KV head (GQA). With
   ``KernelConfig(cuda=("dkv",))`` (the default on Hopper) its state part (``dS``'s products) comes from
   ``hopper.state_dkv``, launched before it (``STATE_IN``).

Around them, ``_gate_sums`` makes ``G`` from ``log_g`` (the forward's first launch) and ``_gate_grad`` makes
``d log_g`` (the backward's last): one launch each where PyTorch took 3 and 10 operations.

Gate gradient. Every weight is ``w_ij = (scale q_i . k_j)^2 exp(G_i - G_j)`` (``G`` here the gate's running sum
over the sequence: only its differences inside a chunk and the chunks' totals are formed), so
``dL/dG_t = sum_j dL/dw_tj w_tj - sum_i dL/dw_it w_it``: kernels 4 and 5 accumulate the two sums in fp32 (for
the state parts they are ``phi(q_i) . g_i`` and ``phi(k_j) . g_j`` with ``g`` the feature gradients), and
``d log_g`` is the reverse cumulative sum (float64). Matmul operands are bf16 (fp16 inputs too: the states and the power
weights need bf16's range), accumulation fp32; products with ``Z`` run in fp32 (three-pass tf32 on a GPU). Plain
``@triton.jit`` without autotuning, so the same code runs under ``TRITON_INTERPRET=1`` on CPU.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention import check_qkv
from . import hopper
from .naive import LOG_G_FLOOR, check_gate, default_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without triton
    triton = None

HEAD_DIMS = (16, 32, 64, 128)  # d and e: powers of two (block counts and ranges in the kernels)
LAUNCHES: dict = {}  # name -> the last compiled kernel launched (the benchmark reads registers and spills)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


GRID_MAX = 65535  # launch grid limit of the 2nd / 3rd dimension: chunks, batch x heads
AUTO = ("deltas", "dq", "dkv", "out_state")   # the Hopper kernels KernelConfig(cuda="auto") takes where they run
STATE_IN_REGISTERS = 168   # the register cap of _fwd_out / _bwd_dq where a Hopper kernel makes the state part
GATE_BLOCK = 2048  # tokens per step of the gate kernels' walks (a chunk in _gate_sums, a piece in _gate_grad)
GATE_PIECE = 4     # blocks of a piece of the sequence, one program of _gate_grad each


def _supported(q: Tensor, v: Tensor, deg: int, chunk_size: int) -> bool:
    d, e = q.shape[-1], v.shape[-1]
    chunk_ok = chunk_size in (16, 32) or (chunk_size > 0 and chunk_size % 64 == 0)
    return (triton is not None and (q.is_cuda or _interpreting()) and deg == 2
            and q.dtype in (torch.float16, torch.bfloat16) and d in HEAD_DIMS and e in HEAD_DIMS and chunk_ok)


def kernel_applies(q: Tensor, k: Tensor, v: Tensor, deg: int, chunk_size: int) -> bool:
    """Whether ``power_retention_triton`` can run these inputs (device: CUDA, or CPU under the interpreter; the
    chunks and batch x heads within the launch grid)."""
    return (_supported(q, v, deg, chunk_size) and -(-q.shape[2] // chunk_size) <= GRID_MAX
            and q.shape[0] * q.shape[1] <= GRID_MAX)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes (defaults: the fastest measured on an H100, ``benchmarks/power_retention_notes.md``).
    ``block``: query/key rows per program of the chunk kernels (capped at the chunk); ``state_rows``: rows per
    step of the state-delta kernel; ``feature_block``: width ``FB`` of the column blocks whose pairs hold the
    features (16: 2560 features for d = 64; 8: 2304, closer to the symmetric power's 2080, in smaller steps);
    ``feature_rows``: values of ``a`` per feature step of the backward's chunk kernels (a step holds
    ``feature_rows x FB`` features; every kernel's step is capped at FB values and 256 x 64 / e features),
    ``state_feature_rows`` and ``out_feature_rows`` the same for the state-delta kernel and the forward's chunk
    kernel; ``scan_block``: state elements per program of the scan, ``scan_unroll``: chunks it loads at once;
    ``warps_*``, ``stages_*``: warps and software-pipelining depth of the state-delta and the chunk kernels
    (``warps_out``: the forward's chunk kernel); ``operands``: matmul operand type, ``"bf16"`` (fast path) or
    ``"fp32"`` with fp32 state snapshots (tf32 on a GPU, exact fp32 under the interpreter: the tests use it to
    check every term tightly); ``cuda``: kernels run by the hand-written Hopper kernels of ``hopper.py`` instead,
    ``"deltas"`` (the states between chunks, ``S`` and ``Z``), ``"out"`` (the forward's output kernel),
    ``"out_state"`` (its state part only; ``_fwd_out`` adds the rest), ``"dq"`` (the state part of the
    backward's dq; ``_bwd_dq`` adds the rest) and / or ``"dkv"`` (the state part of dk and dv; ``_bwd_dkv`` adds the
    rest), a tuple: sm_90, bf16, d = e = 64, the default feature steps, chunks of whole tiles (``hopper.why_not``
    says what it refuses, and a tuple naming a kernel that cannot run raises); ``"auto"`` (the default): the CUDA
    deltas kernel (summing the states itself in segments, ``hopper.segments``, ``_scan`` completing the later
    ones) and the three state parts, ``"dq"``, ``"dkv"`` and ``"out_state"`` (chunks of whole 256-row
    blocks; 128 for ``"dkv"``), each wherever it can run these inputs (each measured faster than Triton's, notes
    v10-v16), the Triton kernels elsewhere."""
    block: int = 64
    state_rows: int = 64
    feature_block: int = 16
    feature_rows: int = 8
    state_feature_rows: int = 16
    out_feature_rows: int = 16
    scan_block: int = 1024
    scan_unroll: int = 4
    warps_state: int = 4
    warps_chunk: int = 4
    warps_out: int = 4
    stages_state: int = 3
    stages_chunk: int = 3
    operands: str = "bf16"
    cuda: tuple | str = "auto"

    def operand_type(self):
        if self.operands not in ("bf16", "fp32"):
            raise ValueError(f"operands must be 'bf16' or 'fp32', got {self.operands!r}")
        return tl.bfloat16 if self.operands == "bf16" else tl.float32

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.operands == "bf16" else torch.float32


if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)    # exp(x) = exp2(x LOG2E)
    GATE_FLOOR = tl.constexpr(LOG_G_FLOOR)

    @triton.jit
    def _mm(a, b, INTERP: tl.constexpr):
        """``tl.dot`` with fp32 accumulation; under the interpreter (whose bf16 dot is wrong in triton 3.8) the
        16-bit operands are widened to fp32 first, which gives the same products."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a, b)

    @triton.jit
    def _mm32(a, b):
        """Float32 product (three-pass tf32 on a GPU: ~fp32 accuracy), for the normaliser state ``Z``."""
        return tl.dot(a, b, input_precision="tf32x3")

    @triton.jit
    def _step(STEPS, s, FA: tl.constexpr, FB: tl.constexpr, ALIGNED: tl.constexpr):
        """Feature step ``s``: first column of its ``a`` values, first column of its ``b`` block, and the query
        weight (1 on diagonal block pairs, 2 off them). ``ALIGNED``: the columns are declared multiples of ``FA``
        and ``FB`` (they are), so Triton knows the column loads are aligned and can pipeline them (asynchronous
        copies); unknown alignment kept them synchronous loads, waited on in every step."""
        ca = tl.load(STEPS + 3 * s)
        cb = tl.load(STEPS + 3 * s + 1)
        if ALIGNED:
            ca = tl.multiple_of(ca, FA)
            cb = tl.multiple_of(cb, FB)
        w = tl.load(STEPS + 3 * s + 2).to(tl.float32)
        return ca, cb, w

    @triton.jit
    def _cols(x_ptr, rows, c0, W: tl.constexpr, DK: tl.constexpr):
        """``x[rows, c0:c0+W]`` as float32 ``[R, W]``."""
        return tl.load(x_ptr + rows[:, None] * DK + (c0 + tl.arange(0, W))[None, :]).to(tl.float32)

    @triton.jit
    def _features(xa, xb, R: tl.constexpr, FA: tl.constexpr, FB: tl.constexpr, PDT: tl.constexpr,
                  OPDT: tl.constexpr):
        """One step's features ``[R, FA*FB]`` (column ``a*FB + b`` is ``xa[:, a] * xb[:, b]``), multiplied in
        ``PDT`` and returned as matmul operands."""
        f = xa.to(PDT)[:, :, None] * xb.to(PDT)[:, None, :]
        return tl.reshape(f, (R, FA * FB)).to(OPDT)

    @triton.jit
    def _fold(g, xa, xb, R: tl.constexpr, FA: tl.constexpr, FB: tl.constexpr):
        """Chain rule through one step: ``g [R, FA*FB]`` (gradient of the features) -> ``dx_a [R, FA]``
        (``sum_b g_ab x_b``) and ``dx_b [R, FB]`` (``sum_a g_ab x_a``)."""
        g3 = tl.reshape(g, (R, FA, FB))
        return tl.sum(g3 * xb[:, None, :], 2), tl.sum(g3 * xa[:, :, None], 1)

    @triton.jit
    def _scatter_cols(acc, dx, c0, W: tl.constexpr, DK: tl.constexpr):
        """``acc [R, DK/W, W]`` plus ``dx [R, W]`` in columns ``c0 .. c0+W-1`` (``c0`` a multiple of ``W``)."""
        hit = (tl.arange(0, DK // W) == c0 // W).to(tl.float32)
        return acc + dx[:, None, :] * hit[None, :, None]

    @triton.jit
    def _x_head(bkv, rr, HQ: tl.constexpr, HKV: tl.constexpr, BACKWARD: tl.constexpr):
        """The ``rr``-th query head of KV head ``bkv`` (``BACKWARD``; in ``_state_deltas`` then ``X = Q``), or
        ``bkv`` itself (the forward's ``X = K``)."""
        if BACKWARD:
            return (bkv // HKV) * HQ + (bkv % HKV) * (HQ // HKV) + rr
        return bkv

    @triton.jit
    def _z_offsets(bkv, m, NSLOT, DK: tl.constexpr):
        """Offsets of the ``[DK, DK]`` normaliser state of KV head ``bkv`` in slot ``m`` of
        ``[B*Hkv, NSLOT, DK, DK]``."""
        di = tl.arange(0, DK)
        return ((bkv * NSLOT + m) * DK + di[:, None]) * DK + di[None, :]

    @triton.jit
    def _gates(g_ptr, idx, N: tl.constexpr, HAS_GATE: tl.constexpr):
        """``G`` at ``idx`` ``[N]`` (zeros without a gate, nothing read)."""
        if HAS_GATE:
            g = tl.load(g_ptr + idx)
        else:
            g = tl.zeros([N], dtype=tl.float32)
        return g

    @triton.jit
    def _row_factors(gq, g_ref, ls2, scale, BM: tl.constexpr, HAS_GATE: tl.constexpr):
        """``scale^2 e^(G_i - G_ref)`` for queries of gate sums ``gq [BM]`` (``scale^2`` without a gate)."""
        if HAS_GATE:
            a = tl.exp2((gq - g_ref) * LOG2E + ls2)
        else:
            a = tl.full([BM], scale * scale, tl.float32)
        return a

    @triton.jit
    def _key_factors(g_ref, gk, BM: tl.constexpr, HAS_GATE: tl.constexpr):
        """``e^(G_ref - G_j)`` for keys of gate sums ``gk [BM]`` (1 without a gate). With ``ref`` at or after every
        key of the block and at or before every query of a later block, ``_row_factors`` times these is every
        pair's ``scale^2 e^(G_i - G_j)`` in ``2 BM`` exponentials instead of ``BM^2``; neither factor exceeds 1
        (``G`` never increases inside a chunk: every ``log_g <= 0``), so neither overflows, and both are at least
        their product, so neither underflows where the product does not."""
        if HAS_GATE:
            b = tl.exp2((g_ref - gk) * LOG2E)
        else:
            b = tl.full([BM], 1.0, tl.float32)
        return b

    @triton.jit
    def _masked_factors(gq, gk, vis, ls2, scale, HAS_GATE: tl.constexpr):
        """``scale^2 e^(G_i - G_j)`` where ``vis`` (query ``i`` not before key ``j``), else 0, one exponential a
        pair (the block pairs on the chunk's diagonal); ``gq`` and ``gk`` broadcast to ``vis``."""
        if HAS_GATE:
            ex = tl.exp2(tl.where(vis, (gq - gk) * LOG2E + ls2, float("-inf")))
        else:
            ex = tl.where(vis, scale * scale, 0.0)
        return ex

    @triton.jit
    def _out_keys(q, k_ptr, v_ptr, cols, ex, num, den, DK: tl.constexpr, E: tl.constexpr, INTERP: tl.constexpr,
                  OPDT: tl.constexpr):
        """One key block of ``_fwd_out``: ``num += w v``, ``den += sum_j w`` with ``w = (q k^T)^2 ex`` rounded to
        the operand type, ``ex [BM, BM]`` the gate and scale factors (0 where not visible)."""
        kk = tl.load(k_ptr + cols[:, None] * DK + tl.arange(0, DK)[None, :])
        vv = tl.load(v_ptr + cols[:, None] * E + tl.arange(0, E)[None, :])
        x = _mm(q, tl.trans(kk), INTERP)
        # the normaliser sums the same rounded weights the numerator uses: a row is then an exact convex
        # combination of its values (row 0 returns v_0 exactly), which keeps do.v - delta free of rounding
        # bias in the backward (seen without: dq of a first token with a tiny weight off by 4x |dq|)
        w = (x * x * ex).to(OPDT)
        den += tl.sum(w.to(tl.float32), 1)
        num += _mm(w, vv.to(OPDT), INTERP)
        return num, den

    @triton.jit
    def _dq_keys(q, do, k_ptr, v_ptr, cols, ex, delta, inv_den, dq, dg, DK: tl.constexpr, E: tl.constexpr,
                 INTERP: tl.constexpr, OPDT: tl.constexpr):
        """One key block of ``_bwd_dq`` (``ex`` as in ``_out_keys``): ``p = x ex`` is half of ``dw / dx``, so
        ``dq`` gathers the p-weighted terms at half weight; ``dg += sum_j dL/dw_ij w_ij``."""
        kk = tl.load(k_ptr + cols[:, None] * DK + tl.arange(0, DK)[None, :])
        vv = tl.load(v_ptr + cols[:, None] * E + tl.arange(0, E)[None, :])
        x = _mm(q, tl.trans(kk), INTERP)
        p = x * ex
        dw = (_mm(do, tl.trans(vv), INTERP) - delta[:, None]) * inv_den[:, None]
        dg += tl.sum(dw * (x * p), 1)
        dq += _mm((dw * p).to(OPDT), kk.to(OPDT), INTERP)
        return dq, dg

    @triton.jit
    def _dkv_queries(Q, DO, DEN, DELTA, bh, Tp, rows, kk, vv, ext, dv, dk, dg, DK: tl.constexpr, E: tl.constexpr,
                     INTERP: tl.constexpr, OPDT: tl.constexpr):
        """One query block of ``_bwd_dkv`` for its keys ``kk``, ``vv``: ``ext [keys, queries]`` the factors (as in
        ``_out_keys``, transposed); ``dv += w^T dnum``, ``dk`` at half weight, ``dg += sum_i dL/dw_ij w_ij``."""
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        q = tl.load(Q + bh * Tp * DK + rows[:, None] * DK + di[None, :])
        do = tl.load(DO + bh * Tp * E + rows[:, None] * E + ei[None, :])
        den = tl.load(DEN + bh * Tp + rows)
        den = tl.where(den == 0.0, 1.0, den)
        delta = tl.load(DELTA + bh * Tp + rows)
        xt = _mm(kk, tl.trans(q), INTERP)                                       # [keys, queries]
        pt = xt * ext
        wt = xt * pt
        inv_den = 1.0 / den
        dv += _mm((wt * inv_den[None, :]).to(OPDT), do.to(OPDT), INTERP)   # 1 / den on the register operand
        dwt = (_mm(vv, tl.trans(do), INTERP) - delta[None, :]) * inv_den[None, :]
        dg += tl.sum(dwt * wt, 1)
        dk += _mm((dwt * pt).to(OPDT), q.to(OPDT), INTERP)
        return dv, dk, dg

    @triton.jit
    def _row_weights(DEN, xh, g_ptr, rows, g_end, Tp, BACKWARD: tl.constexpr,
                     HAS_GATE: tl.constexpr, BC: tl.constexpr):
        """Per-row weights of the state contributions (see ``_state_deltas``; without the ``-delta`` of ``dZ``),
        ``[BC]`` float32."""
        if BACKWARD:
            den = tl.load(DEN + xh * Tp + rows)
            w = 1.0 / tl.where(den == 0.0, 1.0, den)
            if HAS_GATE:
                w = w * tl.exp(tl.load(g_ptr + rows))
        elif HAS_GATE:
            w = tl.exp(g_end - tl.load(g_ptr + rows))
        else:
            w = tl.full([BC], 1.0, tl.float32)
        return w

    @triton.jit
    def _state_deltas(X, Y, G, STEPS, SB, ZB, DEN, DELTA, NC, scale,
                      HQ: tl.constexpr, HKV: tl.constexpr, BACKWARD: tl.constexpr, HAS_GATE: tl.constexpr,
                      C: tl.constexpr, BC: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, FB: tl.constexpr,
                      FA: tl.constexpr, F: tl.constexpr, NS: tl.constexpr, INTERP: tl.constexpr,
                      OPDT: tl.constexpr, PDT: tl.constexpr):
        """Chunk ``n``'s own contribution. Forward (``X = K, Y = V``): ``S += phi(k_j) beta_j v_j^T``,
        ``Z += beta_j k_j k_j^T`` with ``beta_j = exp(G_end - G_j)``. Backward (``X = Q, Y = dO``, the KV head's
        query heads): ``dS += phi~(q_i) r_i do_i^T / den_i``, ``dZ += r_i (-delta_i / den_i) q_i q_i^T`` with
        ``r_i = scale^2 exp(G_i)``, ``phi~`` the weighted query features and ``delta_i = do_i . o_i``.
        Programs ``0 .. NS-1`` write one feature step of ``S`` each, program ``NS`` writes ``Z``, into slot ``m``
        of ``NC - 1``: the contribution of chunk ``n = m`` (forward; the last chunk's reaches no later query) or
        ``n = m + 1`` (backward; chunk 0's queries read the zero state)."""
        s = tl.program_id(0)
        m = tl.program_id(1)
        bkv = tl.program_id(2).to(tl.int64)
        if BACKWARD:
            n = m + 1
        else:
            n = m
        FT: tl.constexpr = FA * FB
        NREP: tl.constexpr = HQ // HKV if BACKWARD else 1
        Tp = NC * C
        c0 = n * C
        g_ptr = G + bkv * Tp
        g_end = 0.0
        if HAS_GATE:
            g_end = tl.load(g_ptr + c0 + C - 1)
        post = scale * scale if BACKWARD else 1.0
        # S and Z accumulate over the same rows, but Triton needs one accumulator shape per branch
        if s < NS:
            ca, cb, wab = _step(STEPS, s, FA, FB, True)
            acc = tl.zeros([FT, E], dtype=tl.float32)
            for rr in range(NREP):
                xh = _x_head(bkv, rr, HQ, HKV, BACKWARD)
                x_ptr = X + xh * Tp * DK
                for s0 in range(0, C, BC):
                    rows = c0 + s0 + tl.arange(0, BC)
                    w = _row_weights(DEN, xh, g_ptr, rows, g_end, Tp, BACKWARD, HAS_GATE, BC)
                    y_ptrs = Y + xh * Tp * E + rows[:, None] * E + tl.arange(0, E)[None, :]
                    phit = tl.trans(_features(_cols(x_ptr, rows, ca, FA, DK), _cols(x_ptr, rows, cb, FB, DK),
                                              BC, FA, FB, PDT, OPDT))                          # [FT, BC]
                    y = tl.load(y_ptrs).to(tl.float32)
                    acc += _mm(phit, (y * w[:, None]).to(OPDT), INTERP)
            if BACKWARD:
                acc = acc * (post * wab)
            fi = tl.arange(0, FT)
            tl.store(SB + ((bkv * (NC - 1) + m) * F + s * FT + fi[:, None]) * E + tl.arange(0, E)[None, :],
                     acc.to(SB.dtype.element_ty))
        else:
            accz = tl.zeros([DK, DK], dtype=tl.float32)
            for rr in range(NREP):
                xh = _x_head(bkv, rr, HQ, HKV, BACKWARD)
                x_ptr = X + xh * Tp * DK
                for s0 in range(0, C, BC):
                    rows = c0 + s0 + tl.arange(0, BC)
                    w = _row_weights(DEN, xh, g_ptr, rows, g_end, Tp, BACKWARD, HAS_GATE, BC)
                    if BACKWARD:
                        w = -w * tl.load(DELTA + xh * Tp + rows)
                    x = _cols(x_ptr, rows, 0, DK, DK)
                    accz += _mm32(tl.trans(x * w[:, None]), x)
            tl.store(ZB + _z_offsets(bkv, m, NC - 1, DK), accz * post)

    @triton.jit
    def _scan_slice(BUF, G, NC, L, SEG, pid, bkv, HAS_GATE: tl.constexpr, REVERSE: tl.constexpr, C: tl.constexpr,
                    BLOCK: tl.constexpr, U: tl.constexpr):
        """In place over elements ``pid * BLOCK ...`` of ``BUF [B*Hkv, NC - 1, L]``, the slots between chunks in
        segments of ``SEG`` slots. On entry each slot holds the state summed from its segment's start,
        ``L_m = decay_n L_prev + delta_n`` from zero (``decay_n = exp(G at chunk n's last token)``, the chunk's
        whole gate); on exit the whole state, ``X_m = L_m + (the segment's decays up to m) X_prev`` with ``X_prev``
        the state where the segment before it ended. ``SEG = 1``: every slot is a segment, its chunk's own
        contribution on entry (``_state_deltas``); more: what ``hopper.state_deltas`` leaves. Forward: slot ``m``
        is the state leaving chunk ``m`` (``n = m``). ``REVERSE``: the gradient of the state leaving chunk ``m``,
        walked from the last slot (``n = m + 1``). The first segment walked is whole and only read at its end.
        ``U`` slots are loaded at once (independent loads in flight), then folded in order in registers."""
        NSLOT = NC - 1
        off = pid * BLOCK + tl.arange(0, BLOCK)
        base = BUF + bkv * NSLOT * L
        g_ptr = G + bkv * NC * C
        u = tl.arange(0, U)
        first_len = NSLOT - (tl.cdiv(NSLOT, SEG) - 1) * SEG if REVERSE else SEG   # the first segment walked
        m_end = NSLOT - first_len if REVERSE else first_len - 1                    # its last slot walked
        x = tl.load(base + m_end.to(tl.int64) * L + off, mask=off < L, other=0.0).to(tl.float32)
        y = tl.zeros([BLOCK], dtype=tl.float32)                       # X_prev, decayed to the slot
        for i0 in range(first_len, NSLOT, U):
            m = NSLOT - 1 - (i0 + u) if REVERSE else i0 + u
            n = m + 1 if REVERSE else m                                                  # the decaying chunk
            valid = (i0 + u) < NSLOT
            starts = ((m + 1) % SEG == 0) if REVERSE else (m % SEG == 0)               # a segment's first slot
            ptrs = base + m.to(tl.int64)[:, None] * L + off[None, :]
            mask = valid[:, None] & (off < L)[None, :]
            local = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)                    # [U, BLOCK]
            if HAS_GATE:
                decay = tl.exp(tl.load(g_ptr + n * C + C - 1, mask=valid, other=0.0))
            else:
                decay = tl.full([U], 1.0, tl.float32)
            out = tl.zeros([U, BLOCK], dtype=tl.float32)
            for j in tl.static_range(U):
                pick = u == j
                restart = tl.sum(tl.where(pick & starts, 1, 0), 0) > 0
                y = tl.where(restart, x, y) * tl.sum(tl.where(pick, decay, 0.0), 0)
                x = tl.sum(tl.where(pick[:, None], local, 0.0), 0) + y
                out += tl.where(pick[:, None], x[None, :], 0.0)
            tl.store(ptrs, out.to(BUF.dtype.element_ty), mask=mask)

    @triton.jit
    def _scan(SB, ZB, G, NC, LS, LZ, NPS, SEG, HAS_GATE: tl.constexpr, REVERSE: tl.constexpr, C: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_Z: tl.constexpr, U: tl.constexpr):
        """Both scans in one launch (one launch less a direction: small shapes are bound by launches): programs
        ``0 .. NPS - 1`` walk slices of ``S`` (``LS = F * E`` elements a slot), the rest slices of ``Z``
        (``LZ = d * d``)."""
        pid = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        if pid < NPS:
            _scan_slice(SB, G, NC, LS, SEG, pid, bkv, HAS_GATE, REVERSE, C, BLOCK_S, U)
        else:
            _scan_slice(ZB, G, NC, LZ, SEG, pid - NPS, bkv, HAS_GATE, REVERSE, C, BLOCK_Z, U)

    @triton.jit
    def _gate_sums(LG, G, T, NC, C: tl.constexpr, BLK: tl.constexpr):
        """``G [B*Hkv, NC * C]`` (fp32) from ``log_g [B*Hkv, T]``: the gate summed inside chunk ``n`` (program 0),
        padded tokens 0, every value that is not finite and ``<= 0`` NaN and every other floored at ``LOG_G_FLOOR``
        (``check_gate``'s rules on CUDA): the sum carries a NaN to the chunk's later tokens, the chunk's state
        contribution and decay to every later chunk."""
        n = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        carry = tl.sum(tl.zeros([BLK], dtype=tl.float32), 0)
        for s0 in range(0, C, BLK):
            i = s0 + tl.arange(0, BLK)
            t = n * C + i
            x = tl.load(LG + row * T + t, mask=(i < C) & (t < T), other=0.0).to(tl.float32)
            x = tl.where((x <= 0.0) & (x > float("-inf")), tl.maximum(x, GATE_FLOOR), float("nan"))
            tl.store(G + row * NC * C + t, tl.cumsum(x, 0) + carry, mask=i < C)
            carry += tl.sum(x, 0)

    @triton.jit
    def _gate_dg(DGQ, DGK, row, Tp, t, end, REP: tl.constexpr):
        """``dG_t`` of ``_gate_grad`` at tokens ``t`` (0 from ``end`` on), float64."""
        m = t < end
        dg = -tl.load(DGK + row * Tp + t, mask=m, other=0.0).to(tl.float64)
        for r in tl.static_range(REP):
            dg += tl.load(DGQ + (row * REP + r) * Tp + t, mask=m, other=0.0).to(tl.float64)
        return dg

    @triton.jit
    def _gate_grad(DGQ, DGK, DLG, T, Tp, REP: tl.constexpr, BLK: tl.constexpr, PIECE: tl.constexpr):
        """``d log_g [B*Hkv, T]`` (its dtype): ``dL/dlog_g_s = sum_{t >= s} dG_t`` with ``dG_t`` the sum over the
        KV head's ``REP`` query heads of ``DGQ [B*Hq, Tp]`` minus ``DGK [B*Hkv, Tp]``, in float64 (a difference of
        large sums; padded tokens add 0). Program ``(p, row)`` writes tokens ``p * PIECE ...`` (``PIECE`` a multiple
        of ``BLK``): it sums every later token first (independent loads; what a walk of the whole sequence waited
        for), then walks its own piece from the end."""
        p = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        lo = p * PIECE
        hi = tl.minimum(lo + PIECE, T)
        later = tl.zeros([BLK], dtype=tl.float64)
        for t0 in tl.range(hi, T, BLK, num_stages=3):
            later += _gate_dg(DGQ, DGK, row, Tp, t0 + tl.arange(0, BLK), T, REP)
        carry = tl.sum(later, 0)
        nblk = tl.cdiv(hi - lo, BLK)
        for j in tl.range(nblk, num_stages=3):   # loads issued ahead (asynchronous copies): the walk is sequential
            t = lo + (nblk - 1 - j) * BLK + tl.arange(0, BLK)
            m = t < hi
            dg = _gate_dg(DGQ, DGK, row, Tp, t, hi, REP)
            tl.store(DLG + row * T + t, (tl.cumsum(dg, 0, reverse=True) + carry).to(DLG.dtype.element_ty), mask=m)
            carry += tl.sum(dg, 0)

    @triton.jit
    def _fwd_out(Q, K, V, G, STEPS, SB, ZB, O, O32, DEN, US, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, FB: tl.constexpr, FA: tl.constexpr,
                 F: tl.constexpr, NS: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr,
                 PDT: tl.constexpr, LOOP_STAGES: tl.constexpr, STATE_IN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        FT: tl.constexpr = FA * FB
        Tp = NC * C
        m0 = pid_m * BM
        n = m0 // C
        c0 = n * C
        rows = m0 + tl.arange(0, BM)
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        q_ptr = Q + bh * Tp * DK
        k_ptr = K + bkv * Tp * DK
        v_ptr = V + bkv * Tp * E
        g_ptr = G + bkv * Tp
        q = tl.load(q_ptr + rows[:, None] * DK + di[None, :])
        gq = _gates(g_ptr, rows, BM, HAS_GATE)
        if HAS_GATE:
            r = scale * scale * tl.exp(gq)
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        # the state entering the chunk (slot n - 1; chunk 0's is zero) first: its reads are in flight while the
        # chunk's keys are multiplied, and its accumulators are dead before theirs
        q32 = q.to(tl.float32)
        z = tl.load(ZB + _z_offsets(bkv, n - 1, NC - 1, DK), mask=n > 0, other=0.0)
        den = tl.sum(_mm32(q32, z) * q32, 1) * r
        if STATE_IN:   # from hopper.state_out: r phi(q) S
            num = tl.load(US + bh * Tp * E + rows[:, None] * E + ei[None, :], mask=n > 0, other=0.0)
        else:          # added after the chunk's keys (fewer registers and less shared memory there)
            num = tl.zeros([BM, E], dtype=tl.float32)
        ls2 = tl.log2(scale * scale)     # w = x^2 scale^2 e^(G_i - G_j): the scale in the exponent
        g_ref = _gates(g_ptr, m0 + tl.arange(0, 1), 1, HAS_GATE)  # the block's first row: every earlier key's gate
        ai = _row_factors(gq, g_ref, ls2, scale, BM, HAS_GATE)      # factor splits there (_key_factors)
        for j0 in tl.range(c0, m0, BM, num_stages=LOOP_STAGES):   # the chunk's keys before the block: all visible
            cols = j0 + tl.arange(0, BM)
            ex = ai[:, None] * _key_factors(g_ref, _gates(g_ptr, cols, BM, HAS_GATE), BM, HAS_GATE)[None, :]
            num, den = _out_keys(q, k_ptr, v_ptr, cols, ex, num, den, DK, E, INTERP, OPDT)
        cols = m0 + tl.arange(0, BM)                              # the block's own keys: masked, exponent whole
        ex = _masked_factors(gq[:, None], _gates(g_ptr, cols, BM, HAS_GATE)[None, :], rows[:, None] >= cols[None, :],
                             ls2, scale, HAS_GATE)
        num, den = _out_keys(q, k_ptr, v_ptr, cols, ex, num, den, DK, E, INTERP, OPDT)
        if not STATE_IN:   # the state entering the chunk one feature step at a time
            fi = tl.arange(0, FT)
            s_ptr = SB + (bkv * (NC - 1) + n - 1) * F * E
            acc = tl.zeros([BM, E], dtype=tl.float32)
            for s in tl.range(tl.where(n > 0, NS, 0), num_stages=LOOP_STAGES):
                # not declared aligned here: the pipelined column loads then cost registers and 22 spills, 1.45 ->
                # 2.05 ms at 4K (H100; benchmarks/power_retention_notes.md, v5); the other kernels gain 8-14%
                ca, cb, wab = _step(STEPS, s, FA, FB, False)
                phi = _features(_cols(q_ptr, rows, ca, FA, DK) * wab, _cols(q_ptr, rows, cb, FB, DK),
                                BM, FA, FB, PDT, OPDT)
                acc += _mm(phi, tl.load(s_ptr + (s * FT + fi)[:, None] * E + ei[None, :]), INTERP)
            num += acc * r[:, None]
        o = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(O + bh * Tp * E + rows[:, None] * E + ei[None, :], o.to(O.dtype.element_ty))
        tl.store(O32 + bh * Tp * E + rows[:, None] * E + ei[None, :], o)
        tl.store(DEN + bh * Tp + rows, den)

    @triton.jit
    def _dq_state(q_ptr, rows, STEPS, s_ptr, dnum, ns, BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr,
                  FB: tl.constexpr, FA: tl.constexpr, INTERP: tl.constexpr, LOOP_STAGES: tl.constexpr):
        """``_bwd_dq``'s state part before the factor ``r``: ``(phi(q) . g [BM], dq [BM, DK])`` over ``ns`` feature
        steps of the state at ``s_ptr``, with ``g = dnum S^T`` the feature gradients."""
        FT: tl.constexpr = FA * FB
        fi = tl.arange(0, FT)
        ei = tl.arange(0, E)
        dg = tl.zeros([BM], dtype=tl.float32)
        dqa = tl.zeros([BM, DK // FA, FA], dtype=tl.float32)
        dqb = tl.zeros([BM, DK // FB, FB], dtype=tl.float32)
        for s in tl.range(ns, num_stages=LOOP_STAGES):
            ca, cb, wab = _step(STEPS, s, FA, FB, True)
            st = tl.load(s_ptr + (s * FT + fi)[:, None] * E + ei[None, :])
            # the feature gradient is r_i wab (dnum_i . S_f): wab goes on the two folds (FA + FB values a row,
            # where the [BM, FT] tile would take FT), r on the sums after the loop
            g = _mm(dnum, tl.trans(st), INTERP)                                         # [BM, FT]
            qa = _cols(q_ptr, rows, ca, FA, DK)
            da, db = _fold(g, qa, _cols(q_ptr, rows, cb, FB, DK), BM, FA, FB)
            da = da * wab
            db = db * wab
            dg += tl.sum(da * qa, 1)
            dqa = _scatter_cols(dqa, da, ca, FA, DK)
            dqb = _scatter_cols(dqb, db, cb, FB, DK)
        return dg, tl.reshape(dqa, (BM, DK)) + tl.reshape(dqb, (BM, DK))

    @triton.jit
    def _bwd_dq(Q, K, V, G, STEPS, SB, ZB, DO, O32, DEN, DDEN, DELTA, DQ, DGQ, US, VS, NC, scale,
                HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, FB: tl.constexpr, FA: tl.constexpr,
                F: tl.constexpr, NS: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr,
                LOOP_STAGES: tl.constexpr, STATE_IN: tl.constexpr, HAS_DDEN: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        Tp = NC * C
        m0 = pid_m * BM
        n = m0 // C
        c0 = n * C
        rows = m0 + tl.arange(0, BM)
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        q_ptr = Q + bh * Tp * DK
        k_ptr = K + bkv * Tp * DK
        v_ptr = V + bkv * Tp * E
        g_ptr = G + bkv * Tp
        q = tl.load(q_ptr + rows[:, None] * DK + di[None, :])
        do = tl.load(DO + bh * Tp * E + rows[:, None] * E + ei[None, :])
        den = tl.load(DEN + bh * Tp + rows)
        # delta_i = do_i . o_i (fp32 o), written here for kernels 1 and 5 of the backward; where the normaliser is an
        # output too (return_den), its own gradient: dL/dden_i = -(delta_i - dden_i den_i) / den_i
        delta = tl.sum(do.to(tl.float32) * tl.load(O32 + bh * Tp * E + rows[:, None] * E + ei[None, :]), 1)
        if HAS_DDEN:
            delta -= tl.load(DDEN + bh * Tp + rows) * den
        den = tl.where(den == 0.0, 1.0, den)
        tl.store(DELTA + bh * Tp + rows, delta)
        gq = _gates(g_ptr, rows, BM, HAS_GATE)
        if HAS_GATE:
            r = scale * scale * tl.exp(gq)
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        s_ptr = SB + (bkv * (NC - 1) + n - 1) * F * E       # the state entering the chunk (none for chunk 0)
        inv_den = 1.0 / den     # multiplied by in the loops: a division there was ~8 instructions an element
        dnum = (do.to(tl.float32) * inv_den[:, None]).to(OPDT)
        dden = -delta * inv_den
        # the state part first: its accumulators are dead before the in-chunk loop's (fewer live registers)
        if STATE_IN:   # from hopper.state_dq: r dq_state and r phi(q) . g (none in chunk 0)
            dq = tl.load(US + bh * Tp * DK + rows[:, None] * DK + di[None, :], mask=n > 0, other=0.0)
            dg = tl.load(VS + bh * Tp + rows, mask=n > 0, other=0.0)
        else:          # dg: sum_j dL/dw_ij w_ij
            dg, dq = _dq_state(q_ptr, rows, STEPS, s_ptr, dnum, tl.where(n > 0, NS, 0), BM, DK, E, FB, FA, INTERP,
                               LOOP_STAGES)
            dq = dq * r[:, None]
            dg = dg * r
        q32 = q.to(tl.float32)
        qz = _mm32(q32, tl.load(ZB + _z_offsets(bkv, n - 1, NC - 1, DK), mask=n > 0, other=0.0))
        rz = r * dden
        dg += tl.sum(qz * q32, 1) * rz
        # inside the chunk, w_ij = (scale x_ij)^2 e^(G_i - G_j) with x = q k^T: p = x scale^2 e^(G_i - G_j) (the
        # scale inside the exponent: no multiply an element) is half of dw_ij / dx_ij, so dq gathers the p-weighted
        # terms at half weight and is doubled after the loop (both exact)
        dq = (dq + qz * (2.0 * rz)[:, None]) * 0.5
        ls2 = tl.log2(scale * scale)
        g_ref = _gates(g_ptr, m0 + tl.arange(0, 1), 1, HAS_GATE)  # as in _fwd_out
        ai = _row_factors(gq, g_ref, ls2, scale, BM, HAS_GATE)
        for j0 in tl.range(c0, m0 + BM, BM, num_stages=LOOP_STAGES):
            cols = j0 + tl.arange(0, BM)
            gk = _gates(g_ptr, cols, BM, HAS_GATE)
            if j0 == m0:   # the block's own keys: masked, the exponent whole
                ex = _masked_factors(gq[:, None], gk[None, :], rows[:, None] >= cols[None, :], ls2, scale, HAS_GATE)
            else:          # earlier keys: all visible, the factors split at the block's first row
                ex = ai[:, None] * _key_factors(g_ref, gk, BM, HAS_GATE)[None, :]
            dq, dg = _dq_keys(q, do, k_ptr, v_ptr, cols, ex, delta, inv_den, dq, dg, DK, E, INTERP, OPDT)
        dq = dq * 2.0
        tl.store(DQ + bh * Tp * DK + rows[:, None] * DK + di[None, :], dq.to(DQ.dtype.element_ty))
        tl.store(DGQ + bh * Tp + rows, dg)

    @triton.jit
    def _bwd_dkv(Q, K, V, G, STEPS, DSB, DZB, DO, DEN, DELTA, DKO, DVO, DGK, DKS, DVS, DGS, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, FB: tl.constexpr, FA: tl.constexpr,
                 F: tl.constexpr, NS: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr,
                 PDT: tl.constexpr, LOOP_STAGES: tl.constexpr, STATE_IN: tl.constexpr):
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        Tp = NC * C
        j0 = pid_n * BM
        n = j0 // C
        c0 = n * C
        cols = j0 + tl.arange(0, BM)
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        k_ptr = K + bkv * Tp * DK
        g_ptr = G + bkv * Tp
        kk = tl.load(k_ptr + cols[:, None] * DK + di[None, :])
        vv = tl.load(V + bkv * Tp * E + cols[:, None] * E + ei[None, :])
        gk = _gates(g_ptr, cols, BM, HAS_GATE)
        if HAS_GATE:
            beta = tl.exp(tl.load(g_ptr + c0 + C - 1) - gk)
        else:
            beta = tl.full([BM], 1.0, tl.float32)
        # the state part first: its accumulators are dead before the in-chunk loop's (fewer live registers); the
        # last chunk has no state gradient. In-chunk terms come at half weight, as in _bwd_dq
        if STATE_IN:   # from hopper.state_dkv: beta dv, beta phi(k) . g, beta dk
            has = n < NC - 1
            dv = tl.load(DVS + bkv * Tp * E + cols[:, None] * E + ei[None, :], mask=has, other=0.0)
            dg = tl.load(DGS + bkv * Tp + cols, mask=has, other=0.0)
            dk = tl.load(DKS + bkv * Tp * DK + cols[:, None] * DK + di[None, :], mask=has, other=0.0)
            k32 = kk.to(tl.float32)
            kz = _mm32(k32, tl.load(DZB + _z_offsets(bkv, n, NC - 1, DK), mask=has, other=0.0))
            dg += tl.sum(kz * k32, 1) * beta
            dk = (dk + kz * (2.0 * beta)[:, None]) * 0.5
        else:
            FT: tl.constexpr = FA * FB
            fi = tl.arange(0, FT)
            s_ptr = DSB + (bkv * (NC - 1) + n) * F * E     # the gradient of the state leaving the chunk
            vb = vv.to(OPDT)
            dv = tl.zeros([BM, E], dtype=tl.float32)
            dg = tl.zeros([BM], dtype=tl.float32)  # sum_i dL/dw_ij w_ij
            dka = tl.zeros([BM, DK // FA, FA], dtype=tl.float32)
            dkb = tl.zeros([BM, DK // FB, FB], dtype=tl.float32)
            for s in tl.range(tl.where(n < NC - 1, NS, 0), num_stages=LOOP_STAGES):
                ca, cb, wab = _step(STEPS, s, FA, FB, True)
                dst = tl.load(s_ptr + (s * FT + fi)[:, None] * E + ei[None, :])
                ka = _cols(k_ptr, cols, ca, FA, DK)
                kb = _cols(k_ptr, cols, cb, FB, DK)
                dv += _mm(_features(ka, kb, BM, FA, FB, PDT, OPDT), dst, INTERP)
                da, db = _fold(_mm(vb, tl.trans(dst), INTERP), ka, kb, BM, FA, FB)
                dg += tl.sum(da * ka, 1)
                dka = _scatter_cols(dka, da, ca, FA, DK)
                dkb = _scatter_cols(dkb, db, cb, FB, DK)
            k32 = kk.to(tl.float32)
            dk = tl.reshape(dka, (BM, DK)) + tl.reshape(dkb, (BM, DK))
            kz = _mm32(k32, tl.load(DZB + _z_offsets(bkv, n, NC - 1, DK), mask=n < NC - 1, other=0.0))
            dg = (dg + tl.sum(kz * k32, 1)) * beta
            dk = (dk + 2.0 * kz) * (0.5 * beta)[:, None]
            dv = dv * beta[:, None]
        ls2 = tl.log2(scale * scale)
        # queries after the key block see every key: e^(G_i - G_j) = e^(G_i - G_l) e^(G_l - G_j) with l the block's
        # last key, both factors <= 1 (as in _fwd_out); the keys' factors are the same for every query block
        g_ref = _gates(g_ptr, j0 + BM - 1 + tl.arange(0, 1), 1, HAS_GATE)  # the block's last key
        bj = _key_factors(g_ref, gk, BM, HAS_GATE)
        for rr in range(HQ // HKV):
            bh = _x_head(bkv, rr, HQ, HKV, True)
            for i0 in tl.range(j0, c0 + C, BM, num_stages=LOOP_STAGES):
                rows = i0 + tl.arange(0, BM)
                gq = _gates(g_ptr, rows, BM, HAS_GATE)
                if i0 == j0:   # the block's own queries: masked, the exponent whole
                    ext = _masked_factors(gq[None, :], gk[:, None], rows[None, :] >= cols[:, None], ls2, scale,
                                          HAS_GATE)
                else:          # later queries: every key visible, the factors split at the block's last key
                    ext = bj[:, None] * _row_factors(gq, g_ref, ls2, scale, BM, HAS_GATE)[None, :]
                dv, dk, dg = _dkv_queries(Q, DO, DEN, DELTA, bh, Tp, rows, kk, vv, ext, dv, dk, dg, DK, E, INTERP,
                                          OPDT)
        dk = dk * 2.0
        tl.store(DKO + bkv * Tp * DK + cols[:, None] * DK + di[None, :], dk.to(DKO.dtype.element_ty))
        tl.store(DVO + bkv * Tp * E + cols[:, None] * E + ei[None, :], dv.to(DVO.dtype.element_ty))
        tl.store(DGK + bkv * Tp + cols, dg)


@functools.lru_cache(maxsize=64)
def _steps(nb: int, fb: int, fa: int, device: torch.device) -> Tensor:
    """Feature steps as int32 ``[NS * 3]``: (first ``a`` column, first ``b`` column, query weight) for every
    pair of ``fb``-wide column blocks ``A <= B`` and every run of ``fa`` values of ``a`` in ``A``: the order of
    the state's rows. Cached: a host-to-device copy per call would wait for the queued work."""
    rows = [(a * fb + a0, b * fb, 1 if a == b else 2)
            for a in range(nb) for b in range(a, nb) for a0 in range(0, fb, fa)]
    return torch.tensor([x for r in rows for x in r], dtype=torch.int32, device=device)


@dataclass
class _Geometry:
    B: int
    Hq: int
    Hkv: int
    T: int
    DK: int
    E: int
    C: int
    NC: int
    NB: int
    NP: int
    BM: int
    BC: int      # rows per step of the state-delta kernel
    FB: int      # width of a column block: a block pair holds FB x FB features
    FA: int      # values of ``a`` per feature step of the backward's chunk kernels
    FA_state: int  # ... of the state-delta kernel
    FA_out: int    # ... of the forward's chunk kernel
    cuda: tuple    # the Hopper kernels (hopper.py) that run instead of Triton's: KernelConfig.cuda resolved

    @property
    def Tp(self) -> int:
        return self.NC * self.C

    def loop_stages(self, cfg: "KernelConfig") -> int:
        """Pipeline stages of the chunk kernels' loops (feature steps, blocks inside the chunk): 1 where a chunk
        is one block. Pipelined there, both loops faulted with an illegal address (H100, triton 3.6, chunk 64,
        d 16 and 32, 3 stages, 4 warps; fine with 1 stage); the in-chunk loop then has a single trip anyway."""
        return 1 if self.C == self.BM else cfg.stages_chunk

    @property
    def F(self) -> int:
        return self.NP * self.FB * self.FB

    def NS(self, fa: int) -> int:
        """Feature steps of ``fa`` values of ``a``."""
        return self.NP * (self.FB // fa)

    def deltas_segments(self, device: torch.device, backward: bool) -> int:
        """``hopper.segments`` for the CUDA deltas kernel's grid: ``NS + 1`` blocks a KV head (``Z``'s the last),
        ``NC - 1`` chunk slots of ``C`` tokens (backward: of each of the KV head's query heads), the carry reading
        and writing every KV head's ``S`` (bf16) and ``Z`` (fp32) a slot."""
        rows = self.B * self.Hkv
        return hopper.segments((self.NS(self.FA_state) + 1) * rows, self.NC - 1,
                               self.C * (self.Hq // self.Hkv if backward else 1),
                               2 * rows * (2 * self.F * self.E + 4 * self.DK * self.DK), device)

    def features(self, fa: int) -> dict:
        """A kernel's feature-step arguments at ``fa`` values of ``a`` per step."""
        return dict(FB=self.FB, FA=fa, F=self.F, NS=self.NS(fa))


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _pow2_at_least(x: int) -> int:
    """The smallest power of two ``>= x`` (``triton.next_power_of_2`` costs microseconds a call in triton 3.8)."""
    return 1 << max(x - 1, 0).bit_length()


def _geometry(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, cfg: KernelConfig) -> _Geometry:
    B, Hq, T, DK = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    C = chunk_size
    NC = max(1, -(-T // C))
    for name, x, lo, hi in (("block", cfg.block, 16, 1 << 10), ("state_rows", cfg.state_rows, 16, 1 << 10),
                            ("feature_block", cfg.feature_block, 8, 16), ("scan_block", cfg.scan_block, 16, 1 << 16),
                            ("feature_rows", cfg.feature_rows, 2, 16),   # capped at the block width below
                            ("state_feature_rows", cfg.state_feature_rows, 2, 16),
                            ("out_feature_rows", cfg.out_feature_rows, 2, 16),
                            ("scan_unroll", cfg.scan_unroll, 1, 16)):
        if not _power_of_two(x) or not lo <= x <= hi:
            raise ValueError(f"KernelConfig.{name} must be a power of two in [{lo}, {hi}], got {x}")
    FB = min(cfg.feature_block, DK)
    NB = DK // FB
    NP = NB * (NB + 1) // 2
    if NC > GRID_MAX:
        raise ValueError(f"{NC} chunks exceed the kernel's grid ({GRID_MAX}): use a larger chunk_size than {C} "
                         f"for T={T}")
    if B * Hq > GRID_MAX:
        raise ValueError(f"batch x query heads = {B} x {Hq} = {B * Hq} exceeds the kernel's grid ({GRID_MAX}): "
                         f"split the batch")
    def fa(rows: int) -> int:  # a step holds at most 256 x 64 / e features (a delta program's fp32 accumulator)
        return min(rows, FB, max(2, 16384 // (FB * E)))

    def why_not(name: str) -> str | None:
        rows = cfg.out_feature_rows if name in ("out", "out_state") else cfg.state_feature_rows
        return hopper.why_not(name, q, DK, E, FB, fa(rows), C, cfg.operands)

    if isinstance(cfg.cuda, tuple):
        if "out" in cfg.cuda and "out_state" in cfg.cuda:
            raise ValueError("KernelConfig.cuda names both 'out' and 'out_state': the CUDA output kernel computes the "
                             "state part itself")
        for name in cfg.cuda:
            if (why := why_not(name)) is not None:
                raise ValueError(f"KernelConfig(cuda=({name!r},)) cannot run here: {why}")
    elif cfg.cuda != "auto":
        raise ValueError(f"KernelConfig.cuda takes 'auto' or a tuple of kernel names (e.g. ('deltas', 'out')), "
                         f"got {cfg.cuda!r}")
    BM = min(cfg.block, C)
    if BM == C >= 64 and DK <= 32:
        # a chunk of one 64-row block with d <= 32 made _bwd_dkv touch shared/local memory out of range (H100,
        # triton 3.6, compute-sanitizer; at any pipeline depth): two blocks per chunk instead
        BM = C // 2
    g = _Geometry(B, Hq, Hkv, T, DK, E, C, NC, NB, NP, BM, min(cfg.state_rows, C), FB, fa(cfg.feature_rows),
                  fa(cfg.state_feature_rows), fa(cfg.out_feature_rows), cfg.cuda)
    if cfg.cuda == "auto":   # the CUDA kernels wherever they run (measured faster, notes v10-v16)
        g.cuda = tuple(name for name in AUTO if NC > 1 and why_not(name) is None
                       and hopper.compiles(name, q.device.index))
    return g


def _pad(x: Tensor, g: _Geometry) -> Tensor:
    return (x if g.Tp == g.T else F.pad(x, (0, 0, 0, g.Tp - g.T))).contiguous()


def _launch(name: str, kernel, grid, *args, **kwargs) -> None:
    LAUNCHES[name] = kernel[grid](*args, **kwargs)


def _product_type(x: Tensor, cfg: KernelConfig):
    """Where features are multiplied: in bf16 for bf16 inputs on the bf16 path (the same rounding as a float32
    product cast to bf16), in float32 otherwise (fp16 inputs: bf16 factors would round twice; the interpreter:
    its bf16 arithmetic is wrong in triton 3.8, like its bf16 dot)."""
    fast = x.dtype == torch.bfloat16 and cfg.operands == "bf16" and not _interpreting()
    return tl.bfloat16 if fast else tl.float32


def _states(X, Y, G, den, delta, g: _Geometry, cfg: KernelConfig, scale: float, has_gate: bool,
            backward: bool) -> tuple[Tensor, Tensor]:
    """Kernels 1 and 2: states ``[B*Hkv, NC - 1, F, E]`` (cfg's state dtype) and ``Z [B*Hkv, NC - 1, d, d]`` (fp32)
    between chunks: slot ``m`` is the state leaving chunk ``m`` (forward), or its gradient (``backward``). The
    state entering chunk 0 and the gradient of the one leaving the last chunk are zero and not stored."""
    slots = max(g.NC - 1, 1)                      # one unread slot when there is a single chunk
    SB = torch.empty(g.B * g.Hkv, slots, g.F, g.E, device=X.device, dtype=cfg.state_dtype)
    ZB = torch.empty(g.B * g.Hkv, slots, g.DK, g.DK, device=X.device, dtype=torch.float32)
    if g.NC == 1:
        return SB, ZB
    steps, ns = _steps(g.NB, g.FB, g.FA_state, X.device), g.NS(g.FA_state)
    if "deltas" in g.cuda:   # S and Z on wgmma (hopper.py), summed there in segments
        nseg = g.deltas_segments(X.device, backward)
        hopper.state_deltas(X, Y, G, steps, SB, ZB, den, delta, ns=ns, nc=g.NC, chunk=g.C, f=g.F, hq=g.Hq,
                            hkv=g.Hkv, batch=g.B, scale=scale, has_gate=has_gate, backward=backward, nseg=nseg)
        if nseg > 1:
            _scan_launch(SB, ZB, G, g, cfg, has_gate, backward, -(-(g.NC - 1) // nseg))
        return SB, ZB
    _launch("bwd_deltas" if backward else "fwd_deltas", _state_deltas, (ns + 1, g.NC - 1, g.B * g.Hkv),
            X, Y, G, steps, SB, ZB, den, delta, g.NC, scale, HQ=g.Hq,
            HKV=g.Hkv, BACKWARD=backward, HAS_GATE=has_gate, C=g.C, BC=g.BC, DK=g.DK, E=g.E,
            **g.features(g.FA_state), INTERP=_interpreting(), OPDT=cfg.operand_type(),
            PDT=_product_type(X, cfg), num_warps=cfg.warps_state, num_stages=cfg.stages_state)
    _scan_launch(SB, ZB, G, g, cfg, has_gate, backward, 1)
    return SB, ZB


def _scan_launch(SB: Tensor, ZB: Tensor, G: Tensor, g: _Geometry, cfg: KernelConfig, has_gate: bool,
                 backward: bool, seg: int) -> None:
    """``_scan`` over ``SB`` and ``ZB`` in place, in segments of ``seg`` slots."""
    LS, LZ = g.F * g.E, g.DK * g.DK
    block_s, block_z = (min(cfg.scan_block, _pow2_at_least(L)) for L in (LS, LZ))
    nps = -(-LS // block_s)
    _launch("scan", _scan, (nps - (-LZ // block_z), g.B * g.Hkv), SB, ZB, G, g.NC, LS, LZ, nps, seg,
            HAS_GATE=has_gate, REVERSE=backward, C=g.C, BLOCK_S=block_s, BLOCK_Z=block_z, U=cfg.scan_unroll,
            num_warps=4)


class _PowerRetentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_g, chunk_size, scale, cfg, return_den):
        g = _geometry(q, k, v, chunk_size, cfg)
        qp, kp, vp = _pad(q, g), _pad(k, g), _pad(v, g)
        has_gate = log_g is not None
        if has_gate:   # one launch: a small call's time is mostly the host's, ~30 us an operation (H100 machine)
            G = torch.empty(g.B, g.Hkv, g.Tp, device=q.device, dtype=torch.float32)
            _launch("gate_sums", _gate_sums, (g.NC, g.B * g.Hkv), log_g.contiguous(), G, g.T, g.NC, C=g.C,
                    BLK=min(_pow2_at_least(g.C), GATE_BLOCK), num_warps=4)
        else:
            G = torch.zeros(1, device=q.device, dtype=torch.float32)
        SB, ZB = _states(kp, vp, G, None, None, g, cfg, scale, has_gate, backward=False)
        O = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=q.dtype)
        O32 = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=torch.float32)  # for the backward's delta
        DEN = torch.empty(g.B, g.Hq, g.Tp, device=q.device, dtype=torch.float32)
        steps = _steps(g.NB, g.FB, g.FA_out, q.device)
        if "out" in g.cuda:
            hopper.forward_out(qp, kp, vp, G, steps, SB, ZB, O, O32, DEN, ns=g.NS(g.FA_out), nc=g.NC, chunk=g.C,
                               f=g.F, hq=g.Hq, hkv=g.Hkv, batch=g.B, scale=scale, has_gate=has_gate)
        else:
            state_in = "out_state" in g.cuda and g.NC > 1
            US = O32                                     # not read unless the CUDA kernel wrote the state part
            if state_in:
                US = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=torch.float32)
                hopper.state_out(qp, G, SB, US, nc=g.NC, chunk=g.C, f=g.F, hq=g.Hq, hkv=g.Hkv, batch=g.B,
                                 scale=scale, has_gate=has_gate)
            # with its state part read in, 4 warps of _fwd_out fit 168 registers without spilling (Triton 3.6 takes
            # 185): 3 programs an SM instead of 2, 0.73 -> 0.63 ms at 4K (H100, notes v17)
            cap = {"maxnreg": STATE_IN_REGISTERS} if state_in and cfg.warps_out == 4 else {}
            _launch("fwd_out", _fwd_out, (g.Tp // g.BM, g.B * g.Hq),
                    qp, kp, vp, G, steps, SB, ZB, O, O32, DEN, US, g.NC, scale, HQ=g.Hq,
                    HKV=g.Hkv, HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, **g.features(g.FA_out),
                    INTERP=_interpreting(), OPDT=cfg.operand_type(), PDT=_product_type(q, cfg),
                    LOOP_STAGES=g.loop_stages(cfg), num_warps=cfg.warps_out, num_stages=cfg.stages_chunk,
                    STATE_IN=state_in, **cap)
        ctx.save_for_backward(qp, kp, vp, G, O32, DEN, SB, ZB)
        ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate = g, scale, cfg, has_gate
        ctx.log_g_dtype = None if log_g is None else log_g.dtype
        if return_den:   # the fp32 output and its normaliser, the sum of the row's weights
            return O32[:, :, :g.T], DEN[:, :, :g.T]
        return O if g.T == g.Tp else O[:, :, :g.T].contiguous()

    @staticmethod
    def backward(ctx, do, dden=None):
        qp, kp, vp, G, O32, DEN, SB, ZB = ctx.saved_tensors
        g, scale, cfg, has_gate = ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate
        steps = _steps(g.NB, g.FB, g.FA, qp.device)
        common = dict(HQ=g.Hq, HKV=g.Hkv, HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, **g.features(g.FA),
                      INTERP=_interpreting(), OPDT=cfg.operand_type(), LOOP_STAGES=g.loop_stages(cfg),
                      num_warps=cfg.warps_chunk, num_stages=cfg.stages_chunk)
        dop = _pad(do.to(qp.dtype), g)
        dev = qp.device
        # delta_i = do_i . o_i, written by kernel 4 from the fp32 output: with the rounded one, the cancellation
        # in (do_i . v_j - delta_i) made dq, dk ~10x less accurate (seen: 2.4e-2 vs 1.7e-3, bf16, gated)
        delta = torch.empty(g.B, g.Hq, g.Tp, device=dev, dtype=torch.float32)
        dq = torch.empty(g.B, g.Hq, g.Tp, g.DK, device=dev, dtype=qp.dtype)
        dgq = torch.empty(g.B, g.Hq, g.Tp, device=dev, dtype=torch.float32)
        state_in = "dq" in g.cuda and g.NC > 1
        US, VS = dq, dgq                                 # not read unless the CUDA kernel wrote the state part
        if state_in:
            US = torch.empty(g.B, g.Hq, g.Tp, g.DK, device=dev, dtype=torch.float32)
            VS = torch.empty(g.B, g.Hq, g.Tp, device=dev, dtype=torch.float32)
            hopper.state_dq(qp, dop, DEN, G, SB, US, VS, nc=g.NC, chunk=g.C, f=g.F, hq=g.Hq, hkv=g.Hkv, batch=g.B,
                            scale=scale, has_gate=has_gate)
        dq_launch = common
        if state_in and cfg.warps_chunk == 4:   # 2 stages and 168 registers (14 spilled): 3 programs an SM instead
            stages = min(cfg.stages_chunk, 2)    # of 2, 0.80 -> 0.72-0.74 ms at 4K (H100, notes v18)
            dq_launch = dict(common, num_stages=stages, LOOP_STAGES=min(g.loop_stages(cfg), stages),
                             maxnreg=STATE_IN_REGISTERS)
        ddenp = DEN if dden is None else F.pad(dden.float(), (0, g.Tp - g.T)).contiguous()
        _launch("bwd_dq", _bwd_dq, (g.Tp // g.BM, g.B * g.Hq),
                qp, kp, vp, G, steps, SB, ZB, dop, O32, DEN, ddenp, delta, dq, dgq, US, VS, g.NC, scale,
                STATE_IN=state_in, HAS_DDEN=dden is not None, **dq_launch)
        DSB, DZB = _states(qp, dop, G, DEN, delta, g, cfg, scale, has_gate, backward=True)
        dk = torch.empty(g.B, g.Hkv, g.Tp, g.DK, device=dev, dtype=kp.dtype)
        dv = torch.empty(g.B, g.Hkv, g.Tp, g.E, device=dev, dtype=vp.dtype)
        dgk = torch.empty(g.B, g.Hkv, g.Tp, device=dev, dtype=torch.float32)
        state_in = "dkv" in g.cuda and g.NC > 1
        DKS, DVS, DGS = dk, dv, dgk                      # not read unless the CUDA kernel wrote the state part
        if state_in:
            DKS = torch.empty(g.B, g.Hkv, g.Tp, g.DK, device=dev, dtype=torch.float32)
            DVS = torch.empty(g.B, g.Hkv, g.Tp, g.E, device=dev, dtype=torch.float32)
            DGS = torch.empty(g.B, g.Hkv, g.Tp, device=dev, dtype=torch.float32)
            hopper.state_dkv(kp, vp, G, DSB, DKS, DVS, DGS, nc=g.NC, chunk=g.C, f=g.F, batch=g.B, hkv=g.Hkv,
                             has_gate=has_gate)
        _launch("bwd_dkv", _bwd_dkv, (g.Tp // g.BM, g.B * g.Hkv),
                qp, kp, vp, G, steps, DSB, DZB, dop, DEN, delta, dk, dv, dgk, DKS, DVS, DGS, g.NC, scale,
                PDT=_product_type(kp, cfg), STATE_IN=state_in, **common)
        dlog_g = None
        if has_gate and ctx.needs_input_grad[3]:
            dlog_g = torch.empty(g.B, g.Hkv, g.T, device=dev, dtype=ctx.log_g_dtype)
            blk = min(_pow2_at_least(g.T), GATE_BLOCK)
            _launch("gate_grad", _gate_grad, (-(-g.T // (GATE_PIECE * blk)), g.B * g.Hkv), dgq, dgk, dlog_g, g.T,
                    g.Tp, REP=g.Hq // g.Hkv, BLK=blk, PIECE=GATE_PIECE * blk, num_warps=8)
        T = g.T
        return dq[:, :, :T], dk[:, :, :T], dv[:, :, :T], dlog_g, None, None, None, None


def power_retention_triton(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, chunk_size: int = 128,
                           scale: float | None = None, config: KernelConfig | None = None,
                           return_den: bool = False):
    """Deg-2 power retention through the Triton kernels, differentiable in ``q, k, v, log_g``.

    ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]`` fp16/bf16, ``log_g [B,Hkv,T]`` (float32 advised),
    ``d, e`` in 16, 32, 64, 128, ``chunk_size`` 16, 32 or a multiple of 64. Returns ``o [B,Hq,T,e]``; with
    ``return_den``, ``(o, den)`` in float32 instead, ``den [B,Hq,T]`` the sum of each row's weights (``o = num /
    den``, 0 where ``den = 0``), both differentiable: what continuing from an incoming state needs
    (``power.continued``).
    """
    if not _supported(q, v, 2, chunk_size):
        raise ValueError(f"power_retention_triton needs triton, CUDA (or TRITON_INTERPRET=1), fp16/bf16 inputs, "
                         f"head dims d, e in (16, 32, 64, 128) and chunk_size 16, 32 or a multiple of 64; "
                         f"got {q.dtype} on {q.device}, d={q.shape[-1]}, e={v.shape[-1]}, chunk_size={chunk_size}")
    check_qkv(q, k, v)
    log_g = check_gate(log_g, k, poison=False)     # poisoned, floored by the forward's first kernel: no autograd node
    return _PowerRetentionFn.apply(q, k, v, log_g, chunk_size, default_scale(q.shape[-1], scale),
                                   config or KernelConfig(), bool(return_den))
