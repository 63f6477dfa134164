"""Power retention of a stretch of tokens that continues an incoming state, through the Triton kernel.

The kernel starts every sequence from a zero state. Numerator and normaliser are linear in the state entering
the stretch, so for query ``i`` of the stretch (``q [B, Hq, T, d]``, ``k [B, Hkv, T, d]``, ``v [B, Hkv, T, e]``)::

    num_i = num_i^own + r_i phi(q_i) . S_in      den_i = den_i^own + r_i phi(q_i) . z_in      o_i = num_i / den_i

with ``r_i = scale^deg exp(G_i)``, ``G_i`` the gate summed from the stretch's first token through ``i``, and
``num^own = o^own den^own`` what the kernel computes from zero (``power_retention_triton(return_den=True)``; the
chunked form's ``read_chunks_with_den`` where the kernel does not apply). The state the stretch leaves from zero,
on the gate level of its last token, is ``S = sum_j exp(G_T - G_j) phi(k_j) v_j^T``, ``z = sum_j exp(G_T - G_j)
phi(k_j)``. Both sides are kept as one tensor ``X = [S | z]`` of ``[B, Hkv, D, e + 1]`` (``D`` the expanded dim).

``read_state`` and ``stretch_state`` form the features ``phi`` of one block of tokens at a time (about
``BLOCK_BYTES`` of float32) under activation checkpointing, so their memory is a block's features, not ``T x D``;
the gate's running sum is taken in float64. Arithmetic float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...attention import check_qkv
from .chunk import (_check_state, check_chunk_size, cut_chunks, empty_state, power_retention_chunk,
                    read_chunks_with_den, takes_kernel)
from .expand import check_deg, expanded_dim, sympow
from .naive import check_gate, compute_dtype, default_scale, group_queries, safe_ratio

BLOCK_BYTES = 128 << 20   # float32 features of one block of tokens (all heads) in read_state / stretch_state


def _gate_sums(log_g: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """``G [B, Hkv, T]`` float64: the gate summed from the first token through each (zeros without a gate)."""
    if log_g is None:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    return torch.cumsum(log_g.double(), -1)


def _block(tokens: int, per_token_bytes: int) -> int:
    return max(1, min(tokens, BLOCK_BYTES // max(1, per_token_bytes)))


def _state_block(kb: Tensor, vb: Tensor, deg: int) -> Tensor:
    return sympow(kb, deg).transpose(-1, -2) @ vb


def _read_block(qb: Tensor, X: Tensor, deg: int) -> Tensor:
    return sympow(qb, deg) @ X


def stretch_state(k: Tensor, v: Tensor, log_g: Tensor | None, deg: int) -> tuple[Tensor, Tensor]:
    """The state a stretch leaves from zero, ``X = [S | z]`` of ``[B, Hkv, D, e + 1]`` on the gate level of its last
    token, and its log-decay ``a [B, Hkv]`` (the gate summed over the stretch), in the arithmetic dtype, from
    ``k [B, Hkv, T, d]``, ``v [B, Hkv, T, e]``, ``log_g [B, Hkv, T]`` (already checked: ``check_gate``).
    Differentiable."""
    ct = compute_dtype(k.dtype)
    B, Hkv, T, d = k.shape
    G = _gate_sums(log_g, k.shape[:3], k.device)
    w = torch.exp(G[..., -1:] - G).to(ct)                                        # [B, Hkv, T], each <= 1
    vw = torch.cat([v.to(ct), torch.ones_like(v[..., :1], dtype=ct)], -1) * w[..., None]
    blk = _block(T, B * Hkv * expanded_dim(d, deg) * torch.finfo(ct).bits // 8)
    kc = k.to(ct)
    X = sum(checkpoint(_state_block, kc[:, :, t:t + blk], vw[:, :, t:t + blk], deg, use_reentrant=False)
            for t in range(0, T, blk))
    return X, G[..., -1].to(ct)


def read_state(q: Tensor, log_g: Tensor | None, X: Tensor, deg: int, scale: float) -> tuple[Tensor, Tensor]:
    """What the state ``X = [S | z]`` (``[B, Hkv, D, e + 1]``, on the gate level just before the stretch's first
    token) adds to each query of the stretch: ``(num [B, Hq, T, e], den [B, Hq, T])``, ``r_i phi(q_i) . S`` and
    ``r_i phi(q_i) . z``, in X's dtype. ``log_g [B, Hkv, T]`` already checked. Differentiable in all three."""
    B, Hq, T, d = q.shape
    Hkv, e = X.shape[1], X.shape[-1] - 1
    G = _gate_sums(log_g, (B, Hkv, T), q.device)
    r = ((scale ** deg) * torch.exp(G)).to(X.dtype)                             # [B, Hkv, T]
    qg = group_queries(q.to(X.dtype), Hkv)                                       # [B, Hkv, R, T, d]
    blk = _block(T, B * Hq * X.shape[2] * X.element_size())
    Xr = X.unsqueeze(2)
    out = torch.cat([checkpoint(_read_block, qg[..., t:t + blk, :], Xr, deg, use_reentrant=False)
                     for t in range(0, T, blk)], -2) * r[:, :, None, :, None]   # [B, Hkv, R, T, e + 1]
    out = out.reshape(B, Hq, T, e + 1)
    return out[..., :e], out[..., e]


def continue_from(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, X: Tensor, deg: int, chunk_size: int,
                  scale: float, use_kernel: bool | None = None) -> Tensor:
    """``o [B, Hq, T, e]`` in q's dtype, the stretch read from the incoming ``X = [S | z]`` (inputs checked by the
    caller, ``log_g`` by ``check_gate``): the kernel's (or the chunked form's) own rows plus ``read_state``."""
    if takes_kernel(q, k, v, deg, chunk_size, use_kernel):
        from .chunk_triton import power_retention_triton
        o_own, den_own = power_retention_triton(q, k, v, log_g, chunk_size=chunk_size, scale=scale,
                                                return_den=True)
    else:
        o_own, den_own = read_chunks_with_den(cut_chunks(q, k, v, log_g, deg, chunk_size, scale))
    num_in, den_in = read_state(q, log_g, X, deg, scale)
    num = o_own.to(X.dtype) * den_own.to(X.dtype)[..., None] + num_in
    return safe_ratio(num, den_own.to(X.dtype) + den_in).to(q.dtype)


def power_retention_continued(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None,
                              initial_state: tuple[Tensor, Tensor] | None, deg: int = 2, chunk_size: int = 64,
                              scale: float | None = None, use_kernel: bool | None = None, return_state: bool = False):
    """Power retention of ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]``, ``log_g [B,Hkv,T]`` (optional gate,
    ``<= 0``) continuing ``initial_state = (S [B,Hkv,D,e], z [B,Hkv,D])`` (on the gate level just before the first
    token, as ``power_retention_chunk``'s; ``None``: from zero): ``o [B,Hq,T,e]`` in q's dtype, and with
    ``return_state`` also the state after the last token (arithmetic dtype); equal to ``power_retention_chunk(...,
    initial_state=...)`` and differentiable in all six. Where the Triton kernel applies (``use_kernel`` as in
    ``power_retention``) it computes the stretch's own part and ``continue_from`` adds the state's (the state after:
    ``exp(a) X_in + stretch_state``); elsewhere the chunked form continues the state itself, at no extra cost."""
    check_qkv(q, k, v)
    check_deg(deg)
    check_chunk_size(chunk_size)
    log_g = check_gate(log_g, k)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same length, got {q.shape[2]} and {k.shape[2]}")
    B, Hkv, _, d = k.shape
    e, ct = v.shape[-1], compute_dtype(q.dtype)
    if initial_state is not None:
        S, z = initial_state
        _check_state(initial_state, B, Hkv, expanded_dim(d, deg), e, ct)
        if S.device != q.device or z.device != q.device:
            raise ValueError(f"initial_state is on {S.device} / {z.device}, q on {q.device}")
    if q.shape[2] == 0:   # nothing to continue: an empty output, the same state
        o = q.new_empty(*q.shape[:3], e)
        if not return_state:
            return o
        return o, initial_state if initial_state is not None else empty_state(B, Hkv, d, e, deg, q.device, ct)
    if not takes_kernel(q, k, v, deg, chunk_size, use_kernel):
        return power_retention_chunk(q, k, v, log_g, deg, chunk_size, scale, initial_state=initial_state,
                                     return_state=return_state)
    scale = default_scale(d, scale)
    if initial_state is None:   # the kernel alone: no state to read
        from .chunk_triton import power_retention_triton
        o, X = power_retention_triton(q, k, v, log_g, chunk_size=chunk_size, scale=scale), None
    else:
        X = torch.cat([S.to(ct), z.to(ct).unsqueeze(-1)], -1)
        o = continue_from(q, k, v, log_g, X, deg, chunk_size, scale, use_kernel=True)
    if not return_state:
        return o
    own, log_decay = stretch_state(k, v, log_g, deg)
    X = own if X is None else torch.exp(log_decay)[..., None, None] * X + own
    return o, (X[..., :e], X[..., e])


__all__ = ["power_retention_continued", "continue_from", "read_state", "stretch_state"]
