"""Full softmax attention: the exact baseline. Its decoding state is the KV cache, growing with context."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..attention import attention
from ..decode_attention import decode_attention
from .base import Mechanism, check_capacity, check_dtype, check_int, check_state_bytes_args, dtype_bytes, register


class KVBuffer:
    """Storage shared by the caches of one decoding run: ``k, v [B, Hkv, capacity, D]``, the first ``filled``
    positions written. Not a dataclass, so ``tensor_bytes`` counts the cache's views (its tokens), not the
    spare capacity; the spare shows in the measured peak."""

    def __init__(self, k: Tensor, v: Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled


@dataclass
class KVCache:
    """Keys and values of every token so far: ``k, v [B, Hkv, T, D]``, views of a ``KVBuffer``."""
    k: Tensor
    v: Tensor
    buffer: KVBuffer | None = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> KVCache:
        """This cache followed by ``k, v [B, Hkv, T_new, D]``.

        The new tokens are written in place into the buffer's spare capacity when this cache is the newest
        one of its buffer: a step then copies only the new tokens, not the whole cache (``torch.cat`` copies
        it every token and holds two caches at once). Otherwise (first step, buffer full, or a second
        continuation of one cache) the tokens go to a new buffer with 1/16 spare (at least 256 tokens).
        Earlier caches stay valid: each views only its own tokens. While gradients are recorded the cache
        is concatenated instead, so that no tensor autograd saved is overwritten.
        """
        n, t = self.length, k.shape[2]
        if torch.is_grad_enabled() and any(x.requires_grad for x in (self.k, self.v, k, v)):
            return KVCache(torch.cat([self.k, k], 2), torch.cat([self.v, v], 2))
        buf = self.buffer
        if buf is None or buf.filled != n or n + t > buf.k.shape[2]:
            shape = (*k.shape[:2], n + t + max(256, (n + t) // 16), k.shape[3])
            buf = KVBuffer(k.new_empty(shape), v.new_empty(shape[:3] + v.shape[3:]), n)
            buf.k[:, :, :n], buf.v[:, :, :n] = self.k, self.v
        buf.k[:, :, n:n + t], buf.v[:, :, n:n + t] = k, v
        buf.filled = n + t
        return KVCache(buf.k[:, :, :n + t], buf.v[:, :, :n + t], buf)


@dataclass
class StaticKVCache:
    """Preallocated KV cache ``k, v [B, Hkv, capacity, D]``: position ``t`` lives in slot ``t``; the slots past
    the decoder's position are unused."""
    k: Tensor
    v: Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def fill_random(self, start: int, stop: int, vocab_size: int) -> None:
        """Random keys and values in slots ``[start, stop)`` (benchmarks: decode cost depends on the length only)."""
        self.k[:, :, start:stop].normal_()
        self.v[:, :, start:stop].normal_()


@register("full")
class FullAttention(Mechanism):
    """Causal softmax attention over the whole history (PyTorch's fused kernels)."""

    static_state = StaticKVCache

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check(q, k, v)
        if q.numel() == 0:
            return self.empty_output(q, v)
        return attention(q, k, v, causal=True)

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> KVCache:
        empty = torch.empty(check_int("batch", batch), self.n_kv_head, 0, self.head_dim, device=device,
                            dtype=check_dtype(dtype))
        return KVCache(empty, empty.clone())

    def state_shapes(self, state, batch: int) -> dict:
        shape = (batch, self.n_kv_head, None, self.head_dim)
        return {"k": (state.k, shape), "v": (state.v, shape)}

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        self.expect_state(state, KVCache, q)
        self.check(q, k, v, context_len=state.length + q.shape[2])
        if q.shape[2] == 0:
            return self.empty_output(q, v), state
        state = state.append(k, v)
        return attention(q, state.k, state.v, causal=True), state

    def init_static_state(self, batch: int, capacity: int, device="cpu", dtype=torch.float32) -> StaticKVCache:
        shape = (check_int("batch", batch), self.n_kv_head, check_int("capacity", capacity), self.head_dim)
        check_dtype(dtype)
        return StaticKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def eager_state(self, state: StaticKVCache, seen: int) -> KVCache:
        return KVCache(state.k[:, :, :seen], state.v[:, :, :seen])

    def prefill_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticKVCache, start: int) -> Tensor:
        """The tokens go straight to their slots (no eager cache built)."""
        self.check_static(q, k, v, state, start)
        end = start + q.shape[2]
        check_capacity(start, q.shape[2], state.capacity)
        if q.shape[2] == 0:
            return self.empty_output(q, v)
        state.k[:, :, start:end], state.v[:, :, start:end] = k, v
        return attention(q, state.k[:, :, :end], state.v[:, :, :end], causal=True)

    def step_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticKVCache, pos: Tensor, variant=None) -> Tensor:
        self.check_static(q, k, v, state)
        state.k.index_copy_(2, pos, k)
        state.v.index_copy_(2, pos, v)
        return decode_attention(q, state.k, state.v, pos + 1)

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        check_state_bytes_args(context_len, batch)
        return 2 * batch * self.n_kv_head * context_len * self.head_dim * dtype_bytes(dtype)
