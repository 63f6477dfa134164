"""Full softmax attention: the exact baseline. Its decoding state is the KV cache, growing with context."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import attention
from .base import Mechanism, dtype_bytes, register


@dataclass
class KVCache:
    """Keys and values of every token so far: ``k, v [B, Hkv, T, D]``."""
    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


@register("full")
class FullAttention(Mechanism):
    """Causal softmax attention over the whole history (PyTorch's fused kernels)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check(q, k, v)
        return attention(q, k, v, causal=True)

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> KVCache:
        empty = torch.empty(batch, self.n_kv_head, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        self.check(q, k, v, context_len=state.length + q.shape[2])
        state = KVCache(torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2))
        return attention(q, state.k, state.v, causal=True), state

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        return 2 * batch * self.n_kv_head * context_len * self.head_dim * dtype_bytes(dtype)
