"""The RayTention signals without the ``T x T`` matrix: keys in blocks, partial statistics merged as flash
attention merges blocks; forward and a blocked backward (a custom ``autograd.Function``).

Per query ``i`` and head, a *partial* over a set of keys holds (everything else is derived at the end):

* ``m, l, acc_c, acc_d, acc_x`` — the softmax stream over ``s_ij = -d_ij / tau``: running max,
  ``sum exp(s - m)``, ``sum exp(s - m) e_j``, ``sum exp(s - m) d_ij`` and ``sum exp(s - m) (s - m)``;
* ``m2, l2, acc_t`` — the temporal stream, the same with logits ``s_ij + (i - j) log gamma`` (the softmax
  weights times ``gamma^(i-j)``, renormalised, are exactly the softmax of these logits);
* ``top_v, top_i`` — the two smallest distances and their key indices, ordered by (distance, index).

Then ``centroid = acc_c / l``, ``temporal = acc_t / l2``, ``spread = acc_d / l``, ``lse = m + log l`` and
``entropy = -sum p log p = log l - acc_x / l`` (exactly 0 for one key: no ``lse - sum p s`` cancellation).

The backward recomputes each block's distances from the saved ``lse``/``lse2`` (flash attention's trick).
With ``g`` the upstream gradients and ``p``/``w`` the two weight matrices, the score gradient is
``ds = p (gC.e_j - gC.C + gS (d - S) - gE (s - sum p s)) + w (gT.e_j - gT.T)``, and ``d`` gets
``gS p - ds / tau``; ``d = |q - e|^2`` passes that on to ``q`` and ``e``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .naive import check_inputs, gather_keys, per_head, predecessor_keys

KeyLoader = Callable[[int, int], Tensor]  # (start, end) -> keys [B, end - start, D]


@dataclass
class Partial:
    """Statistics of queries ``[B, H, Tq]`` over some keys; ``S`` partials stacked on one axis:
    scalars ``[B, H, Tq, S]``, vectors ``[B, H, Tq, S, D]``, ``top_v``/``top_i`` ``[B, H, Tq, S, 2]``."""
    m: Tensor
    l: Tensor
    acc_c: Tensor
    acc_d: Tensor
    acc_x: Tensor
    m2: Tensor
    l2: Tensor
    acc_t: Tensor
    top_v: Tensor
    top_i: Tensor


@dataclass
class Stats:
    """The merged statistics: ``centroid, temporal [B, H, Tq, D]``, ``spread, entropy, lse, lse2 [B, H, Tq]``,
    ``top_i [B, H, Tq, 2]`` (top-1, top-2 key indices)."""
    centroid: Tensor
    temporal: Tensor
    spread: Tensor
    entropy: Tensor
    lse: Tensor
    lse2: Tensor
    top_i: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and sums run in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sq_distances(q: Tensor, k: Tensor) -> Tensor:
    """``|q_i - k_j|^2`` for ``q [B, H, Tq, D]``, ``k [B, Tk, D]``: ``[B, H, Tq, Tk]`` (clamped at 0)."""
    k = k[:, None]
    d = q.pow(2).sum(-1, keepdim=True) + k.pow(2).sum(-1)[:, :, None, :] - 2 * (q @ k.transpose(-1, -2))
    return d.clamp_min(0)


def block_partial(d: Tensor, visible: Tensor, age: Tensor, k: Tensor, inv_tau: Tensor, log_gamma: Tensor,
                  k_start: int) -> Partial:
    """Partial of one key block: ``d [B, H, Tq, Tk]`` distances, ``visible``/``age [Tq, Tk]``, keys
    ``k [B, Tk, D]`` whose first index is ``k_start``; ``inv_tau``/``log_gamma`` ``[H or 1, 1, 1]``."""
    neg_inf = torch.tensor(float("-inf"), dtype=d.dtype, device=d.device)
    s = torch.where(visible, -d * inv_tau, neg_inf)
    t = torch.where(visible, s + age * log_gamma, neg_inf)
    d0 = torch.where(visible, d, torch.zeros_like(d))
    m, m2 = s.amax(-1), t.amax(-1)
    shifted = s - m.nan_to_num(0.0, neginf=0.0)[..., None]
    p = torch.exp(shifted)
    w = torch.exp(t - m2.nan_to_num(0.0, neginf=0.0)[..., None])
    k = k[:, None]
    far = torch.where(visible, d, torch.full_like(d, float("inf")))
    i1 = far.argmin(-1, keepdim=True)                     # first minimum: the lower index wins ties
    v1 = far.gather(-1, i1)
    far = far.scatter(-1, i1, float("inf"))
    i2 = far.argmin(-1, keepdim=True)
    v2 = far.gather(-1, i2)
    return Partial(m=m[..., None], l=p.sum(-1)[..., None], acc_c=(p @ k)[..., None, :],
                   acc_d=(p * d0).sum(-1)[..., None],
                   acc_x=(p * torch.where(visible, shifted, torch.zeros_like(d))).sum(-1)[..., None], m2=m2[..., None], l2=w.sum(-1)[..., None],
                   acc_t=(w @ k)[..., None, :], top_v=torch.cat([v1, v2], -1)[..., None, :],
                   top_i=(torch.cat([i1, i2], -1) + k_start)[..., None, :])


def concat_partials(parts: list[Partial]) -> Partial:
    """Stack partials along the ``S`` axis (their keys must come in increasing index order)."""
    return Partial(*(torch.cat([getattr(p, f) for p in parts], dim=axis) for f, axis in
                     (("m", -1), ("l", -1), ("acc_c", -2), ("acc_d", -1), ("acc_x", -1), ("m2", -1), ("l2", -1),
                      ("acc_t", -2), ("top_v", -2), ("top_i", -2))))


def _rescale(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(max over S, exp(m - max))`` with empty partials (``m = -inf``) weighing 0."""
    top = m.amax(-1, keepdim=True)
    return top.squeeze(-1), torch.exp(m - top.nan_to_num(0.0, neginf=0.0))


def _sum_s(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def combine_partials(part: Partial) -> Partial:
    """Reduce the ``S`` partials of ``part`` (keys in increasing order along ``S``) to one (``S = 1``).
    Ties in distance go to the lower key index."""
    m, a = _rescale(part.m)
    m2, a2 = _rescale(part.m2)
    # sum exp(s - M)(s - M) from each partial's sum about its own max m_p
    shift = torch.where(part.l > 0, part.m - m[..., None], torch.zeros_like(part.m))
    # Candidates sit in (partial, rank) order, which among equal distances is increasing key index, so a
    # stable sort by distance orders them by (distance, index).
    cand_v, cand_i = part.top_v.flatten(-2), part.top_i.flatten(-2)
    order = torch.sort(cand_v, dim=-1, stable=True).indices[..., :2]
    return Partial(m=m[..., None], l=_sum_s(a * part.l), acc_c=(a[..., None] * part.acc_c).sum(-2, keepdim=True),
                   acc_d=_sum_s(a * part.acc_d), acc_x=_sum_s(a * (part.acc_x + shift * part.l)), m2=m2[..., None],
                   l2=_sum_s(a2 * part.l2), acc_t=(a2[..., None] * part.acc_t).sum(-2, keepdim=True),
                   top_v=cand_v.gather(-1, order)[..., None, :], top_i=cand_i.gather(-1, order)[..., None, :])


def finish(part: Partial) -> Stats:
    """The statistics of a single partial (``S = 1``); a query that saw one key only gets it as its top-2."""
    l, l2 = part.l[..., 0], part.l2[..., 0]
    top_v, top_i = part.top_v[..., 0, :], part.top_i[..., 0, :]
    top_i = torch.stack([top_i[..., 0], torch.where(torch.isinf(top_v[..., 1]), top_i[..., 0], top_i[..., 1])], -1)
    return Stats(centroid=part.acc_c[..., 0, :] / l[..., None], temporal=part.acc_t[..., 0, :] / l2[..., None],
                 spread=part.acc_d[..., 0] / l, entropy=torch.log(l) - part.acc_x[..., 0] / l,
                 lse=part.m[..., 0] + torch.log(l), lse2=part.m2[..., 0] + torch.log(l2), top_i=top_i)


def key_blocks(q_offset: int, q_start: int, q_end: int, block_k: int):
    """Key ranges ``[start, end)`` that the queries ``q_start .. q_end - 1`` (offset by ``q_offset``) see."""
    n = q_offset + q_end
    return [(s, min(s + block_k, n)) for s in range(0, n, block_k)]


def positions(q_offset: int, q_start: int, q_end: int, k_start: int, k_end: int, device, dtype):
    """``visible [Tq, Tk]`` (key index <= query position) and ``age = i - j`` for a query/key block."""
    pq = q_offset + torch.arange(q_start, q_end, device=device)
    pk = torch.arange(k_start, k_end, device=device)
    return pk[None, :] <= pq[:, None], (pq[:, None] - pk[None, :]).to(dtype)


def blocked_stats(q: Tensor, load_keys: KeyLoader, tau: Tensor, log_gamma: Tensor, q_offset: int = 0,
                  block_q: int = 256, block_k: int = 256) -> Stats:
    """Forward statistics of ``q [B, H, Tq, D]`` at positions ``q_offset ..`` over keys ``0 .. q_offset+Tq-1``
    fetched block by block from ``load_keys``; ``tau``/``log_gamma`` ``[H]``. Memory: one
    ``[B, H, block_q, block_k]`` tile and a running partial at a time. Runs in float32 for half inputs."""
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q and block_k must be positive, got {block_q}, {block_k}")
    cdt = compute_dtype(q.dtype)
    q = q.to(cdt)
    inv_tau, lg = (1 / tau).to(cdt).reshape(-1, 1, 1), log_gamma.to(cdt).reshape(-1, 1, 1)
    out = []
    for qs in range(0, q.shape[2], block_q):
        qe = min(qs + block_q, q.shape[2])
        qb, run = q[:, :, qs:qe], None
        for ks, ke in key_blocks(q_offset, qs, qe, block_k):
            k = load_keys(ks, ke).to(cdt)
            visible, age = positions(q_offset, qs, qe, ks, ke, q.device, cdt)
            part = block_partial(sq_distances(qb, k), visible, age, k, inv_tau, lg, ks)
            run = part if run is None else combine_partials(concat_partials([run, part]))
        out.append(finish(run))
    return Stats(*(torch.cat([getattr(s, f) for s in out], dim=2) for f in Stats.__dataclass_fields__))


def blocked_backward(q: Tensor, e: Tensor, tau: Tensor, log_gamma: Tensor, st: Stats, g_c: Tensor, g_t: Tensor,
                     g_s: Tensor, g_e: Tensor, q_offset: int, block_q: int, block_k: int):
    """Gradients of ``sum(gC.centroid + gT.temporal + gS spread + gE entropy)`` with respect to
    ``q [B,H,Tq,D]``, ``e [B,Tk,D]``, ``tau [H]``, ``log_gamma [H]``, block by block (see module doc)."""
    cdt = compute_dtype(q.dtype)
    qf = q.to(cdt)
    H = q.shape[1]
    inv_tau, lg = (1 / tau).to(cdt).reshape(-1, 1, 1), log_gamma.to(cdt).reshape(-1, 1, 1)
    dq, de = torch.zeros_like(qf), torch.zeros(e.shape, dtype=cdt, device=e.device)
    d_tau = torch.zeros(H, dtype=cdt, device=q.device)
    d_lg = torch.zeros(H, dtype=cdt, device=q.device)
    delta_c, delta_t = (g_c * st.centroid).sum(-1), (g_t * st.temporal).sum(-1)     # [B, H, Tq]
    mean_s = -st.spread * inv_tau.reshape(1, -1, 1)                                       # sum_j p s
    for qs in range(0, q.shape[2], block_q):
        qe = min(qs + block_q, q.shape[2])
        sl = slice(qs, qe)
        qb, gc, gt = qf[:, :, sl], g_c[:, :, sl], g_t[:, :, sl]
        gs, ge = g_s[:, :, sl, None], g_e[:, :, sl, None]
        for ks, ke in key_blocks(q_offset, qs, qe, block_k):
            k = e[:, ks:ke].to(cdt)
            visible, age = positions(q_offset, qs, qe, ks, ke, q.device, cdt)
            d = torch.where(visible, sq_distances(qb, k), torch.zeros((), dtype=cdt, device=q.device))
            s = -d * inv_tau
            p = torch.where(visible, torch.exp(s - st.lse[:, :, sl, None]), 0.0)
            w = torch.where(visible, torch.exp(s + age * lg - st.lse2[:, :, sl, None]), 0.0)
            kt = k[:, None].transpose(-1, -2)
            w_grad = w * (gt @ kt - delta_t[:, :, sl, None])
            ds = p * (gc @ kt - delta_c[:, :, sl, None] + gs * (d - st.spread[:, :, sl, None])
                      - ge * (s - mean_s[:, :, sl, None])) + w_grad
            g = gs * p - ds * inv_tau                                                 # dL/dd
            dq[:, :, sl] += 2 * (qb * g.sum(-1, keepdim=True) - g @ k[:, None])
            gq = (g.transpose(-1, -2) @ qb).sum(1)                                     # [B, Tk, D]
            de[:, ks:ke] += (-2 * (gq - k * g.sum((1, 2))[..., None])
                             + (p.transpose(-1, -2) @ gc).sum(1) + (w.transpose(-1, -2) @ gt).sum(1))
            d_tau += (ds * d).sum((0, 2, 3)) * inv_tau.reshape(-1) ** 2
            d_lg += (w_grad * age).sum((0, 2, 3))
    return dq.to(q.dtype), de.to(e.dtype), d_tau.to(tau.dtype), d_lg.to(log_gamma.dtype)


class _SoftmaxSignals(torch.autograd.Function):
    """``(q, e, tau [H], log_gamma [H]) -> (centroid, temporal, spread, entropy, top_i)`` with the blocked
    forward and the blocked backward; ``top_i`` is not differentiable."""

    @staticmethod
    def forward(ctx, q, e, tau, log_gamma, q_offset, block_q, block_k):
        st = blocked_stats(q, lambda s, t: e[:, s:t], tau, log_gamma, q_offset, block_q, block_k)
        ctx.save_for_backward(q, e, tau, log_gamma, st.centroid, st.temporal, st.spread, st.entropy, st.lse,
                              st.lse2)
        ctx.blocks = (q_offset, block_q, block_k)
        ctx.mark_non_differentiable(st.top_i)
        return st.centroid, st.temporal, st.spread, st.entropy, st.top_i

    @staticmethod
    def backward(ctx, g_c, g_t, g_s, g_e, _):
        q, e, tau, log_gamma, c, t, s, en, lse, lse2 = ctx.saved_tensors
        g_c = torch.zeros_like(c) if g_c is None else g_c
        g_t = torch.zeros_like(t) if g_t is None else g_t
        g_s = torch.zeros_like(s) if g_s is None else g_s
        g_e = torch.zeros_like(en) if g_e is None else g_e
        st = Stats(c, t, s, en, lse, lse2, top_i=None)
        grads = blocked_backward(q, e, tau, log_gamma, st, g_c, g_t, g_s, g_e, *ctx.blocks)
        return (*grads, None, None, None)


def raytention_signals(q: Tensor, e: Tensor, tau, log_gamma, q_offset: int = 0, block_q: int = 256,
                       block_k: int = 256, return_indices: bool = False):
    """The seven signals of ``q [B, H, Tq, D]`` (positions ``q_offset ..``) over ``e [B, q_offset + Tq, D]``,
    blocked: ``[B, H, Tq, 5D+2]`` laid out as in ``naive``; with ``return_indices`` also the top-1/top-2 key
    indices ``[B, H, Tq, 2]``. ``tau``/``log_gamma``: scalars or ``[H]``. Differentiable in ``q, e, tau,
    log_gamma`` with a blocked backward (memory ``O(T D)`` plus one ``[B, H, block_q, block_k]`` tile)."""
    check_inputs(q, e, q_offset)
    H, Tq = q.shape[1], q.shape[2]
    tau_h = per_head(tau, H, q, "tau").reshape(-1).expand(H)
    lg_h = per_head(log_gamma, H, q, "log_gamma").reshape(-1).expand(H)
    c, t, s, en, top_i = _SoftmaxSignals.apply(q, e, tau_h, lg_h, q_offset, block_q, block_k)
    pos = q_offset + torch.arange(Tq, device=q.device)
    dt = q.dtype
    out = torch.cat([c.to(dt), t.to(dt), predecessor_keys(e, pos, H), gather_keys(e, top_i[..., 0]),
                     gather_keys(e, top_i[..., 1]), s[..., None].to(dt), en[..., None].to(dt)], -1)
    return (out, top_i) if return_indices else out


@torch.no_grad()
def raytention_signals_lookup(q: Tensor, ids: Tensor, table: Tensor, tau, log_gamma, q_offset: int = 0,
                              block_q: int = 256, block_k: int = 256) -> Tensor:
    """``raytention_signals(q, table[ids], ...)`` without gradients and without the ``[B, T, D]`` key tensor:
    ``ids [B, q_offset + Tq]`` token ids, ``table [V, D]`` the embedding table; each key block is looked up
    when it is scored, and the predecessor / top-1 / top-2 keys by their ids. For decoding over a long
    history, where ``table[ids]`` would be the largest tensor alive (1M tokens x 256 bf16 = 512 MiB)."""
    if q.dim() != 4 or table.dim() != 2 or table.shape[1] != q.shape[3] or table.dtype != q.dtype:
        raise ValueError(f"q must be [batch, heads, queries, D] and table [vocab, D] of q's dtype, got q "
                         f"{tuple(q.shape)} {q.dtype} and table {tuple(table.shape)} {table.dtype}")
    if ids.dim() != 2 or ids.shape[0] != q.shape[0] or ids.shape[1] != q_offset + q.shape[2]:
        raise ValueError(f"ids must be [{q.shape[0]}, q_offset + queries = {q_offset + q.shape[2]}], "
                         f"got {tuple(ids.shape)}")
    H, Tq = q.shape[1], q.shape[2]
    tau_h = per_head(tau, H, q, "tau").reshape(-1).expand(H)
    lg_h = per_head(log_gamma, H, q, "log_gamma").reshape(-1).expand(H)
    st = blocked_stats(q, lambda s, t: table[ids[:, s:t]], tau_h, lg_h, q_offset, block_q, block_k)
    pos = q_offset + torch.arange(Tq, device=q.device)
    prev = table[ids[:, (pos - 1).clamp_min(0)]] * (pos > 0).to(q.dtype)[:, None]        # [B, Tq, D]
    top = [table[ids.gather(1, st.top_i[..., r].reshape(ids.shape[0], -1))].view(*st.top_i.shape[:3], -1)
           for r in (0, 1)]
    dt = q.dtype
    return torch.cat([st.centroid.to(dt), st.temporal.to(dt), prev[:, None].expand(-1, H, -1, -1), *top,
                      st.spread[..., None].to(dt), st.entropy[..., None].to(dt)], -1)
