"""Sliding-window attention: each token sees itself and the ``window - 1`` tokens before it.

Decoding keeps a ring buffer of the last ``window`` keys and values, so its state is flat in context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import check_qkv, sdpa
from ..decode_attention import decode_attention
from .base import Mechanism, check_dtype, check_int, check_state_bytes_args, dtype_bytes, register


def window_mask(tq: int, tk: int, window: int, device=None) -> Tensor:
    """Boolean ``[tq, tk]``: query ``i`` (at position ``tk - tq + i``) sees keys ``j`` with ``i - window < j <= i``."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None) -> Tensor:
    """Causal attention restricted to a window. ``q [B,Hq,Tq,D]``, ``k, v [B,Hkv,Tk,D]``, bottom-right aligned.

    Uses SDPA with a banded mask (fused on GPU; the mask is ``Tq x Tk`` booleans, not a float score matrix).
    """
    check_qkv(q, k, v)
    mask = window_mask(q.shape[2], k.shape[2], window, q.device)
    return sdpa(q, k, v, attn_mask=mask, scale=scale)


@dataclass
class WindowCache:
    """Ring buffer ``k, v [B, Hkv, window, D]``; token ``t`` lives in slot ``t % window``; ``seen`` tokens so far."""
    k: Tensor
    v: Tensor
    seen: int = 0

    def ordered(self) -> tuple[Tensor, Tensor]:
        """The buffered tokens oldest first: ``[B, Hkv, min(seen, window), D]``."""
        w = self.k.shape[2]
        if self.seen <= w:
            return self.k[:, :, : self.seen], self.v[:, :, : self.seen]
        idx = (torch.arange(w, device=self.k.device) + self.seen) % w
        return self.k[:, :, idx], self.v[:, :, idx]


@dataclass
class StaticWindowCache:
    """Ring buffer ``k, v [B, Hkv, window, D]`` updated in place: token ``t`` lives in slot ``t % window``; how
    many slots are filled follows from the decoder's position."""
    k: Tensor
    v: Tensor

    def load(self, cache: WindowCache) -> None:
        """Copy an eager cache's buffers in."""
        self.k.copy_(cache.k)
        self.v.copy_(cache.v)

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        """Write one token ``k, v [B, Hkv, 1, D]`` at position ``pos [1]``; returns the filled length ``[1]``."""
        w = self.k.shape[2]
        slot = pos % w
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        return torch.clamp(pos + 1, max=w)


@register("sliding_window", window=64)
class SlidingWindowAttention(Mechanism):
    """Softmax attention over the last ``window`` tokens (the token itself included)."""

    static_state = StaticWindowCache

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, window: int = 64):
        super().__init__(n_head, n_kv_head, head_dim)
        self.window = check_int("window", window)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check(q, k, v)
        if q.numel() == 0:
            return self.empty_output(q, v)
        return sliding_window_attention(q, k, v, self.window)

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> WindowCache:
        shape = (check_int("batch", batch), self.n_kv_head, self.window, self.head_dim)
        check_dtype(dtype)
        return WindowCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def state_shapes(self, state, batch: int) -> dict:
        shape = (batch, self.n_kv_head, self.window, self.head_dim)
        return {"k": (state.k, shape), "v": (state.v, shape)}

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: WindowCache) -> tuple[Tensor, WindowCache]:
        self.expect_state(state, WindowCache, q)
        self.check(q, k, v, context_len=1)
        if q.shape[2] == 0:
            return self.empty_output(q, v), state
        n, w = q.shape[2], self.window
        if n == 1:
            # Write first, then attend over every filled slot: order does not matter to softmax.
            kb, vb = state.k.clone(), state.v.clone()
            kb[:, :, state.seen % w], vb[:, :, state.seen % w] = k[:, :, 0], v[:, :, 0]
            filled = min(state.seen + 1, w)
            out = sdpa(q, kb[:, :, :filled], vb[:, :, :filled])
            return out, WindowCache(kb, vb, state.seen + 1)
        old_k, old_v = state.ordered()
        keys, vals = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        out = sliding_window_attention(q, keys, vals, w)
        kb, vb = state.k.clone(), state.v.clone()
        keep = min(n, w)
        slots = (torch.arange(state.seen + n - keep, state.seen + n, device=k.device)) % w
        kb[:, :, slots], vb[:, :, slots] = k[:, :, n - keep:], v[:, :, n - keep:]
        return out, WindowCache(kb, vb, state.seen + n)

    def init_static_state(self, batch: int, capacity: int, device="cpu", dtype=torch.float32) -> StaticWindowCache:
        check_int("capacity", capacity)   # the ring buffer holds the window whatever the capacity
        cache = self.init_state(batch, device, dtype)
        return StaticWindowCache(cache.k, cache.v)

    def eager_state(self, state: StaticWindowCache, seen: int) -> WindowCache:
        return WindowCache(state.k, state.v, seen)

    def step_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticWindowCache, pos: Tensor,
                    variant=None) -> Tensor:
        """Write the token into its slot, then attend over the filled slots (order does not matter to softmax)."""
        self.check_static(q, k, v, state)
        return decode_attention(q, state.k, state.v, state.append(k, v, pos))

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        check_state_bytes_args(context_len, batch)
        # The buffer is allocated at full size from the first token on.
        return 2 * batch * self.n_kv_head * self.window * self.head_dim * dtype_bytes(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"
