"""Triton forward kernel for the RayTention block pass (reference: ``longctx.mechanisms.raytention.blocked``,
oracle: ``...raytention.naive``). Forward only (prefill / decoding, no autograd).

One program per (query block, batch x head): it loads its ``[BQ, D]`` queries once, walks the key blocks up
to its causal diagonal and keeps per row the two online-softmax streams (plain and temporal), the running
weighted squared distance, and the two closest keys by (distance, index). It writes centroid, temporal
centroid, spread, entropy and the two key indices; the wrapper gathers the top keys and the predecessor
(plain indexing) and lays the signals out exactly like the reference: ``[B, H, Tq, 5D+2]``.
Plain ``@triton.jit``, no autotune: runs under ``TRITON_INTERPRET=1`` on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .naive import check_inputs, gather_keys, per_head, predecessor_keys


@triton.jit
def _raytention_fwd(q_ptr, e_ptr, tau_ptr, lg_ptr, cen_ptr, tem_ptr, stat_ptr, idx_ptr,
                    H, Tq, Tk, D, q_offset, NONE,
                    BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rq = pid_q * BQ + tl.arange(0, BQ)
    rd = tl.arange(0, BD)
    q_in = rq < Tq
    d_in = rd < D
    q = tl.load(q_ptr + (pid_bh * Tq + rq[:, None]) * D + rd[None, :], mask=q_in[:, None] & d_in[None, :], other=0.0)
    q_sq = tl.sum(q * q, 1)
    tau = tl.load(tau_ptr + h)
    log_gamma = tl.load(lg_ptr + h)
    pos_q = q_offset + rq

    m = tl.full([BQ], float("-inf"), tl.float32)
    l = tl.zeros([BQ], tl.float32)
    a = tl.zeros([BQ], tl.float32)
    c = tl.zeros([BQ, BD], tl.float32)
    mt = tl.full([BQ], float("-inf"), tl.float32)
    lt = tl.zeros([BQ], tl.float32)
    ct = tl.zeros([BQ, BD], tl.float32)
    d1 = tl.full([BQ], float("inf"), tl.float32)
    d2 = tl.full([BQ], float("inf"), tl.float32)
    i1 = tl.full([BQ], NONE, tl.int32)
    i2 = tl.full([BQ], NONE, tl.int32)

    hi = tl.minimum(q_offset + pid_q * BQ + BQ, Tk)                      # causal: keys up to the last query
    for k0 in range(0, hi, BK):
        rk = k0 + tl.arange(0, BK)
        k_in = rk < Tk
        k = tl.load(e_ptr + (b * Tk + rk[:, None]) * D + rd[None, :], mask=k_in[:, None] & d_in[None, :], other=0.0)
        k_sq = tl.sum(k * k, 1)
        dist = q_sq[:, None] + k_sq[None, :] - 2.0 * tl.dot(q, tl.trans(k), input_precision="ieee")
        visible = (rk[None, :] <= pos_q[:, None]) & k_in[None, :]
        s = tl.where(visible, -dist / tau, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1))                              # finite: key 0 is in the first block
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = alpha * l + tl.sum(p, 1)
        a = alpha * a + tl.sum(p * dist, 1)
        c = alpha[:, None] * c + tl.dot(p, k, input_precision="ieee")
        m = m_new

        st = s + (pos_q[:, None] - rk[None, :]).to(tl.float32) * log_gamma
        mt_new = tl.maximum(mt, tl.max(st, 1))
        alpha = tl.exp(mt - mt_new)
        pt = tl.exp(st - mt_new[:, None])
        lt = alpha * lt + tl.sum(pt, 1)
        ct = alpha[:, None] * ct + tl.dot(pt, k, input_precision="ieee")
        mt = mt_new

        far = tl.where(visible, dist, float("inf"))                     # block's two closest, lowest index first
        b1d = tl.min(far, 1)
        b1i = tl.min(tl.where(far == b1d[:, None], rk[None, :], NONE), 1)
        far = tl.where(rk[None, :] == b1i[:, None], float("inf"), far)
        b2d = tl.min(far, 1)
        b2i = tl.min(tl.where(far == b2d[:, None], rk[None, :], NONE), 1)
        take = b1d < d1                                                  # block indices are higher: ties keep the old
        n2d = tl.where(take, tl.where(b2d < d1, b2d, d1), tl.where(b1d < d2, b1d, d2))
        n2i = tl.where(take, tl.where(b2d < d1, b2i, i1), tl.where(b1d < d2, b1i, i2))
        d1 = tl.where(take, b1d, d1)
        i1 = tl.where(take, b1i, i1)
        d2 = n2d
        i2 = n2i

    spread = a / l
    entropy = m + tl.log(l) + spread / tau
    out = (pid_bh * Tq + rq[:, None]) * D + rd[None, :]
    tl.store(cen_ptr + out, c / l[:, None], mask=q_in[:, None] & d_in[None, :])
    tl.store(tem_ptr + out, ct / lt[:, None], mask=q_in[:, None] & d_in[None, :])
    row = (pid_bh * Tq + rq) * 2
    tl.store(stat_ptr + row, spread, mask=q_in)
    tl.store(stat_ptr + row + 1, entropy, mask=q_in)
    tl.store(idx_ptr + row, i1, mask=q_in)
    tl.store(idx_ptr + row + 1, tl.where(i2 == NONE, i1, i2), mask=q_in)   # one visible key: top-2 = top-1


def raytention_signals_triton(q: Tensor, e: Tensor, tau, log_gamma, q_offset: int = 0, block_q: int = 32,
                              block_k: int = 32, return_indices: bool = False):
    """Forward-only RayTention signals, float32: ``q [B, H, Tq, D]``, ``e [B, q_offset + Tq, D]``, ``tau`` and
    ``log_gamma`` scalars or ``[H]`` -> ``[B, H, Tq, 5D+2]`` (and top indices ``[B, H, Tq, 2]``)."""
    check_inputs(q, e, q_offset)
    if any(torch.is_tensor(x) and x.requires_grad for x in (q, e, tau, log_gamma)) and torch.is_grad_enabled():
        raise ValueError("raytention_signals_triton is forward only; call it under torch.no_grad() or use "
                         "longctx.mechanisms.raytention.raytention_signals for training")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {blk}")
    B, H, Tq, D = q.shape
    Tk = e.shape[1]
    dtype = q.dtype
    q32, e32 = q.float().contiguous(), e.float().contiguous()
    tau = per_head(tau, H, q32, "tau").reshape(-1).expand(H).contiguous()
    log_gamma = per_head(log_gamma, H, q32, "log_gamma").reshape(-1).expand(H).contiguous()
    cen, tem = torch.empty_like(q32), torch.empty_like(q32)
    stats = torch.empty(B, H, Tq, 2, dtype=torch.float32, device=q.device)
    idx = torch.empty(B, H, Tq, 2, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(Tq, block_q), B * H)
    _raytention_fwd[grid](q32, e32, tau, log_gamma, cen, tem, stats, idx, H, Tq, Tk, D, q_offset, Tk,
                          BQ=block_q, BK=block_k, BD=max(16, triton.next_power_of_2(D)))
    idx = idx.long()
    pos_q = q_offset + torch.arange(Tq, device=q.device)
    out = torch.cat([cen, tem, predecessor_keys(e32, pos_q, H), gather_keys(e32, idx[..., 0]),
                     gather_keys(e32, idx[..., 1]), stats], -1).to(dtype)
    return (out, idx) if return_indices else out
