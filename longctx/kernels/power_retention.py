"""Triton kernels for chunked power retention, deg 2, forward and backward (reference:
``longctx.mechanisms.power.chunk.power_retention_chunk``; oracle: ``...power.naive``).

Features. ``(q . k)^2 = sum_{a,b} q_a q_b k_a k_b``. The ``d`` coordinates are cut into ``NB = d / 16`` blocks;
for every pair of blocks ``A <= B`` one tile of 16 x 16 = 256 features ``k_a k_b`` (``a in A, b in B``) is kept,
the query side carrying weight 1 on diagonal tiles and 2 off them. ``NP = NB (NB + 1) / 2`` tiles: 2560
features for ``d = 64`` (the symmetric power has 2080; the 23% extra buys whole 16 x 16 tensor-core tiles).

Kernels (``C`` = chunk, ``n`` = chunk index, ``G`` = cumulative log-gate, float32):

1. ``_fwd_state``   grid (tiles x value splits, B*Hkv): walks the chunks in order, keeps its slice of the
   state ``S`` (fp32, in registers) and writes the state entering every chunk (bf16) and ``z`` (fp32).
2. ``_fwd_out``     grid (T / BM, B*Hq): per query block, the attention-like part inside the chunk plus the
   state part ``scale^2 exp(G_i - G_start) phi(q_i) . S_n``; writes ``o`` and the normaliser.
3. ``_bwd_state``   grid as 1, reverse walk: the gradient of every chunk's outgoing state.
4. ``_bwd_dq``      grid as 2.
5. ``_bwd_dkv``     grid (T / BN, B*Hkv), summing over the query heads of its KV head (GQA).

The gate's gradient needs no kernel: every weight is ``(scale q_i . k_j)^2 exp(G_i - G_j)``, homogeneous of
degree 2 in ``q_i`` and in ``k_j``, so ``dL/dG_t = (q_t . dq_t - k_t . dk_t) / 2`` and ``d log_g`` is its reverse
cumulative sum. Matmul operands are bf16 (fp16 inputs too: the states and the power weights need bf16's
range), accumulation fp32. Plain ``@triton.jit`` without autotuning, so the same code runs under
``TRITON_INTERPRET=1`` on CPU.
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

BLK = 16  # feature block edge: one tile = BLK x BLK features


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_applies(q: Tensor, k: Tensor, v: Tensor, deg: int, chunk_size: int) -> bool:
    """Whether ``power_retention_triton`` can run these inputs (device: CUDA, or CPU under the interpreter)."""
    d, e = q.shape[-1], v.shape[-1]
    chunk_ok = chunk_size % 16 == 0 and (chunk_size <= 64 or chunk_size % 64 == 0)
    return (triton is not None and (q.is_cuda or _interpreting()) and deg == 2
            and q.dtype in (torch.float16, torch.bfloat16) and d % BLK == 0 and e % 16 == 0
            and d <= 128 and e <= 128 and chunk_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes. ``block``: query/key rows per program in the chunk kernels (and row sub-block of the state
    kernels), capped at the chunk; ``value_split``: the state kernels cut the value dim into this many programs
    (``None``: enough programs to fill ~264 slots)."""
    block: int = 64
    value_split: int | None = None
    warps_state: int = 8
    warps_chunk: int = 8
    stages: int = 2
    operands: str = "bf16"

    def operand_type(self):
        """Matmul operand type: ``"bf16"`` (the fast path), or ``"fp32"`` with fp32 state snapshots too — on a
        GPU that is tf32, under the interpreter exact fp32, which the tests use to check every term tightly."""
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
    def _place(part, blk, ROWS: tl.constexpr, NB: tl.constexpr, BLK: tl.constexpr):
        """``part [ROWS, BLK]`` written into columns ``blk*BLK ..`` of a zero ``[ROWS, NB*BLK]``."""
        wide = tl.reshape(tl.broadcast_to(part[:, None, :], [ROWS, NB, BLK]), [ROWS, NB * BLK])
        cols = tl.arange(0, NB * BLK) // BLK
        return tl.where(cols[None, :] == blk, wide, 0.0)

    @triton.jit
    def _outer(x_ptr, rows, a_blk, b_blk, DK: tl.constexpr, ROWS: tl.constexpr, BLK: tl.constexpr):
        """Feature tile ``[ROWS, BLK*BLK]``: ``x[r, a] * x[r, b]`` for ``a`` in block ``a_blk``, ``b`` in ``b_blk``;
        also returns the two ``[ROWS, BLK]`` blocks (float32)."""
        ci = tl.arange(0, BLK)
        xa = tl.load(x_ptr + rows[:, None] * DK + (a_blk * BLK + ci)[None, :]).to(tl.float32)
        xb = tl.load(x_ptr + rows[:, None] * DK + (b_blk * BLK + ci)[None, :]).to(tl.float32)
        return tl.reshape(xa[:, :, None] * xb[:, None, :], [ROWS, BLK * BLK]), xa, xb

    @triton.jit
    def _fwd_state(K, V, G, PAIRS, SB, ZB, NC,
                   HAS_GATE: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, DK: tl.constexpr,
                   E: tl.constexpr, BE: tl.constexpr, NE: tl.constexpr, BLK: tl.constexpr, F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_f = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        t = pid_f // NE
        et = pid_f % NE
        a_blk = tl.load(PAIRS + 2 * t)
        b_blk = tl.load(PAIRS + 2 * t + 1)
        FT: tl.constexpr = BLK * BLK
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
                g_start = tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0)
                S = S * tl.exp(g_end - g_start)
                z = z * tl.exp(g_end - g_start)
            for s0 in range(0, C, BC):
                rows = c0 + s0 + tl.arange(0, BC)
                phi, ka, kb = _outer(k_ptr, rows, a_blk, b_blk, DK, BC, BLK)
                vv = tl.load(v_ptr + rows[:, None] * E + ce[None, :]).to(tl.float32)
                if HAS_GATE:
                    beta = tl.exp(g_end - tl.load(g_ptr + rows))
                    vv = vv * beta[:, None]
                    z += tl.sum(phi * beta[:, None], 0)
                else:
                    z += tl.sum(phi, 0)
                S += _mm(tl.trans(phi.to(OPDT)), vv.to(OPDT), INTERP)

    @triton.jit
    def _fwd_out(Q, K, V, G, PAIRS, SB, ZB, O, DEN, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NP: tl.constexpr,
                 F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
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
        num = tl.zeros([BM, E], dtype=tl.float32)
        den = tl.zeros([BM], dtype=tl.float32)
        if HAS_GATE:
            gi = tl.load(g_ptr + rows)
            g_start = tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0)
            r = scale * scale * tl.exp(gi - g_start)
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        # inside the chunk: keys c0 .. m0 + BM - 1
        for j0 in range(c0, m0 + BM, BM):
            cols = j0 + tl.arange(0, BM)
            kk = tl.load(k_ptr + cols[:, None] * DK + di[None, :])
            vv = tl.load(v_ptr + cols[:, None] * E + ei[None, :])
            x = _mm(q, tl.trans(kk), INTERP) * scale
            vis = rows[:, None] >= cols[None, :]
            if HAS_GATE:
                gj = tl.load(g_ptr + cols)
                w = x * x * tl.exp(tl.where(vis, gi[:, None] - gj[None, :], float("-inf")))
            else:
                w = tl.where(vis, x * x, 0.0)
            den += tl.sum(w, 1)
            num += _mm(w.to(OPDT), vv.to(OPDT), INTERP)
        # the state entering the chunk
        FT: tl.constexpr = BLK * BLK
        fi = tl.arange(0, FT)
        s_ptr = SB + (bkv * NC + n) * F * E
        z_ptr = ZB + (bkv * NC + n) * F
        acc = tl.zeros([BM, E], dtype=tl.float32)
        acc_den = tl.zeros([BM], dtype=tl.float32)
        for t in range(NP):
            a_blk = tl.load(PAIRS + 2 * t)
            b_blk = tl.load(PAIRS + 2 * t + 1)
            phi, qa, qb = _outer(q_ptr, rows, a_blk, b_blk, DK, BM, BLK)
            phi = phi * (2.0 - (a_blk == b_blk).to(tl.float32))
            st = tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :])
            zt = tl.load(z_ptr + t * FT + fi)
            acc += _mm(phi.to(OPDT), st, INTERP)
            acc_den += tl.sum(phi * zt[None, :], 1)
        num += acc * r[:, None]
        den += acc_den * r
        o = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(O + bh * Tp * E + rows[:, None] * E + ei[None, :], o.to(O.dtype.element_ty))
        tl.store(DEN + bh * Tp + rows, den)

    @triton.jit
    def _bwd_state(Q, G, PAIRS, DO, DEN, DELTA, DSB, DZB, NC, scale,
                   HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                   BC: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, NE: tl.constexpr,
                   BLK: tl.constexpr, F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_f = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
        REP: tl.constexpr = HQ // HKV
        b = bkv // HKV
        kvh = bkv % HKV
        t = pid_f // NE
        et = pid_f % NE
        a_blk = tl.load(PAIRS + 2 * t)
        b_blk = tl.load(PAIRS + 2 * t + 1)
        wab = 2.0 - (a_blk == b_blk).to(tl.float32)
        FT: tl.constexpr = BLK * BLK
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
                g_end = tl.load(g_ptr + c0 + C - 1)
                g_start = tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0)
                dS = dS * tl.exp(g_end - g_start)
                dz = dz * tl.exp(g_end - g_start)
            for s0 in range(0, C, BC):
                rows = c0 + s0 + tl.arange(0, BC)
                if HAS_GATE:
                    r = scale * scale * wab * tl.exp(tl.load(g_ptr + rows) - g_start)
                else:
                    r = tl.full([BC], scale * scale, tl.float32) * wab
                for rr in range(REP):
                    bh = b * HQ + kvh * REP + rr
                    phi, qa, qb = _outer(Q + bh * Tp * DK, rows, a_blk, b_blk, DK, BC, BLK)
                    phi = phi * r[:, None]
                    den = tl.load(DEN + bh * Tp + rows)
                    den = tl.where(den == 0.0, 1.0, den)
                    delta = tl.load(DELTA + bh * Tp + rows)
                    do = tl.load(DO + bh * Tp * E + rows[:, None] * E + ce[None, :]).to(tl.float32)
                    dS += _mm(tl.trans(phi.to(OPDT)), (do / den[:, None]).to(OPDT), INTERP)
                    dz += tl.sum(phi * (-delta / den)[:, None], 0)

    @triton.jit
    def _bwd_dq(Q, K, V, G, PAIRS, SB, ZB, DO, DEN, DELTA, DQ, NC, scale,
                HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NB: tl.constexpr,
                NP: tl.constexpr, F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
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
        den = tl.where(den == 0.0, 1.0, den)
        delta = tl.load(DELTA + bh * Tp + rows)
        if HAS_GATE:
            gi = tl.load(g_ptr + rows)
            g_start = tl.load(g_ptr + c0 - 1, mask=n > 0, other=0.0)
            r = scale * scale * tl.exp(gi - g_start)
        else:
            r = tl.full([BM], scale * scale, tl.float32)
        dq = tl.zeros([BM, DK], dtype=tl.float32)
        for j0 in range(c0, m0 + BM, BM):
            cols = j0 + tl.arange(0, BM)
            kk = tl.load(k_ptr + cols[:, None] * DK + di[None, :])
            vv = tl.load(v_ptr + cols[:, None] * E + ei[None, :])
            x = _mm(q, tl.trans(kk), INTERP) * scale
            vis = rows[:, None] >= cols[None, :]
            if HAS_GATE:
                gj = tl.load(g_ptr + cols)
                ex = tl.exp(tl.where(vis, gi[:, None] - gj[None, :], float("-inf")))
            else:
                ex = tl.where(vis, 1.0, 0.0)
            dw = (_mm(do, tl.trans(vv), INTERP) - delta[:, None]) / den[:, None]
            ds = dw * (2.0 * scale) * x * ex
            dq += _mm(ds.to(OPDT), kk.to(OPDT), INTERP)
        FT: tl.constexpr = BLK * BLK
        fi = tl.arange(0, FT)
        s_ptr = SB + (bkv * NC + n) * F * E
        z_ptr = ZB + (bkv * NC + n) * F
        dnum = (do.to(tl.float32) / den[:, None]).to(OPDT)
        dden = -delta / den
        for t in range(NP):
            a_blk = tl.load(PAIRS + 2 * t)
            b_blk = tl.load(PAIRS + 2 * t + 1)
            wab = 2.0 - (a_blk == b_blk).to(tl.float32)
            st = tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :])
            zt = tl.load(z_ptr + t * FT + fi)
            g = _mm(dnum, tl.trans(st), INTERP) + dden[:, None] * zt[None, :]
            g3 = tl.reshape(g * (r * wab)[:, None], [BM, BLK, BLK])
            _, qa, qb = _outer(q_ptr, rows, a_blk, b_blk, DK, BM, BLK)
            dq += _place(tl.sum(g3 * qb[:, None, :], 2), a_blk, BM, NB, BLK)
            dq += _place(tl.sum(g3 * qa[:, :, None], 1), b_blk, BM, NB, BLK)
        tl.store(DQ + bh * Tp * DK + rows[:, None] * DK + di[None, :], dq)

    @triton.jit
    def _bwd_dkv(Q, K, V, G, PAIRS, DSB, DZB, DO, DEN, DELTA, DKO, DVO, NC, scale,
                 HQ: tl.constexpr, HKV: tl.constexpr, HAS_GATE: tl.constexpr, C: tl.constexpr,
                 BM: tl.constexpr, DK: tl.constexpr, E: tl.constexpr, BLK: tl.constexpr, NB: tl.constexpr,
                 NP: tl.constexpr, F: tl.constexpr, INTERP: tl.constexpr, OPDT: tl.constexpr):
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1).to(tl.int64)
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
                    gi = tl.load(g_ptr + rows)
                    ex = tl.exp(tl.where(vis, gi[None, :] - gj[:, None], float("-inf")))
                else:
                    ex = tl.where(vis, 1.0, 0.0)
                dv += _mm((xt * xt * ex).to(OPDT), (do.to(tl.float32) / den[:, None]).to(OPDT), INTERP)
                dwt = (_mm(vv, tl.trans(do), INTERP) - delta[None, :]) / den[None, :]
                dst = dwt * (2.0 * scale) * xt * ex
                dk += _mm(dst.to(OPDT), q.to(OPDT), INTERP)
        FT: tl.constexpr = BLK * BLK
        fi = tl.arange(0, FT)
        s_ptr = DSB + (bkv * NC + n) * F * E
        z_ptr = DZB + (bkv * NC + n) * F
        vb = vv.to(OPDT)
        for t in range(NP):
            a_blk = tl.load(PAIRS + 2 * t)
            b_blk = tl.load(PAIRS + 2 * t + 1)
            dst_ = tl.load(s_ptr + (t * FT + fi)[:, None] * E + ei[None, :])
            dzt = tl.load(z_ptr + t * FT + fi)
            phi, ka, kb = _outer(k_ptr, cols, a_blk, b_blk, DK, BM, BLK)
            dv += _mm(phi.to(OPDT), dst_, INTERP) * beta[:, None]
            gk = (_mm(vb, tl.trans(dst_), INTERP) + dzt[None, :]) * beta[:, None]
            g3 = tl.reshape(gk, [BM, BLK, BLK])
            dk += _place(tl.sum(g3 * kb[:, None, :], 2), a_blk, BM, NB, BLK)
            dk += _place(tl.sum(g3 * ka[:, :, None], 1), b_blk, BM, NB, BLK)
        tl.store(DKO + bkv * Tp * DK + cols[:, None] * DK + di[None, :], dk)
        tl.store(DVO + bkv * Tp * E + cols[:, None] * E + ei[None, :], dv)


def _pairs(nb: int, device) -> Tensor:
    """Block pairs ``(A, B)``, ``A <= B``, as int32 ``[NP * 2]``: the tile order of the state."""
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
    F: int
    BM: int
    BE: int
    NE: int

    @property
    def Tp(self) -> int:
        return self.NC * self.C


def _geometry(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, cfg: KernelConfig) -> _Geometry:
    B, Hq, T, DK = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    C = chunk_size
    NC = max(1, -(-T // C))
    NB = DK // BLK
    NP = NB * (NB + 1) // 2
    BM = min(cfg.block, C)
    if cfg.value_split is not None:
        NE = cfg.value_split
    else:  # split the value dim until the state kernels have ~264 programs (two per SM on an H100)
        NE = 1
        while NP * B * Hkv * NE < 264 and E // (2 * NE) >= 16:
            NE *= 2
    if E % NE or (E // NE) % 16:
        raise ValueError(f"value_split={NE} must divide the value dim {E} into multiples of 16")
    return _Geometry(B, Hq, Hkv, T, DK, E, C, NC, NB, NP, NP * BLK * BLK, BM, E // NE, NE)


def _pad(x: Tensor, g: _Geometry) -> Tensor:
    return F.pad(x, (0, 0, 0, g.Tp - g.T)).contiguous()


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
        SB = torch.empty(g.B * g.Hkv, g.NC, g.F, g.E, device=q.device, dtype=cfg.state_dtype)
        ZB = torch.empty(g.B * g.Hkv, g.NC, g.F, device=q.device, dtype=torch.float32)
        _fwd_state[(g.NP * g.NE, g.B * g.Hkv)](
            kp, vp, G, pairs, SB, ZB, g.NC, HAS_GATE=has_gate, C=g.C, BC=g.BM, DK=g.DK, E=g.E, BE=g.BE,
            NE=g.NE, BLK=BLK, F=g.F, INTERP=_interpreting(), OPDT=cfg.operand_type(), num_warps=cfg.warps_state, num_stages=cfg.stages)
        O = torch.empty(g.B, g.Hq, g.Tp, g.E, device=q.device, dtype=q.dtype)
        DEN = torch.empty(g.B, g.Hq, g.Tp, device=q.device, dtype=torch.float32)
        _fwd_out[(g.Tp // g.BM, g.B * g.Hq)](
            qp, kp, vp, G, pairs, SB, ZB, O, DEN, g.NC, scale, HQ=g.Hq, HKV=g.Hkv, HAS_GATE=has_gate, C=g.C,
            BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NP=g.NP, F=g.F, INTERP=_interpreting(), OPDT=cfg.operand_type(), num_warps=cfg.warps_chunk, num_stages=cfg.stages)
        ctx.save_for_backward(qp, kp, vp, G, O, DEN, SB, ZB, pairs)
        ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate = g, scale, cfg, has_gate
        ctx.log_g_dtype = None if log_g is None else log_g.dtype
        return O if g.T == g.Tp else O[:, :, :g.T].contiguous()

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, G, O, DEN, SB, ZB, pairs = ctx.saved_tensors
        g, scale, cfg, has_gate = ctx.geometry, ctx.scale, ctx.cfg, ctx.has_gate
        dop = _pad(do.to(O.dtype), g)
        delta = (dop.float() * O.float()).sum(-1).contiguous()                   # [B, Hq, Tp]
        DSB, DZB = torch.empty_like(SB), torch.empty_like(ZB)
        _bwd_state[(g.NP * g.NE, g.B * g.Hkv)](
            qp, G, pairs, dop, DEN, delta, DSB, DZB, g.NC, scale, HQ=g.Hq, HKV=g.Hkv, HAS_GATE=has_gate, C=g.C,
            BC=g.BM, DK=g.DK, E=g.E, BE=g.BE, NE=g.NE, BLK=BLK, F=g.F, INTERP=_interpreting(), OPDT=cfg.operand_type(), num_warps=cfg.warps_state,
            num_stages=cfg.stages)
        dq = torch.empty(g.B, g.Hq, g.Tp, g.DK, device=qp.device, dtype=torch.float32)
        _bwd_dq[(g.Tp // g.BM, g.B * g.Hq)](
            qp, kp, vp, G, pairs, SB, ZB, dop, DEN, delta, dq, g.NC, scale, HQ=g.Hq, HKV=g.Hkv,
            HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NB=g.NB, NP=g.NP, F=g.F,
            INTERP=_interpreting(), OPDT=cfg.operand_type(), num_warps=cfg.warps_chunk, num_stages=cfg.stages)
        dk = torch.empty(g.B, g.Hkv, g.Tp, g.DK, device=qp.device, dtype=torch.float32)
        dv = torch.empty(g.B, g.Hkv, g.Tp, g.E, device=qp.device, dtype=torch.float32)
        _bwd_dkv[(g.Tp // g.BM, g.B * g.Hkv)](
            qp, kp, vp, G, pairs, DSB, DZB, dop, DEN, delta, dk, dv, g.NC, scale, HQ=g.Hq, HKV=g.Hkv,
            HAS_GATE=has_gate, C=g.C, BM=g.BM, DK=g.DK, E=g.E, BLK=BLK, NB=g.NB, NP=g.NP, F=g.F,
            INTERP=_interpreting(), OPDT=cfg.operand_type(), num_warps=cfg.warps_chunk, num_stages=cfg.stages)
        dlog_g = None
        if has_gate and ctx.needs_input_grad[3]:
            dG_q = (qp.float() * dq).sum(-1).view(g.B, g.Hkv, g.Hq // g.Hkv, g.Tp).sum(2)
            dG = (dG_q - (kp.float() * dk).sum(-1)) / 2                                 # [B, Hkv, Tp]
            dlog_g = dG.flip(-1).cumsum(-1).flip(-1)[..., :g.T].to(ctx.log_g_dtype)
        T = g.T
        return (dq[:, :, :T].to(qp.dtype), dk[:, :, :T].to(kp.dtype), dv[:, :, :T].to(vp.dtype), dlog_g,
                None, None, None)


def power_retention_triton(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, chunk_size: int = 128,
                           scale: float | None = None, config: KernelConfig | None = None) -> Tensor:
    """Deg-2 power retention through the Triton kernels, differentiable in ``q, k, v, log_g``.

    ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]`` fp16/bf16, ``log_g [B,Hkv,T]`` (float32 advised),
    ``d, e`` multiples of 16 up to 128, ``chunk_size`` a multiple of 16 (<= 64) or of 64. Returns ``o [B,Hq,T,e]``.
    """
    from ..mechanisms.power.naive import check_gate, default_scale
    if not kernel_applies(q, k, v, 2, chunk_size):
        raise ValueError(f"power_retention_triton needs triton, CUDA (or TRITON_INTERPRET=1), fp16/bf16 inputs, "
                         f"head dims multiples of 16 up to 128 and a chunk_size multiple of 16 (<= 64) or of 64; "
                         f"got {q.dtype} on {q.device}, d={q.shape[-1]}, e={v.shape[-1]}, chunk_size={chunk_size}")
    from ..attention import check_qkv
    check_qkv(q, k, v)
    check_gate(log_g, k)
    return _PowerRetentionFn.apply(q, k, v, log_g, chunk_size, default_scale(q.shape[-1], scale),
                                   config or KernelConfig())
