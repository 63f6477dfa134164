"""Decoding form of power retention: a fixed-size state plus the most recent tokens kept as plain K/V.

``PowerState`` holds ``S [B, Hkv, D, e]`` and ``z [B, Hkv, D]`` (``None`` until the first fold), the recent
keys/values ``k [B, Hkv, R, d]``, ``v [B, Hkv, R, e]`` not folded yet, their cumulative log-gates ``g [B, Hkv, R]``
(gated states only) on the level of the state, and ``seen``, the tokens consumed.

Folding schedule (depends on ``seen`` alone, so the state size is a function of the context length):
recent tokens accumulate until there are ``switch_over``; then the oldest ``chunk_size`` are folded into
``S, z``, leaving ``switch_over - chunk_size``. So a context shorter than ``switch_over`` costs exactly its
K/V, like attention, and a longer one costs ``S, z`` plus between ``switch_over - chunk_size`` and
``switch_over - 1`` recent tokens, whatever its length. ``S, z, g`` are float32 (float64 for float64
states) whatever the K/V dtype: sums over millions of tokens stay in range and keep their precision.

A step of ``T_new`` tokens is processed in pieces that end at fold points; each piece's queries read the
state and attend (with the power weights) to the recent tokens and the piece itself. A step longer than
``switch_over`` (a prefill) runs the chunked form instead and leaves the same recent tokens unfolded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...attention import check_qkv
from .chunk import check_chunk_size, kernel_choice
from .expand import check_deg, expanded_dim, sympow
from .naive import compute_dtype, default_scale, group_queries, power_weights, safe_ratio


@dataclass
class PowerState:
    k: Tensor
    v: Tensor
    g: Tensor | None = None
    S: Tensor | None = None
    z: Tensor | None = None
    seen: int = 0


def check_schedule(chunk_size: int, switch_over: int) -> None:
    check_chunk_size(chunk_size)
    if not isinstance(switch_over, int) or switch_over < chunk_size or switch_over % chunk_size:
        raise ValueError(f"switch_over must be a multiple of chunk_size ({chunk_size}) and at least it, "
                         f"got {switch_over!r}")


def recent_count(context_len: int, chunk_size: int, switch_over: int) -> int:
    """Tokens kept unfolded after ``context_len`` tokens."""
    if context_len < switch_over:
        return context_len
    return switch_over - chunk_size + (context_len - switch_over) % chunk_size


def init_power_state(batch: int, n_kv: int, d: int, e: int, gated: bool, device="cpu",
                     dtype=torch.float32) -> PowerState:
    """Empty state: no recent tokens, no ``S, z`` yet."""
    k = torch.empty(batch, n_kv, 0, d, device=device, dtype=dtype)
    v = torch.empty(batch, n_kv, 0, e, device=device, dtype=dtype)
    g = torch.empty(batch, n_kv, 0, device=device, dtype=compute_dtype(dtype)) if gated else None
    return PowerState(k, v, g)


def power_state_bytes(context_len: int, batch: int, n_kv: int, d: int, e: int, deg: int, gated: bool,
                      chunk_size: int, switch_over: int, dtype=torch.bfloat16) -> int:
    """Bytes held by ``PowerState`` after ``context_len`` tokens (K/V in ``dtype``; S, z, g in its
    arithmetic dtype)."""
    kv_bytes = torch.empty((), dtype=dtype).element_size()
    st_bytes = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    r = recent_count(context_len, chunk_size, switch_over)
    total = batch * n_kv * r * ((d + e) * kv_bytes + (st_bytes if gated else 0))
    if context_len >= switch_over:
        D = expanded_dim(d, deg)
        total += batch * n_kv * D * (e + 1) * st_bytes
    return total


def _fold(state: PowerState, n: int, deg: int) -> PowerState:
    """Fold the oldest ``n`` recent tokens into ``S, z``; the state's gate level moves to the last of them."""
    ct = compute_dtype(state.k.dtype)
    kf, vf = state.k[:, :, :n].to(ct), state.v[:, :, :n].to(ct)
    B, Hkv, _, d = kf.shape
    phik = sympow(kf, deg)                                                       # [B, Hkv, n, D]
    S, z = state.S, state.z
    if S is None:
        D = expanded_dim(d, deg)
        S = kf.new_zeros(B, Hkv, D, vf.shape[-1])
        z = kf.new_zeros(B, Hkv, D)
    g = state.g
    if g is not None:
        level = g[:, :, n - 1]
        phik = phik * torch.exp(level[..., None] - g[:, :, :n])[..., None]
        S, z = S * torch.exp(level)[..., None, None], z * torch.exp(level)[..., None]
        g = g[:, :, n:] - level[..., None]
    S = S + phik.transpose(-1, -2) @ vf
    z = z + phik.sum(-2)
    return PowerState(state.k[:, :, n:], state.v[:, :, n:], g, S, z, state.seen)


def takes_decode_kernel(q: Tensor, k: Tensor, v: Tensor, deg: int, use_kernel: bool | None) -> bool:
    """Whether a one-token piece runs through the Triton decode kernel: ``use_kernel=True`` (an error where it
    does not apply), or ``None`` and it applies on CUDA."""
    from ...kernels.power_decode import decode_kernel_applies
    return kernel_choice(use_kernel, decode_kernel_applies(q, k, v, deg), q, lambda: (
        "the decode kernel needs triton, CUDA (or TRITON_INTERPRET=1), deg=2, one new token, fp16/bf16/fp32 inputs "
        f"and head dims d, e in (16, 32, 64, 128); got deg={deg}, {q.dtype} on {q.device}, q {tuple(q.shape)}, "
        f"v {tuple(v.shape)}"))


def _piece(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, state: PowerState, deg: int,
           scale: float, use_kernel: bool | None = False) -> tuple[Tensor, PowerState]:
    """Outputs of ``T_p`` new tokens that need no fold among them, and the state with them appended (one token
    through the Triton decode kernel where ``takes_decode_kernel``)."""
    ct = compute_dtype(q.dtype)
    B, Hq, Tp, _ = q.shape
    Hkv = k.shape[1]
    keys, vals = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
    g = None
    if state.g is not None:
        last = state.g[:, :, -1:] if state.g.shape[2] else state.g.new_zeros(B, Hkv, 1)
        g = torch.cat([state.g, last + torch.cumsum(log_g.to(ct), -1)], 2)
    if Tp == 1 and takes_decode_kernel(q, k, v, deg, use_kernel):
        from ...kernels.power_decode import power_decode_step_triton
        out = power_decode_step_triton(q, keys, vals, g, state.S, state.z, scale)
        return out, PowerState(keys, vals, g, state.S, state.z, state.seen + 1)
    qg = group_queries(q.to(ct), Hkv)                                             # [B, Hkv, R, Tp, d]
    gq = None if g is None else g[:, :, -Tp:]
    w = power_weights(qg, keys.to(ct), gq, g, deg, scale)                         # [B, Hkv, R, Tp, Tk]
    num = w @ vals.to(ct).unsqueeze(2)
    den = w.sum(-1)
    if state.S is not None:
        phiq = sympow(qg, deg) * scale ** deg
        if gq is not None:
            phiq = phiq * torch.exp(gq)[:, :, None, :, None]
        num = num + phiq @ state.S.unsqueeze(2)
        den = den + (phiq @ state.z[:, :, None, :, None]).squeeze(-1)
    out = safe_ratio(num, den).reshape(B, Hq, Tp, -1).to(q.dtype)
    return out, PowerState(keys, vals, g, state.S, state.z, state.seen + Tp)


def power_retention_step(q: Tensor, k: Tensor, v: Tensor, state: PowerState, log_g: Tensor | None = None,
                         deg: int = 2, scale: float | None = None, chunk_size: int = 64,
                         switch_over: int = 128, use_kernel: bool | None = None) -> tuple[Tensor, PowerState]:
    """Consume ``T_new >= 1`` tokens: ``q [B,Hq,T_new,d]``, ``k, v [B,Hkv,T_new,·]``, ``log_g [B,Hkv,T_new]``
    (required exactly when the state is gated). Returns ``(o [B,Hq,T_new,e], new state)``; ``state`` is not
    modified. ``use_kernel``: one-token steps through the Triton decode kernel (CUDA, deg 2, head dims 16–128);
    ``None`` uses it wherever it applies, ``True`` raises where it does not."""
    check_qkv(q, k, v)
    check_deg(deg)
    check_schedule(chunk_size, switch_over)
    if (log_g is None) != (state.g is None):
        raise ValueError("log_g must be given exactly when the state was made gated (init_power_state gated=True)")
    if log_g is not None and tuple(log_g.shape) != tuple(k.shape[:3]):
        raise ValueError(f"log_g must be [batch, kv_heads, T_new] = {tuple(k.shape[:3])}, got {tuple(log_g.shape)}")
    scale = default_scale(q.shape[-1], scale)
    if q.shape[2] >= switch_over:   # pieces would be at most chunk_size tokens each, every one over all recent keys
        return _long_step(q, k, v, log_g, state, deg, scale, chunk_size, switch_over)
    outs, start, T = [], 0, q.shape[2]
    while start < T:
        stop = min(T, start + switch_over - state.k.shape[2])     # the next fold point
        sl = slice(start, stop)
        o, state = _piece(q[:, :, sl], k[:, :, sl], v[:, :, sl], None if log_g is None else log_g[:, :, sl],
                          state, deg, scale, use_kernel)
        outs.append(o)
        if state.k.shape[2] >= switch_over:
            state = _fold(state, chunk_size, deg)
        start = stop
    return torch.cat(outs, 2), state


def _long_step(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, state: PowerState, deg: int, scale: float,
               chunk_size: int, switch_over: int) -> tuple[Tensor, PowerState]:
    """``T_new >= switch_over`` tokens (a prefill) in a few large operations rather than one piece per fold:
    fold the recent tokens, run the chunked form from that state over all but the last ``r`` new tokens, and
    append those ``r`` as recent tokens, ``r`` being what the folding schedule leaves unfolded at the new
    length. The same outputs and the same state layout as the piecewise path (its sums in another order)."""
    from .chunk import power_retention_chunk

    T = q.shape[2]
    r = recent_count(state.seen + T, chunk_size, switch_over)
    if state.k.shape[2]:
        state = _fold(state, state.k.shape[2], deg)
    bulk = T - r
    gate = None if log_g is None else log_g[:, :, :bulk]
    initial = None if state.S is None else (state.S, state.z)
    out, (S, z) = power_retention_chunk(q[:, :, :bulk], k[:, :, :bulk], v[:, :, :bulk], gate, deg, chunk_size, scale,
                                        initial_state=initial, return_state=True)
    folded = PowerState(k[:, :, :0], v[:, :, :0], None if state.g is None else state.g[:, :, :0], S, z,
                        state.seen + bulk)
    if r == 0:
        return out, folded
    tail, state = _piece(q[:, :, bulk:], k[:, :, bulk:], v[:, :, bulk:], None if log_g is None else log_g[:, :, bulk:],
                         folded, deg, scale)
    return torch.cat([out, tail], 2), state
