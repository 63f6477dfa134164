"""Triton kernels for chunked power retention, deg 2, forward and backward (reference:
``longctx.mechanisms.power.chunk.power_retention_chunk``; oracle: ``...power.naive``).

Features. ``(q . k)^2 = sum_{a,b} q_a q_b k_a k_b``. The ``d`` coordinates are cut into ``NB = d / 16`` blocks;
for every pair of blocks ``A <= B`` one tile of 16 x 16 = 256 features ``k_a k_b`` (``a in A, b in B``, row
``a * 16 + b`` of the tile) is kept, the query side carrying weight 1 on diagonal tiles and 2 off them.
``NP = NB (NB + 1) / 2`` tiles: 2560 features for ``d = 64`` (the symmetric power has 2080; the 23% extra buys
whole 16-wide tensor-core tiles). A tile's features are built in registers from two 16-column blocks of the
input, ``x_A[:, :, None] * x_B[:, None, :]`` reshaped to ``[rows, 256]``; the chain rule back through a tile
is two reductions of the ``[rows, 16, 16]`` feature gradient (no gathers, no scatters).

Kernels (``C`` = chunk, ``n`` = chunk index, ``G`` = cumulative log-gate, float32):

1. ``_fwd_state``  grid (tiles x value splits, B*Hkv): walks the chunks in order, keeps its slice of
   ``S`` (fp32, registers) and writes the state entering every chunk (bf16) and ``z`` (fp32).
2. ``_fwd_out``    grid (T / BM, B*Hq): per query block, the attention-like part inside the chunk plus the
   state part ``scale^2 exp(G_i - G_start) phi(q_i) . S_n``; writes ``o`` (and fp32 ``o``, the normaliser).
3. ``_bwd_state``  grid as 1, reverse walk: the gradient of every chunk's outgoing state.
4. ``_bwd_dq``     grid as 2.
5. ``_bwd_dkv``    grid (T / BM, B*Hkv), summing over the query heads of its KV head (GQA).

Gate gradient. Every weight is ``w_ij = (scale q_i . k_j)^2 exp(G_i - G_j)``, so
``dL/dG_t = sum_j dL/dw_tj w_tj - sum_i dL/dw_it w_it``: kernels 4 and 5 accumulate the two sums in fp32 (for
the state parts they are ``phi(q_i) . g_i`` and ``phi(k_j) . g_j`` with ``g`` the feature gradients), and
``d log_g`` is the reverse cumulative sum. Matmul operands are bf16 (fp16 inputs too: the states and the power
weights need bf16's range), accumulation fp32. Plain ``@triton.jit`` without autotuning, so the same code runs
under ``TRITON_INTERPRET=1`` on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths work without triton
    triton = None

BLK = 16  # feature block edge: one pair tile = BLK x BLK features
HEAD_DIMS = (16, 32, 64, 128)  # d and e: powers of two (block counts and ranges in the kernels)
LAUNCHES: dict = {}  # name -> the last compiled kernel launched (the benchmark reads registers and spills)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_applies(q: Tensor, k: Tensor, v: Tensor, deg: int, chunk_size: int) -> bool:
    """Whether ``power_retention_triton`` can run these inputs (device: CUDA, or CPU under the interpreter)."""
    d, e = q.shape[-1], v.shape[-1]
    chunk_ok = chunk_size in (16, 32) or (chunk_size > 0 and chunk_size % 64 == 0)
    return (triton is not None and (q.is_cuda or _interpreting()) and deg == 2
            and q.dtype in (torch.float16, torch.bfloat16) and d in HEAD_DIMS and e in HEAD_DIMS and chunk_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes. ``block``: query/key rows per program of the chunk kernels (capped at the chunk);
    ``state_rows``: rows per step of the state kernels; ``value_split``: the state kernels cut the value dim
    into this many programs (``None``: enough to make ~264 programs, two per SM of an H100); ``operands``: matmul
    operand type, ``"bf16"`` (fast path) or ``"fp32"`` with fp32 state snapshots (tf32 on a GPU, exact fp32
    under the interpreter: the tests use it to check every term tightly)."""
    block: int = 32          # fastest on an H100 (benchmarks/README.md); 64 spills registers in _fwd_out
    state_rows: int = 32
    value_split: int | None = None
    warps_state: int = 8
    warps_chunk: int = 8
    stages: int = 2
    operands: str = "bf16"

    def operand_type(self):
        if self.operands not in ("bf16", "fp32"):
            raise ValueError(f"operands must be 'bf16' or 'fp32', got {self.operands!r}")
        return tl.bfloat16 if self.operands == "bf16" else tl.float32

    @property
    def state_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.operands == "bf16" else torch.float32


if triton is not None:

    @triton.jit
    def _mm(a, b, INTERP: tl.constexpr):
        """``tl.dot`` with fp32 accumulation; under the interpreter (whose bf16 dot is wrong in triton 3.8) the
        16-bit operands are widened to fp32 first, which gives the same products."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a, b)

    @triton.jit
    def _blocks(x_ptr, rows, A, B, DK: tl.constexpr, BLK: tl.constexpr):
        """Column blocks ``x[rows, A*BLK:(A+1)*BLK]`` and ``x[rows, B*BLK:...]``, ``[R, BLK]`` float32 each."""
        c = tl.arange(0, BLK)
        xa = tl.load(x_ptr + rows[:, None] * DK + (A * BLK + c)[None, :]).to(tl.float32)
        xb = tl.load(x_ptr + rows[:, None] * DK + (B * BLK + c)[None, :]).to(tl.float32)
        return xa, xb

    @triton.jit
    def _tile(xa, xb, R: tl.constexpr, BLK: tl.constexpr):
        """Features of one tile, ``[R, BLK*BLK]``: column ``a*BLK + b`` is ``xa[:, a] * xb[:, b]``."""
        return tl.reshape(xa[:, :, None] * xb[:, None, :], (R, BLK * BLK))

    @triton.jit
    def _tile_t(x_ptr, rows, A, B, R: tl.constexpr, DK: tl.constexpr, BLK: tl.constexpr):
        """The transposed tile ``[BLK*BLK, R]`` (row ``a*BLK + b``), loaded column-major: no transpose needed."""
        c = tl.arange(0, BLK)
        xa = tl.load(x_ptr + rows[None, :] * DK + (A * BLK + c)[:, None]).to(tl.float32)      # [BLK, R]
        xb = tl.load(x_ptr + rows[None, :] * DK + (B * BLK + c)[:, None]).to(tl.float32)
        return tl.reshape(xa[:, None, :] * xb[None, :, :], (BLK * BLK, R))

    @triton.jit
    def _fold_cols(g, xa, xb, A: tl.constexpr, B: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                   BLK: tl.constexpr):
        """Chain rule through one tile: ``g [R, BLK*BLK]`` (gradient of the features) -> the gradient of ``x``
        as ``[R, NB, BLK]`` (non-zero in column blocks A and B): ``dx_a = sum_b g_ab x_b``, ``dx_b = sum_a g_ab x_a``."""
        g3 = tl.reshape(g, (R, BLK, BLK))
        da = tl.sum(g3 * xb[:, None, :], 2)
        db = tl.sum(g3 * xa[:, :, None], 1)
        nb = tl.arange(0, NB)
        return (da[:, None, :] * (nb == A).to(tl.float32)[None, :, None]
                + db[:, None, :] * (nb == B).to(tl.float32)[None, :, None])

    @triton.jit
    def _fwd_state(K, V, G, PAIRS, SB, ZB, NC,
                   HAS_GATE: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, DK: tl.constexpr,
                   E: tl.constexpr, BE: tl.constexpr, NE: tl.constexpr, BLK: tl.constexpr, F: tl.constexpr,
                   INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_f = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        FT: tl.constexpr = BLK * BLK
        t = pid_f // NE
        et = pid_f % NE
        A = tl.load(PAIRS + 2 * t)
        B = tl.load(PAIRS + 2 * t + 1)
        fi = tl.arange(0, FT)
        ce = et * BE + tl.arange(0, BE)
        Tp = NC * C
        k_ptr = K + bkv * Tp * DK
        v_ptr = V + bkv * Tp * E
        g_ptr = G + bkv * Tp
        s_ptr = SB + bkv * NC * F * E + t * FT * E
        z_ptr = ZB + bkv * NC * F + t * FT
        S = tl.zeros([FT, BE], dtype=tl.float32)
        z = tl.zeros([FT], dtype=tl.float32)
        for n in range(NC):
            tl.store(s_ptr + n * F * E + fi[:, None] * E + ce[None, :], S.to(SB.dtype.element_ty))
            tl.store(z_ptr + n * F + fi, z, mask=(fi < FT) & (et == 0))
            c0 = n * C
            if HAS_GATE:
                g_end = tl.load(g_ptr + c0 + C - 1)
                decay = tl.exp(g_end - tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0))
                S = S * decay
                z = z * decay
            for s0 in range(0, C, BC):
                rows = c0 + s0 + tl.arange(0, BC)
                phit = _tile_t(k_ptr, rows, A, B, BC, DK, BLK)                               # [FT, BC]
                vv = tl.load(v_ptr + rows[:, None] * E + ce[None, :]).to(tl.float32)
                if HAS_GATE:
                    beta = tl.exp(g_end - tl.load(g_ptr + rows))
                    vv = vv * beta[:, None]
                    z += tl.sum(phit * beta[None, :], 1)
                else:
                    z += tl.sum(phit, 1)
                S += _mm(phit.to(OPDT), vv.to(OPDT), INTERP)

    @triton.jit
    def _fwd_out(Q, K, V, G, SB, ZB, O, O32, DEN, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NB: tl.constexpr,
                 F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        FT: tl.constexpr = BLK * BLK
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
        num = tl.zeros([BM, E], dtype=tl.float32)
        den = tl.zeros([BM], dtype=tl.float32)
        if HAS_GATE:
            gi = tl.load(g_ptr + rows)
            r = scale * scale * tl.exp(gi - tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0))
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        for j0 in range(c0, m0 + BM, BM):  # inside the chunk: keys c0 .. m0 + BM - 1
            cols = j0 + tl.arange(0, BM)
            kk = tl.load(k_ptr + cols[:, None] * DK + di[None, :])
            vv = tl.load(v_ptr + cols[:, None] * E + ei[None, :])
            x = _mm(q, tl.trans(kk), INTERP) * scale
            vis = rows[:, None] >= cols[None, :]
            if HAS_GATE:
                w = x * x * tl.exp(tl.where(vis, gi[:, None] - tl.load(g_ptr + cols)[None, :], float("-inf")))
            else:
                w = tl.where(vis, x * x, 0.0)
            # the normaliser sums the same rounded weights the numerator uses: a row is then an exact convex
            # combination of its values (row 0 returns v_0 exactly), which keeps do.v - delta free of rounding
            # bias in the backward (seen without: dq of a first token with a tiny weight off by 4x |dq|)
            w = w.to(OPDT)
            den += tl.sum(w.to(tl.float32), 1)
            num += _mm(w, vv.to(OPDT), INTERP)
        fi = tl.arange(0, FT)
        s_ptr = SB + (bkv * NC + n) * F * E
        z_ptr = ZB + (bkv * NC + n) * F
        acc = tl.zeros([BM, E], dtype=tl.float32)
        acc_den = tl.zeros([BM], dtype=tl.float32)
        for A in tl.static_range(NB):  # the state entering the chunk, one tile of features at a time
            for B in tl.static_range(A, NB):
                t = A * NB - A * (A - 1) // 2 + B - A
                qa, qb = _blocks(q_ptr, rows, A, B, DK, BLK)
                phi = _tile(qa, qb, BM, BLK)
                if A != B:
                    phi = phi * 2.0
                phi = phi.to(OPDT)
                acc += _mm(phi, tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :]), INTERP)
                acc_den += tl.sum(phi.to(tl.float32) * tl.load(z_ptr + t * FT + fi)[None, :], 1)
        num += acc * r[:, None]
        den += acc_den * r
        o = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(O + bh * Tp * E + rows[:, None] * E + ei[None, :], o.to(O.dtype.element_ty))
        tl.store(O32 + bh * Tp * E + rows[:, None] * E + ei[None, :], o)
        tl.store(DEN + bh * Tp + rows, den)

    @triton.jit
    def _bwd_state(Q, G, PAIRS, DO, DEN, DELTA, DSB, DZB, NC, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                   BC: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, NE: tl.constexpr,
                   BLK: tl.constexpr, F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_f = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        FT: tl.constexpr = BLK * BLK
        REP: tl.constexpr = HQ // HKV
        b = bkv // HKV
        kvh = bkv % HKV
        t = pid_f // NE
        et = pid_f % NE
        A = tl.load(PAIRS + 2 * t)
        B = tl.load(PAIRS + 2 * t + 1)
        wab = 2.0 - (A == B).to(tl.float32)
        fi = tl.arange(0, FT)
        ce = et * BE + tl.arange(0, BE)
        Tp = NC * C
        g_ptr = G + bkv * Tp
        s_ptr = DSB + bkv * NC * F * E + t * FT * E
        z_ptr = DZB + bkv * NC * F + t * FT
        dS = tl.zeros([FT, BE], dtype=tl.float32)
        dz = tl.zeros([FT], dtype=tl.float32)
        for i in range(NC):
            n = NC - 1 - i
            tl.store(s_ptr + n * F * E + fi[:, None] * E + ce[None, :], dS.to(DSB.dtype.element_ty))
            tl.store(z_ptr + n * F + fi, dz, mask=(fi < FT) & (et == 0))
            c0 = n * C
            if HAS_GATE:
                g_start = tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0)
                decay = tl.exp(tl.load(g_ptr + c0 + C - 1) - g_start)
                dS = dS * decay
                dz = dz * decay
            for s0 in range(0, C, BC):
                rows = c0 + s0 + tl.arange(0, BC)
                if HAS_GATE:
                    r = scale * scale * wab * tl.exp(tl.load(g_ptr + rows) - g_start)
                else:
                    r = tl.full([BC], scale * scale, tl.float32) * wab
                for rr in range(REP):
                    bh = b * HQ + kvh * REP + rr
                    phit = _tile_t(Q + bh * Tp * DK, rows, A, B, BC, DK, BLK) * r[None, :]            # [FT, BC]
                    den = tl.load(DEN + bh * Tp + rows)
                    den = tl.where(den == 0.0, 1.0, den)
                    do = tl.load(DO + bh * Tp * E + rows[:, None] * E + ce[None, :]).to(tl.float32)
                    dS += _mm(phit.to(OPDT), (do / den[:, None]).to(OPDT), INTERP)
                    dz += tl.sum(phit * (-tl.load(DELTA + bh * Tp + rows) / den)[None, :], 1)

    @triton.jit
    def _bwd_dq(Q, K, V, G, SB, ZB, DO, DEN, DELTA, DQ, DGQ, NC, scale,
                HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NB: tl.constexpr,
                F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        FT: tl.constexpr = BLK * BLK
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
        den = tl.where(den == 0.0, 1.0, den)
        delta = tl.load(DELTA + bh * Tp + rows)
        if HAS_GATE:
            gi = tl.load(g_ptr + rows)
            r = scale * scale * tl.exp(gi - tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0))
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        dq = tl.zeros([BM, DK], dtype=tl.float32)
        dg = tl.zeros([BM], dtype=tl.float32)  # sum_j dL/dw_ij w_ij
        for j0 in range(c0, m0 + BM, BM):
            cols = j0 + tl.arange(0, BM)
            kk = tl.load(k_ptr + cols[:, None] * DK + di[None, :])
            vv = tl.load(v_ptr + cols[:, None] * E + ei[None, :])
            x = _mm(q, tl.trans(kk), INTERP) * scale
            vis = rows[:, None] >= cols[None, :]
            if HAS_GATE:
                ex = tl.exp(tl.where(vis, gi[:, None] - tl.load(g_ptr + cols)[None, :], float("-inf")))
            else:
                ex = tl.where(vis, 1.0, 0.0)
            dw = (_mm(do, tl.trans(vv), INTERP) - delta[:, None]) / den[:, None]
            dg += tl.sum(dw * x * x * ex, 1)
            dq += _mm((dw * (2.0 * scale) * x * ex).to(OPDT), kk.to(OPDT), INTERP)
        fi = tl.arange(0, FT)
        s_ptr = SB + (bkv * NC + n) * F * E
        z_ptr = ZB + (bkv * NC + n) * F
        dnum = (do.to(tl.float32) / den[:, None]).to(OPDT)
        dden = -delta / den
        dq3 = tl.zeros([BM, NB, BLK], dtype=tl.float32)
        for A in tl.static_range(NB):
            for B in tl.static_range(A, NB):
                t = A * NB - A * (A - 1) // 2 + B - A
                st = tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :])
                g = _mm(dnum, tl.trans(st), INTERP) + dden[:, None] * tl.load(z_ptr + t * FT + fi)[None, :]
                g = g * r[:, None]
                if A != B:
                    g = g * 2.0
                qa, qb = _blocks(q_ptr, rows, A, B, DK, BLK)
                dg += tl.sum(g * _tile(qa, qb, BM, BLK), 1)
                dq3 += _fold_cols(g, qa, qb, A, B, BM, NB, BLK)
        dq += tl.reshape(dq3, (BM, DK))
        tl.store(DQ + bh * Tp * DK + rows[:, None] * DK + di[None, :], dq)
        tl.store(DGQ + bh * Tp + rows, dg)

    @triton.jit
    def _bwd_dkv(Q, K, V, G, DSB, DZB, DO, DEN, DELTA, DKO, DVO, DGK, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NB: tl.constexpr,
                 F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        FT: tl.constexpr = BLK * BLK
        REP: tl.constexpr = HQ // HKV
        b = bkv // HKV
        kvh = bkv % HKV
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
        if HAS_GATE:
            gj = tl.load(g_ptr + cols)
            beta = tl.exp(tl.load(g_ptr + c0 + C - 1) - gj)
        else:
            beta = tl.full([BM], 1.0, tl.float32)
        dk = tl.zeros([BM, DK], dtype=tl.float32)
        dv = tl.zeros([BM, E], dtype=tl.float32)
        dg = tl.zeros([BM], dtype=tl.float32)  # sum_i dL/dw_ij w_ij
        for rr in range(REP):
            bh = b * HQ + kvh * REP + rr
            for i0 in range(j0, c0 + C, BM):
                rows = i0 + tl.arange(0, BM)
                q = tl.load(Q + bh * Tp * DK + rows[:, None] * DK + di[None, :])
                do = tl.load(DO + bh * Tp * E + rows[:, None] * E + ei[None, :])
                den = tl.load(DEN + bh * Tp + rows)
                den = tl.where(den == 0.0, 1.0, den)
                delta = tl.load(DELTA + bh * Tp + rows)
                xt = _mm(kk, tl.trans(q), INTERP) * scale                               # [keys, queries]
                vis = rows[None, :] >= cols[:, None]
                if HAS_GATE:
                    ex = tl.exp(tl.where(vis, tl.load(g_ptr + rows)[None, :] - gj[:, None], float("-inf")))
                else:
                    ex = tl.where(vis, 1.0, 0.0)
                wt = xt * xt * ex
                dv += _mm(wt.to(OPDT), (do.to(tl.float32) / den[:, None]).to(OPDT), INTERP)
                dwt = (_mm(vv, tl.trans(do), INTERP) - delta[None, :]) / den[None, :]
                dg += tl.sum(dwt * wt, 1)
                dk += _mm((dwt * (2.0 * scale) * xt * ex).to(OPDT), q.to(OPDT), INTERP)
        fi = tl.arange(0, FT)
        s_ptr = DSB + (bkv * NC + n) * F * E
        z_ptr = DZB + (bkv * NC + n) * F
        vb = vv.to(OPDT)
        dk3 = tl.zeros([BM, NB, BLK], dtype=tl.float32)
        for A in tl.static_range(NB):
            for B in tl.static_range(A, NB):
                t = A * NB - A * (A - 1) // 2 + B - A
                dst = tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :])
                ka, kb = _blocks(k_ptr, cols, A, B, DK, BLK)
                phi = _tile(ka, kb, BM, BLK)
                dv += _mm(phi.to(OPDT), dst, INTERP) * beta[:, None]
                gk = (_mm(vb, tl.trans(dst), INTERP) + tl.load(z_ptr + t * FT + fi)[None, :]) * beta[:, None]
                dg += tl.sum(gk * phi, 1)
                dk3 += _fold_cols(gk, ka, kb, A, B, BM, NB, BLK)
        dk += tl.reshape(dk3, (BM, DK))
        tl.store(DKO + bkv * Tp * DK + cols[:, None] * DK + di[None, :], dk)
        tl.store(DVO + bkv * Tp * E + cols[:, None] * E + ei[None, :], dv)
        tl.store(DGK + bkv * Tp + cols, dg)


def _pairs(nb: int, device) -> Tensor:
    """Block pairs ``(A, B)``, ``A <= B``, as int32 ``[NP * 2]``: the tile order of the state (the chunk kernels
    walk the same order statically)."""
    return torch.tensor([x for a in range(nb) for b in range(a, nb) for x in (a, b)], dtype=torch.int32,
                        device=device)


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
    BC: int      # rows per step of the state kernels
    NE: int      # value splits of the state kernels

    @property
    def Tp(self) -> int:
        return self.NC * self.C

    @property
    def F(self) -> int:
        return self.NP * BLK * BLK

    @property
    def BE(self) -> int:
        return self.E // self.NE


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _geometry(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, cfg: KernelConfig) -> _Geometry:
    B, Hq, T, DK = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    C = chunk_size
    NC = max(1, -(-T // C))
    NB = DK // BLK
    NP = NB * (NB + 1) // 2
    for name, x, lo in (("block", cfg.block, 16), ("state_rows", cfg.state_rows, 16)):
        if not _power_of_two(x) or x < lo:
            raise ValueError(f"KernelConfig.{name} must be a power of two >= {lo}, got {x}")
    if cfg.value_split is not None:
        NE = cfg.value_split
        if not _power_of_two(NE) or E // NE < 16:
            raise ValueError(f"KernelConfig.value_split must be a power of two leaving >= 16 values per split, "
                             f"got {NE} for e={E}")
    else:
        # the state kernels walk the chunks in order: split the value dim until there are ~264 programs
        NE = 1
        while NP * B * Hkv * NE < 264 and E // (2 * NE) >= 16:
            NE *= 2
    return _Geometry(B, Hq, Hkv, T, DK, E, C, NC, NB, NP, min(cfg.block, C), min(cfg.state_rows, C), NE)


def _pad(x: Tensor, g: _Geometry) -> Tensor:
    return F.pad(x, (0, 0, 0, g.Tp - g.T)).contiguous()


def _launch(name: str, kernel, grid, *args, **kwargs) -> None:
    LAUNCHES[name] = kernel[grid](*args, **kwargs)


class _PowerRetentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_g, chunk_size, scale, cfg):
        g = _geometry(q, k, v, chunk_size, cfg)
        qp, kp, vp = _pad(q, g), _pad(k, g), _pad(v, g)
        has_gate = log_g is not None
        if has_gate:
            G = torch.cumsum(F.pad(log_g.float(), (0, g.Tp - g.T)), -1).contiguous()
        else:
            G = torch.zeros(1, device=q.device, dtype=torch.float32)
        pairs = _pairs(g.NB, q.device)
        common = dict(INTERP=_interpreting(), OPDT=cfg.operand_type(), num_stages=cfg.stages)
        SB = torch.empty(g.B * g.Hkv, g.NC, g.F, g.E, device=q.device, dtype=cfg.state_dtype)
        ZB = torch.empty(g.B * g.Hkv, g.NC, g.F, device=q.device, dtype=torch.float32)
        _launch("fwd_state", _fwd_state, (g.NP * g.NE, g.B * g.Hkv),
                kp, vp, G, pairs, SB, ZB, g.NC, HAS_GATE=has_gate, C=g.C, BC=g.BC, DK=g.DK, E=g.E, BE=g.BE,
                NE=g.NE, BLK=BLK, F=g.F, num_warps=cfg.warps_state, **common)
        O = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=q.dtype)
        O32 = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=torch.float32)  # for the backward's delta
        DEN = torch.empty(g.B, g.Hq, g.Tp, device=q.device, dtype=torch.float32)
        _launch("fwd_out", _fwd_out, (g.Tp // g.BM, g.B * g.Hq),
                qp, kp, vp, G, SB, ZB, O, O32, DEN, g.NC, scale, HQ=g.Hq, HKV=g.Hkv, HAS_GATE=has_gate,
                C=g.C, BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NB=g.NB, F=g.F, num_warps=cfg.warps_chunk, **common)
        ctx.save_for_backward(qp, kp, vp, G, O32, DEN, SB, ZB, pairs)
        ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate = g, scale, cfg, has_gate
        ctx.log_g_dtype = None if log_g is None else log_g.dtype
        return O if g.T == g.Tp else O[:, :, :g.T].contiguous()

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, G, O32, DEN, SB, ZB, pairs = ctx.saved_tensors
        g, scale, cfg, has_gate = ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate
        common = dict(INTERP=_interpreting(), OPDT=cfg.operand_type(), num_stages=cfg.stages)
        dop = _pad(do.to(qp.dtype), g)
        # delta_i = do_i . o_i from the fp32 output: with the rounded one, the cancellation in
        # (do_i . v_j - delta_i) made dq, dk ~10x less accurate (seen: 2.4e-2 vs 1.7e-3, bf16, gated)
        delta = (dop.float() * O32).sum(-1).contiguous()                          # [B, Hq, Tp]
        DSB, DZB = torch.empty_like(SB), torch.empty_like(ZB)
        _launch("bwd_state", _bwd_state, (g.NP * g.NE, g.B * g.Hkv),
                qp, G, pairs, dop, DEN, delta, DSB, DZB, g.NC, scale, HQ=g.Hq, HKV=g.Hkv, HAS_GATE=has_gate,
                C=g.C, BC=g.BC, DK=g.DK, E=g.E, BE=g.BE, NE=g.NE, BLK=BLK, F=g.F, num_warps=cfg.warps_state,
                **common)
        dev = qp.device
        dq = torch.empty(g.B, g.Hq, g.Tp, g.DK, device=dev, dtype=torch.float32)
        dgq = torch.empty(g.B, g.Hq, g.Tp, device=dev, dtype=torch.float32)
        _launch("bwd_dq", _bwd_dq, (g.Tp // g.BM, g.B * g.Hq),
                qp, kp, vp, G, SB, ZB, dop, DEN, delta, dq, dgq, g.NC, scale, HQ=g.Hq, HKV=g.Hkv,
                HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NB=g.NB, F=g.F,
                num_warps=cfg.warps_chunk, **common)
        dk = torch.empty(g.B, g.Hkv, g.Tp, g.DK, device=dev, dtype=torch.float32)
        dv = torch.empty(g.B, g.Hkv, g.Tp, g.E, device=dev, dtype=torch.float32)
        dgk = torch.empty(g.B, g.Hkv, g.Tp, device=dev, dtype=torch.float32)
        _launch("bwd_dkv", _bwd_dkv, (g.Tp // g.BM, g.B * g.Hkv),
                qp, kp, vp, G, DSB, DZB, dop, DEN, delta, dk, dv, dgk, g.NC, scale, HQ=g.Hq, HKV=g.Hkv,
                HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NB=g.NB, F=g.F,
                num_warps=cfg.warps_chunk, **common)
        dlog_g = None
        if has_gate and ctx.needs_input_grad[3]:
            dG = dgq.view(g.B, g.Hkv, g.Hq // g.Hkv, g.Tp).sum(2).double() - dgk.double()   # [B, Hkv, Tp]
            dlog_g = dG.flip(-1).cumsum(-1).flip(-1)[..., :g.T].to(ctx.log_g_dtype)
        T = g.T
        return (dq[:, :, :T].to(qp.dtype), dk[:, :, :T].to(kp.dtype), dv[:, :, :T].to(vp.dtype), dlog_g,
                None, None, None)


def power_retention_triton(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, chunk_size: int = 128,
                           scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """Deg-2 power retention through the Triton kernels, differentiable in ``q, k, v, log_g``.

    ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]`` fp16/bf16, ``log_g [B,Hkv,T]`` (float32 advised),
    ``d, e`` in 16, 32, 64, 128, ``chunk_size`` 16, 32 or a multiple of 64. Returns ``o [B,Hq,T,e]``.
    """
    from ..attention import check_qkv
    from ..mechanisms.power.naive import check_gate, default_scale
    if not kernel_applies(q, k, v, 2, chunk_size):
        raise ValueError(f"power_retention_triton needs triton, CUDA (or TRITON_INTERPRET=1), fp16/bf16 inputs, "
                         f"head dims d, e in (16, 32, 64, 128) and chunk_size 16, 32 or a multiple of 64; "
                         f"got {q.dtype} on {q.device}, d={q.shape[-1]}, e={v.shape[-1]}, chunk_size={chunk_size}")
    check_qkv(q, k, v)
    check_gate(log_g, k)
    return _PowerRetentionFn.apply(q, k, v, log_g, chunk_size, default_scale(q.shape[-1], scale),
                                   config or KernelConfig())
