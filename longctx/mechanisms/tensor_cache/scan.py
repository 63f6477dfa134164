"""Tensor Cache training form: the memory read of every query at once, chunked (no T x T matrix).

With evicted index ``m = i - W`` the exact memory read of query ``i`` is a decayed linear attention

    r_i = sum_{j <= m} lam**(m - j) * (phi(q_i) . phi(k_j)) * eta * v_j,

i.e. queries shifted ``W`` places ahead of the keys they may read. ``decayed_scan`` evaluates it in chunks
of ``C`` rows: within a chunk a decay-masked ``C x C`` product of queries and keys (causal: row ``m`` sees
columns ``<= m``, weight ``lam**(m - j)``), across chunks a carried ``[D, Dv]`` state (``_carry``: about
``sqrt(T / C)`` sequential steps), so memory is ``O(T * C + T * D * Dv / C)``. Autograd gives the backward pass. ``chunk_mean_scan`` is the
shortcut that writes one mean key/value pair per chunk (see ``naive`` for its exact definition).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunked(x: Tensor, chunk: int) -> Tensor:
    """``[..., n, d]`` -> ``[..., N, chunk, d]`` with ``N = ceil(n / chunk)``, zero-padded at the end."""
    n = x.shape[-2]
    pad = -n % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (x.shape[-2] // chunk, chunk))


def _check(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, chunk: int) -> None:
    if q.dim() != 5 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B,Hkv,G,n,D], k [B,Hkv,n,D], v [B,Hkv,n,Dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-2] != k.shape[-2] or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if lam.shape != (k.shape[1],):
        raise ValueError(f"lam must have shape [Hkv]=({k.shape[1]},), got {tuple(lam.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def _carry(start: Tensor, writes: Tensor, decay: Tensor) -> Tensor:
    """States around each chunk: ``P_0 = start``, ``P_{c+1} = decay * P_c + writes_c``.

    ``start [B,H,D,Dv]``, ``writes [B,H,N,D,Dv]``, ``decay [H]`` -> ``[B,H,N+1,D,Dv]``. Two levels, so the
    sequential part is ``~sqrt(N)`` steps: groups of ``S = ceil(sqrt(N))`` chunks are summed with an ``S x S``
    decay matrix, then a short loop carries the state from group to group.
    """
    B, H, N, D, Dv = writes.shape
    S = math.isqrt(N - 1) + 1 if N > 1 else 1
    M = -(-N // S)
    w = F.pad(writes.flatten(-2), (0, 0, 0, M * S - N)).unflatten(2, (M, S))   # [B,H,M,S,X]
    s = torch.arange(S, device=writes.device, dtype=writes.dtype)
    a = decay.to(writes.dtype).view(H, 1, 1)
    gap = s[:, None] - s[None, :]
    within = torch.where(gap >= 0, a ** gap.clamp_min(0), torch.zeros((), dtype=w.dtype, device=w.device))
    local = within.view(1, H, 1, S, S) @ w                                    # inclusive prefix inside a group
    group_decay = (a ** S).view(1, H, 1)
    heads = [start.flatten(-2)]                                               # state before each group
    for m in range(M - 1):
        heads.append(group_decay * heads[-1] + local[:, :, m, -1])
    heads = torch.stack(heads, dim=2)                                         # [B,H,M,X]
    after = (a.view(1, H, 1, 1, 1) ** (s + 1).view(1, 1, 1, S, 1)) * heads.unsqueeze(3) + local
    after = after.flatten(2, 3)[:, :, :N]
    return torch.cat([start.flatten(-2).unsqueeze(2), after], dim=2).unflatten(-1, (D, Dv))


def decayed_scan(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, chunk: int = 64,
                 state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``r_m = q_m . (lam**(m+1) * state + sum_{j<=m} lam**(m-j) k_j v_j^T)`` for every row ``m``.

    ``q [B,Hkv,G,n,D]`` (G query heads per KV head), ``k [B,Hkv,n,D]``, ``v [B,Hkv,n,Dv]`` (already scaled by
    the write rate), ``lam [Hkv]`` in ``[0, 1]``, ``state [B,Hkv,D,Dv]`` or None (zeros).
    Returns ``(r [B,Hkv,G,n,Dv], final state [B,Hkv,D,Dv])`` (the memory after all ``n`` writes).
    """
    _check(q, k, v, lam, chunk)
    B, H, G, n, D = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, D, Dv)
    if n == 0:
        return q.new_zeros(B, H, G, 0, Dv), state
    C = min(chunk, n)
    qc, kc, vc = _chunked(q, C), _chunked(k, C), _chunked(v, C)            # [.., N, C, .]
    idx = torch.arange(C, device=q.device, dtype=q.dtype)
    lam_ = lam.to(q.dtype).view(H, 1, 1)
    gap = idx[:, None] - idx[None, :]                                        # row - column
    within = torch.where(gap >= 0, lam_ ** gap.clamp_min(0), torch.zeros((), dtype=q.dtype, device=q.device))
    scores = qc @ kc.unsqueeze(2).transpose(-1, -2)                          # [B,H,G,N,C,C]
    intra = (scores * within.view(1, H, 1, 1, C, C)) @ vc.unsqueeze(2)
    to_end = lam_.view(H, 1) ** (C - 1 - idx)                               # [H, C]
    writes = (kc * to_end.view(1, H, 1, C, 1)).transpose(-1, -2) @ vc       # [B,H,N,D,Dv]
    states = _carry(state, writes, lam.to(q.dtype) ** C)                     # [B,H,N+1,D,Dv]
    from_start = lam_.view(H, 1) ** (idx + 1)                                # [H, C]
    inter = (qc * from_start.view(1, H, 1, 1, C, 1)) @ states[:, :, :-1].unsqueeze(2)
    r = (intra + inter).flatten(3, 4)[:, :, :, :n]
    rem = n - (qc.shape[3] - 1) * C                                          # rows in the last chunk
    if rem == C:
        return r, states[:, :, -1].clone()               # a view would keep all N+1 states alive
    tail = (kc[:, :, -1, :rem] * (lam_.view(H, 1) ** (rem - 1 - idx[:rem])).view(1, H, rem, 1))
    final = lam.to(q.dtype).view(1, H, 1, 1) ** rem * states[:, :, -2] + tail.transpose(-1, -2) @ vc[:, :, -1, :rem]
    return r, final


def chunk_mean_scan(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, chunk: int) -> Tensor:
    """The chunk-mean shortcut, evicted stream starting at a chunk boundary with an empty memory.

    Chunk ``c`` (rows ``[cC, (c+1)C)``) is written once complete: ``A <- lam**C A + C * mean(k) mean(v)^T``;
    row ``m`` reads ``A`` holding the chunks whose last row is ``<= m``. Shapes as in ``decayed_scan``;
    returns ``r [B,Hkv,G,n,Dv]``.
    """
    _check(q, k, v, lam, chunk)
    B, H, G, n, D = q.shape
    Dv = v.shape[-1]
    if n == 0:
        return q.new_zeros(B, H, G, 0, Dv)
    C = chunk
    qc, kc, vc = _chunked(q, C), _chunked(k, C), _chunked(v, C)
    N = qc.shape[3]
    complete = torch.arange(N, device=q.device) < n // C                     # the last chunk may be partial
    sk, sv = kc.sum(-2), vc.sum(-2)                                          # [B,H,N,D], [B,H,N,Dv]
    writes = (sk.unsqueeze(-1) * sv.unsqueeze(-2)) / C * complete.view(1, 1, N, 1, 1)
    states = _carry(q.new_zeros(B, H, D, Dv), writes, lam.to(q.dtype) ** C)
    early = qc[..., :-1, :] @ states[:, :, :-1].unsqueeze(2)                # rows before the chunk is complete
    last = qc[..., -1:, :] @ states[:, :, 1:].unsqueeze(2)                   # the last row sees the chunk's write
    r = torch.cat([early, last], dim=-2)                                     # [B,H,G,N,C,Dv]
    return r.flatten(3, 4)[:, :, :, :n]
