"""The RayTention signals written as their definition, with the full ``T x T`` distance matrix: the test oracle.

For a query ``q_i`` (absolute position ``i``) and the keys ``e_j`` (token embeddings, ``j <= i``):

* ``d_ij = ||q_i - e_j||^2`` and ``s_ij = -d_ij / tau``; ``p_ij = softmax_j(s_ij)`` over ``j <= i``;
* centroid ``sum_j p_ij e_j``;
* temporal centroid ``sum_j w_ij e_j`` with ``w_ij = p_ij gamma^(i-j) / sum_j p_ij gamma^(i-j)``;
* predecessor ``e_{i-1}`` (zeros for ``i = 0``);
* top-1 / top-2: the keys with the smallest and second smallest ``d_ij``; equal distances go to the lower
  index; for ``i = 0`` (one visible key) top-2 is the top-1 key;
* spread ``sum_j p_ij d_ij`` (the weighted mean *squared* distance);
* entropy ``-sum_j p_ij log p_ij`` (nats).

Signals are laid out ``[centroid | temporal | predecessor | top1 | top2 | spread | entropy]`` on the last
axis: ``5 D + 2`` numbers per query and head.
"""
from __future__ import annotations

import torch
from torch import Tensor


def signal_width(d: int) -> int:
    """Numbers per query and head for key width ``d``: five ``d``-vectors and two scalars."""
    return 5 * d + 2


def per_head(x: Tensor | float, n_head: int, like: Tensor, name: str) -> Tensor:
    """A scalar or ``[H]`` parameter as ``[H or 1, 1, 1]`` (broadcasts against ``[B, H, Tq, Tk]``)."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if x.dim() == 0:
        return x.view(1, 1, 1)
    if x.shape != (n_head,):
        raise ValueError(f"{name} must be a scalar or have shape [{n_head}] (one per head), got {tuple(x.shape)}")
    return x.view(n_head, 1, 1)


def check_inputs(q: Tensor, e: Tensor, q_offset: int) -> None:
    """Raise a clear error unless ``q [B, H, Tq, D]`` and ``e [B, q_offset + Tq, D]`` fit together."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, queries, dim], got shape {tuple(q.shape)}")
    if e.dim() != 3:
        raise ValueError(f"e must be [batch, keys, dim] (token embeddings shared by heads), got {tuple(e.shape)}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    B, _, Tq, D = q.shape
    if e.shape[0] != B or e.shape[2] != D:
        raise ValueError(f"e must be [{B}, keys, {D}] to match q {tuple(q.shape)}, got {tuple(e.shape)}")
    if e.shape[1] != q_offset + Tq:
        raise ValueError(f"e must hold q_offset + queries = {q_offset + Tq} keys (every key up to the last "
                         f"query), got {e.shape[1]}")
    if q.dtype != e.dtype:
        raise ValueError(f"q and e must share a dtype, got {q.dtype} and {e.dtype}")


def gather_keys(e: Tensor, idx: Tensor) -> Tensor:
    """``e [B, Tk, D]`` at ``idx [B, H, Tq]`` -> ``[B, H, Tq, D]`` (differentiable in ``e``)."""
    B, H, Tq = idx.shape
    flat = idx.reshape(B, H * Tq, 1).expand(B, H * Tq, e.shape[2])
    return e.gather(1, flat).view(B, H, Tq, e.shape[2])


def predecessor_keys(e: Tensor, positions: Tensor, n_head: int) -> Tensor:
    """``e_{i-1}`` for each query position ``i`` (``positions [Tq]``), zeros at ``i = 0``: ``[B, H, Tq, D]``."""
    B, _, D = e.shape
    prev = e[:, (positions - 1).clamp_min(0)] * (positions > 0).to(e.dtype)[:, None]
    return prev[:, None].expand(B, n_head, positions.shape[0], D)


def raytention_signals_naive(q: Tensor, e: Tensor, tau, log_gamma, q_offset: int = 0,
                             return_indices: bool = False):
    """Signals of queries ``q [B, H, Tq, D]`` at positions ``q_offset ..`` over keys ``e [B, q_offset+Tq, D]``.

    ``tau`` (> 0) and ``log_gamma`` (= log of the decay, < 0) are scalars or ``[H]``. Returns
    ``[B, H, Tq, 5D+2]``, and with ``return_indices`` also the top-1/top-2 key indices ``[B, H, Tq, 2]``.
    """
    check_inputs(q, e, q_offset)
    B, H, Tq, D = q.shape
    Tk = e.shape[1]
    tau, log_gamma = per_head(tau, H, q, "tau"), per_head(log_gamma, H, q, "log_gamma")
    pos_q = q_offset + torch.arange(Tq, device=q.device)
    pos_k = torch.arange(Tk, device=q.device)
    visible = pos_k[None, :] <= pos_q[:, None]                                  # [Tq, Tk]

    dist = (q[:, :, :, None, :] - e[:, None, None, :, :]).pow(2).sum(-1)        # [B, H, Tq, Tk]
    logp = torch.log_softmax((-dist / tau).masked_fill(~visible, float("-inf")), -1)
    p = logp.exp()
    keys = e[:, None]                                                           # [B, 1, Tk, D]
    centroid = p @ keys

    age = (pos_q[:, None] - pos_k[None, :]).to(q.dtype)
    decay = torch.exp(torch.where(visible, age * log_gamma, torch.full_like(age * log_gamma, float("-inf"))))
    w = p * decay
    temporal = (w / w.sum(-1, keepdim=True)) @ keys

    far = dist.detach().masked_fill(~visible, float("inf"))
    top1 = far.argmin(-1)                                                       # first minimum: lowest index
    top2 = far.scatter(-1, top1[..., None], float("inf")).argmin(-1)
    top2 = torch.where(pos_q == 0, top1, top2)                                  # one visible key: repeat it

    spread = (p * dist.masked_fill(~visible, 0.0)).sum(-1, keepdim=True)
    entropy = -(p * logp.masked_fill(~visible, 0.0)).sum(-1, keepdim=True)
    out = torch.cat([centroid, temporal, predecessor_keys(e, pos_q, H), gather_keys(e, top1),
                     gather_keys(e, top2), spread, entropy], -1)
    return (out, torch.stack([top1, top2], -1)) if return_indices else out
