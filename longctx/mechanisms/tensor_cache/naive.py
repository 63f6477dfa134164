"""Tensor Cache, token by token: the readable definition and the tests' oracle (works in float64).

With window ``W`` query ``i`` sees keys ``i - W < j <= i`` exactly, so token ``j`` leaves the window when token
``j + W`` arrives. For every head, token ``i`` (0-based) is processed in this order:

1. token ``j = i - W`` leaves the window (if ``i >= W``) and is written to the memory of its KV head:
   ``write="exact"``:      ``A <- lam * A + eta * phi(k_j) v_j^T``;
   ``write="chunk_mean"``: evicted tokens are grouped in chunks of ``chunk`` consecutive tokens
   (evicted indices ``[c*C, (c+1)*C)``); a chunk is written once its last token has left:
   ``A <- lam**C * A + eta * C * mean(phi(k)) mean(v)^T``;
2. L1 = softmax attention of ``q_i`` over keys ``(i - W, i]`` (scale ``1/sqrt(d)``);
   L2 = ``phi(q_i)^T A``: the write of step 1 is included, so ``A`` holds tokens ``j <= i - W`` and every
   token ``0..i`` is seen exactly once, by L1 or by L2;
3. ``out_i = sigmoid(g) * L1 + (1 - sigmoid(g)) * L2``.

The paper writes the chunk-mean shortcut as ``A <- lam' A + eta' mean(k) mean(v)^T``; with learned ``lam'``,
``eta'`` that is the same family as ours (``lam' = lam**C``, ``eta' = C * eta``), scaled here so that the per-token
decay and the write mass match the exact form. Then ``exact - chunk_mean`` per chunk is
``eta * sum_j (k_j - mean k)(v_j - mean v)^T``: ``C * mean(k) mean(v)^T = (1/C) sum_{j,l} k_j v_l^T`` carries
the ``C^2 - C`` cross-token products ``j != l`` and only ``1/C`` of the true ones.

``phi`` is the identity or (``feature="normalize"``) scaling to unit norm. ``lam, eta [Hkv]`` belong to the
memory (one per KV head), ``gate [Hq]`` to the output head; query head ``h`` reads KV head ``h // (Hq/Hkv)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEATURES = ("identity", "normalize")
WRITES = ("exact", "chunk_mean")


def feature_map(x: Tensor, feature: str) -> Tensor:
    """``phi(x)`` on the last dimension: ``"identity"`` or ``"normalize"`` (unit L2 norm)."""
    if feature == "identity":
        return x
    if feature == "normalize":
        return F.normalize(x, dim=-1, eps=1e-6)
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


def tensor_cache_naive(q: Tensor, k: Tensor, v: Tensor, window: int, lam: Tensor, eta: Tensor, gate: Tensor,
                       feature: str = "identity", write: str = "exact", chunk: int = 16) -> Tensor:
    """Token-by-token Tensor Cache. ``q [B,Hq,T,D]``, ``k [B,Hkv,T,D]``, ``v [B,Hkv,T,Dv]``,
    ``lam, eta [Hkv]``, ``gate [Hq]`` (logits) -> ``o [B,Hq,T,Dv]``. Differentiable, slow: an oracle."""
    if write not in WRITES:
        raise ValueError(f"write must be one of {WRITES}, got {write!r}")
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    group = Hq // Hkv
    fq, fk = feature_map(q, feature), feature_map(k, feature)
    A = q.new_zeros(B, Hkv, D, Dv)
    sum_k, sum_v, pending = q.new_zeros(B, Hkv, D), q.new_zeros(B, Hkv, Dv), 0
    lam_, eta_ = lam.view(1, Hkv, 1, 1), eta.view(1, Hkv, 1, 1)
    mix = torch.sigmoid(gate).view(1, Hq, 1)
    outs = []
    for i in range(T):
        j = i - window
        if j >= 0:
            if write == "exact":
                A = lam_ * A + eta_ * fk[:, :, j, :, None] * v[:, :, j, None, :]
            else:
                sum_k, sum_v, pending = sum_k + fk[:, :, j], sum_v + v[:, :, j], pending + 1
                if pending == chunk:
                    A = lam_ ** chunk * A + eta_ * (sum_k[..., :, None] * sum_v[..., None, :]) / chunk
                    sum_k, sum_v, pending = torch.zeros_like(sum_k), torch.zeros_like(sum_v), 0
        lo = max(0, i - window + 1)
        keys = k[:, :, lo:i + 1].repeat_interleave(group, 1)         # [B, Hq, n, D]
        vals = v[:, :, lo:i + 1].repeat_interleave(group, 1)
        p = torch.softmax((keys @ q[:, :, i, :, None]).squeeze(-1) * D ** -0.5, dim=-1)
        l1 = (p[..., None] * vals).sum(2)                               # [B, Hq, Dv]
        l2 = (fq[:, :, i, :, None] * A.repeat_interleave(group, 1)).sum(2)
        outs.append(mix * l1 + (1 - mix) * l2)
    return torch.stack(outs, dim=2)
