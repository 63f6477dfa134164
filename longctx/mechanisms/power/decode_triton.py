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

from ...decode_attention import sm_count
from .chunk_triton import HEAD_DIMS, _interpreting
from .expand import _monomials

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
        gq = 0.0
        if HAS_GATE:
            gq = tl.load(G + bkv * R + R - 1)
            lift = lift * tl.exp(gq)
        # the recent keys, the new one last
        num, total = _read_recent(K, V, G, bkv * R, R, R, True, q, gq, scale, tl.zeros([E], dtype=tl.float32),
                                  DK, E, HAS_GATE, BR)
        if HAS_STATE:
            num, total = _read_state(Q, S, Z, IA, IB, W, D, 0, D, bh, bkv, lift, num, total, DK, E, BF)
        o = num / tl.where(total == 0.0, 1.0, total)
        tl.store(O + bh * E + ei, o.to(O.dtype.element_ty))

    @triton.jit
    def _read_recent(K, V, G, base, n, RMAX, use, q, gq, scale, num, DK: tl.constexpr, E: tl.constexpr,
                     HAS_GATE: tl.constexpr, BR: tl.constexpr):
        """``(num + sum_j w_j v_j, sum_j w_j)`` over recent rows ``j < n`` (of ``RMAX`` from row ``base``; none
        unless ``use``), ``w_j = (scale q . k_j)^2 exp(gq - G_j)``."""
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        den = tl.zeros([BR], dtype=tl.float32)
        for r0 in range(0, RMAX, BR):
            rows = r0 + tl.arange(0, BR)
            live = (rows < n) & use
            k = tl.load(K + (base + rows)[:, None] * DK + di[None, :], mask=live[:, None], other=0.0)
            x = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale
            w = x * x
            if HAS_GATE:
                w = w * tl.exp(gq - tl.load(G + base + rows, mask=live, other=0.0))
            w = tl.where(live, w, 0.0)
            v = tl.load(V + (base + rows)[:, None] * E + ei[None, :], mask=live[:, None], other=0.0)
            num += tl.sum(w[:, None] * v.to(tl.float32), 0)
            den += w
        return num, tl.sum(den, 0)

    @triton.jit
    def _read_state(Q, S, Z, IA, IB, W, D, F0, F1, bh, bkv, lift, num, total, DK: tl.constexpr, E: tl.constexpr,
                    BF: tl.constexpr):
        """``num + phi(q) . S`` and ``total + phi(q) . z`` over features ``[F0, F1)`` of ``D``, ``BF`` at a time
        (``lift``: scale^2 exp(G_q))."""
        ei = tl.arange(0, E)
        for f0 in range(F0, F1, BF):
            fi = f0 + tl.arange(0, BF)
            live = fi < F1
            qa = tl.load(Q + bh * DK + tl.load(IA + fi, mask=live, other=0)).to(tl.float32)
            qb = tl.load(Q + bh * DK + tl.load(IB + fi, mask=live, other=0)).to(tl.float32)
            phi = qa * qb * tl.load(W + fi, mask=live, other=0.0) * lift
            s = tl.load(S + (bkv * D + fi)[:, None] * E + ei[None, :], mask=live[:, None], other=0.0)
            num += tl.sum(phi[:, None] * s, 0)
            total += tl.sum(phi * tl.load(Z + bkv * D + fi, mask=live, other=0.0), 0)
        return num, total

    @triton.jit
    def _decode_step_static(Q, KN, VN, LG, KB, VB, GB, S, Z, O, PART, IA, IB, W, SLOT, D, FPS, scale,
                            HQ: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, E: tl.constexpr,
                            SO: tl.constexpr, HAS_GATE: tl.constexpr, HAS_STATE: tl.constexpr, SPLIT: tl.constexpr,
                            BR: tl.constexpr, BF: tl.constexpr):
        """The static step: recent tokens in fixed buffers ``KB, VB [B*HKV, SO, .]``, ``GB [B*HKV, SO]`` with
        the new one's slot in device memory (``SLOT``); the new token (``KN, VN``, log-gate ``LG``) is read from
        its inputs and written into its slot by the first query head of its group, so no program reads a slot
        another one writes. Grid ``(B*HQ, splits)``: split ``s`` reads state features ``[s*FPS, (s+1)*FPS)``,
        split 0 also the recent tokens; with ``SPLIT`` each writes its ``(num [E], total)`` to ``PART [B*HQ,
        splits, E+1]`` for ``_merge_state_splits``, else the output itself."""
        bh = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        first = sp == 0
        bkv = (bh // HQ) * HKV + (bh % HQ) // (HQ // HKV)
        lead = ((bh % (HQ // HKV)) == 0) & first
        di = tl.arange(0, DK)
        ei = tl.arange(0, E)
        slot = tl.load(SLOT)
        q = tl.load(Q + bh * DK + di).to(tl.float32)
        kn = tl.load(KN + bkv * DK + di)
        vn = tl.load(VN + bkv * E + ei)
        lift = scale * scale
        gq = 0.0
        if HAS_GATE:
            gq = tl.load(GB + bkv * SO + slot - 1, mask=slot > 0, other=0.0) + tl.load(LG + bkv)
            lift = lift * tl.exp(gq)
        xn = tl.sum(kn.to(tl.float32) * q, 0) * scale
        wn = tl.where(first, xn * xn, 0.0)
        # the recent slots before the new token's (split 0 only)
        num, total = _read_recent(KB, VB, GB, bkv * SO, slot, SO, first, q, gq, scale, wn * vn.to(tl.float32),
                                  DK, E, HAS_GATE, BR)
        total += wn
        if HAS_STATE:
            f0 = sp * FPS
            num, total = _read_state(Q, S, Z, IA, IB, W, D, f0, tl.minimum(f0 + FPS, D), bh, bkv, lift, num, total,
                                     DK, E, BF)
        if SPLIT:
            part = (bh * tl.num_programs(1) + sp) * (E + 1)
            tl.store(PART + part + ei, num)
            tl.store(PART + part + E, total)
        else:
            o = num / tl.where(total == 0.0, 1.0, total)
            tl.store(O + bh * E + ei, o.to(O.dtype.element_ty))
        tl.store(KB + (bkv * SO + slot) * DK + di, kn, mask=(di < DK) & lead)
        tl.store(VB + (bkv * SO + slot) * E + ei, vn, mask=(ei < E) & lead)
        if HAS_GATE:
            tl.store(GB + bkv * SO + slot, gq, mask=lead)

    @triton.jit
    def _merge_state_splits(PART, O, NS, E: tl.constexpr):
        """``o = sum_s num_s / sum_s total_s`` over the ``NS`` partials of one (batch row, query head)."""
        bh = tl.program_id(0).to(tl.int64)
        ei = tl.arange(0, E)
        num = tl.zeros([E], dtype=tl.float32)
        total = 0.0
        for s in range(0, NS):
            num += tl.load(PART + (bh * NS + s) * (E + 1) + ei)
            total += tl.load(PART + (bh * NS + s) * (E + 1) + E)
        tl.store(O + bh * E + ei, (num / tl.where(total == 0.0, 1.0, total)).to(O.dtype.element_ty))


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


def power_decode_static_triton(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, kb: Tensor, vb: Tensor,
                               gb: Tensor | None, S: Tensor | None, z: Tensor, slot: Tensor, scale: float) -> Tensor:
    """One token's output ``[B, Hq, 1, e]`` from the static buffers (``StaticPowerState``): ``q [B, Hq, 1, d]``,
    the new ``k [B, Hkv, 1, d]``, ``v [B, Hkv, 1, e]``, ``log_g [B, Hkv, 1]`` (None: ungated), the recent buffers
    ``kb [B, Hkv, SO, d]``, ``vb``, ``gb [B, Hkv, SO]`` float32 whose slots ``[0, slot)`` are live, ``slot [1]``
    (device) and ``S [B, Hkv, D, e]`` (None: nothing folded yet), ``z [B, Hkv, D]``. Writes the token into
    ``slot`` of ``kb, vb, gb``. Capture-safe."""
    B, Hq, _, d = q.shape
    Hkv, so, e = kb.shape[1], kb.shape[2], vb.shape[-1]
    o = torch.empty(B, Hq, 1, e, device=q.device, dtype=q.dtype)
    ia, ib, w = _pairs(d, q.device)
    D = ia.shape[0]
    fps, splits = state_splits(D, B * Hq, q.device) if S is not None else (D, 1)
    part = torch.empty(B * Hq, splits, e + 1, device=q.device, dtype=torch.float32) if splits > 1 else o
    dummy = z if log_g is None else log_g.float().contiguous()
    _decode_step_static[(B * Hq, splits)](
        q.contiguous(), k.contiguous(), v.contiguous(), dummy, kb, vb, z if gb is None else gb, z if S is None else S,
        z, o, part, ia, ib, w, slot, D, fps, scale, HQ=Hq, HKV=Hkv, DK=d, E=e, SO=so, HAS_GATE=gb is not None,
        HAS_STATE=S is not None, SPLIT=splits > 1, BR=BLOCK_KEYS, BF=BLOCK_FEATURES, num_warps=4)
    if splits > 1:
        _merge_state_splits[(B * Hq,)](part, o, splits, E=e, num_warps=1)
    return o


def state_splits(D: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(features per split, splits)`` for the static step: the ``D`` state features of each of ``programs``
    (batch row, query head) pairs cut so that about two programs run per SM (one split once the batch fills the
    GPU), in whole ``BLOCK_FEATURES`` blocks."""
    blocks = -(-D // BLOCK_FEATURES)
    splits = max(1, min(blocks, -(-2 * sm_count(device) // programs)))
    fps = -(-blocks // splits) * BLOCK_FEATURES
    return fps, -(-D // fps)
