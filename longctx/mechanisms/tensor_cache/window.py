"""Sliding-window attention in blocks, so long sequences never build a ``T x T`` mask or score matrix.

Queries are cut into blocks of ``W`` (the window); block ``b`` attends to key blocks ``b - 1`` and ``b`` with
one shared banded ``W x 2W`` boolean mask, through ``sliding_window_attention`` (SDPA: fused on GPU). Work and
memory are ``O(T * W)``. Short inputs go straight to ``sliding_window_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention import check_qkv
from ..sliding_window import sliding_window_attention


def _with_previous_block(x: Tensor, n: int, w: int) -> Tensor:
    """``x [B,H,n*w,D]`` -> ``[B,(n-1)*H,2w,D]``: for blocks ``b = 1..n-1``, block ``b-1`` then block ``b``,
    block-major (entry ``(b-1)*H + h``) so that GQA's grouping of query heads onto KV heads is kept."""
    blocks = x.unflatten(2, (n, w))
    pairs = torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], dim=3)     # [B, H, n-1, 2w, D]
    return pairs.transpose(1, 2).flatten(1, 2)


def blocked_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Query ``i`` (at position ``Tk - Tq + i``) attends to keys ``(pos - window, pos]``, scale ``1/sqrt(D)``.

    ``q [B,Hq,Tq,D]``, ``k [B,Hkv,Tk,D]``, ``v [B,Hkv,Tk,Dv]`` with ``Tq <= Tk`` -> ``[B,Hq,Tq,Dv]``: the result
    of ``sliding_window_attention`` (bottom-right aligned) in ``O(Tk * window)`` work and memory.
    """
    check_qkv(q, k, v)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tq, tk = q.shape[2], k.shape[2]
    if tq > tk:
        raise ValueError(f"need at least as many keys as queries, got Tq={tq} > Tk={tk}")
    if tk <= 2 * window:
        return sliding_window_attention(q, k, v, window)
    hq, w = q.shape[1], window
    pad_end = -tk % w
    # Queries aligned with their keys (leading rows are padding), everything padded at the end to whole blocks.
    q = F.pad(q, (0, 0, tk - tq, pad_end))
    k, v = F.pad(k, (0, 0, 0, pad_end)), F.pad(v, (0, 0, 0, pad_end))
    n = q.shape[2] // w
    first = sliding_window_attention(q[:, :, :w], k[:, :, :w], v[:, :, :w], w)    # block 0 has no block before
    rest = sliding_window_attention(q[:, :, w:].unflatten(2, (n - 1, w)).transpose(1, 2).flatten(1, 2),
                                    _with_previous_block(k, n, w), _with_previous_block(v, n, w), w)
    rest = rest.unflatten(1, (n - 1, hq)).transpose(1, 2).flatten(2, 3)          # [B, Hq, (n-1)*w, Dv]
    return torch.cat([first, rest], dim=2)[:, :, tk - tq: tk]
