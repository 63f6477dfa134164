"""Triton kernel for one decoding step of deg-2 power retention (reference: the PyTorch path of
``longctx.mechanisms.power.recurrent._piece`` for one new token).

One program per (batch row, query head) computes

    o = (sum_j w_j v_j + phi(q) . S) / (sum_j w_j + phi(q) . z),    w_j = (scale q . k_j)^2 exp(G_q - G_j)

over the unfolded recent keys (the new token included) and the folded state, ``phi(q)`` being the symmetric
square ``scale^2 exp(G_q) sqrt(2 - [a = b]) q_a q_b`` in ``sympow``'s feature order. The eager path makes about
190 ATen calls per token; here it is one launch. Plain ``@triton.jit``: runs under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .power_retention import HEAD_DIMS, _interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path works without triton
    triton = None

BLOCK_KEYS = 64      # recent keys per loop step
BLOCK_FEATURES = 64  # state rows per loop step


def decode_kernel_applies(q: Tensor, k: Tensor, v: Tensor, deg: int) -> bool:
    """One new token, deg 2, head dims in ``HEAD_DIMS``, floating inputs on CUDA (or the interpreter)."""
    return (triton is not None and (q.is_cuda or _interpreting()) and deg == 2 and q.shape[2] == 1
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] in HEAD_DIMS
            and v.shape[-1] in HEAD_DIMS)


@functools.lru_cache(maxsize=16)
def _pairs(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``sympow``'s deg-2 features as (first index, second index, weight), int32 / int32 / float32 ``[D]``."""
    from ..mechanisms.power.expand import _monomials

    idx, weight = _monomials(d, 2)
    return (idx[:, 0].to(torch.int32).to(device), idx[:, 1].to(torch.int32).to(device),
            weight.to(torch.float32).to(device))


if triton is not None:
    @triton.jit
    def _decode_step(Q, K, V, G, S, Z, O, IA, IB, W, R, D, scale,
                     HQ: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, E: tl.constexpr,
                     HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        q = tl.load(Q + bh * DK + di).to(tl.float32)
        lift = scale * scale
        if HAS_GATE:
            gq = tl.load(G + bkv * R + R - 1)
            lift = lift * tl.exp(gq)
        num = tl.zeros([E], dtype=tl.float32)
        den = tl.zeros([BR], dtype=tl.float32)
        for r0 in range(0, R, BR):                     # the recent keys, the new one last
            rows = r0 + tl.arange(0, BR)
            live = rows < R
            k = tl.load(K + (bkv * R + rows)[:, None] * DK + di[None, :], mask=live[:, None], other=0.0)
            x = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
            w = x * x
            if HAS_GATE:
                w = w * tl.exp(gq - tl.load(G + bkv * R + rows, mask=live, other=0.0))
            w = tl.where(live, w, 0.0)
            v = tl.load(V + (bkv * R + rows)[:, None] * E + ei[None, :], mask=live[:, None], other=0.0)
            num += tl.sum(w[:, None] * v.to(tl.float32), 0)
            den += w
        total = tl.sum(den, 0)
        if HAS_STATE:                                  # phi(q) . S and phi(q) . z, BF features at a time
            for f0 in range(0, D, BF):
                fi = f0 + tl.arange(0, BF)
                live = fi < D
                qa = tl.load(Q + bh * DK + tl.load(IA + fi, mask=live, other=0)).to(tl.float32)
                qb = tl.load(Q + bh * DK + tl.load(IB + fi, mask=live, other=0)).to(tl.float32)
                phi = qa * qb * tl.load(W + fi, mask=live, other=0.0) * lift
                s = tl.load(S + (bkv * D + fi)[:, None] * E + ei[None, :], mask=live[:, None], other=0.0)
                num += tl.sum(phi[:, None] * s, 0)
                total += tl.sum(phi * tl.load(Z + bkv * D + fi, mask=live, other=0.0), 0)
        o = num / tl.where(total == 0.0, 1.0, total)
        tl.store(O + bh * E + ei, o.to(O.dtype.element_ty))


def power_decode_step_triton(q: Tensor, keys: Tensor, vals: Tensor, g: Tensor | None, S: Tensor | None,
                             z: Tensor | None, scale: float) -> Tensor:
    """One token's output ``[B, Hq, 1, e]`` (``q``'s dtype) from ``q [B, Hq, 1, d]``, the recent ``keys
    [B, Hkv, R, d]`` and ``vals [B, Hkv, R, e]`` with the new token last, their cumulative log-gates ``g [B, Hkv,
    R]`` (float32, on the state's level; ``None``: ungated) and the folded state ``S [B, Hkv, D, e]``, ``z [B,
    Hkv, D]`` (float32; ``None``: nothing folded yet)."""
    B, Hq, _, d = q.shape
    Hkv, R, e = keys.shape[1], keys.shape[2], vals.shape[-1]
    o = torch.empty(B, Hq, 1, e, device=q.device, dtype=q.dtype)
    ia, ib, w = _pairs(d, q.device)
    dummy = o.new_zeros(1, dtype=torch.float32)
    _decode_step[(B * Hq,)](
        q.contiguous(), keys.contiguous(), vals.contiguous(), dummy if g is None else g.float().contiguous(),
        dummy if S is None else S.contiguous(), dummy if z is None else z.contiguous(), o, ia, ib, w, R, ia.shape[0],
        scale, HQ=Hq, HKV=Hkv, DK=d, E=e, HAS_GATE=g is not None, HAS_STATE=S is not None, BR=BLOCK_KEYS,
        BF=BLOCK_FEATURES, num_warps=4)
    return o
