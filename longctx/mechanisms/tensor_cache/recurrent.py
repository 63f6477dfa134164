"""Tensor Cache decoding form: a ring buffer of the last ``W`` keys/values (L1) plus the memory ``A`` (L2).

The state is flat in context: ``WindowCache`` (``2 * W * D`` numbers per KV head, raw keys and values),
``A [B,Hkv,D,Dv]`` and, for ``write="chunk_mean"``, the running sums of the evicted (feature-mapped) keys and
(eta-scaled) values of the chunk not yet complete. ``A`` and the sums are kept in float32 when the model runs
in 16-bit (``memory_dtype``): they accumulate over the whole context. The counters are plain integers:
``window.seen`` tokens so far, ``max(0, seen - W)`` of them evicted, ``evicted % chunk`` pending in the open
chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sliding_window import StaticWindowCache, WindowCache
from .scan import decayed_scan
from .window import blocked_window_attention


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``A`` is held and computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class TensorCacheState:
    """``window``: ring buffer ``k, v [B,Hkv,W,D]`` and the token count; ``memory``: ``A [B,Hkv,D,Dv]`` (writes
    already scaled by eta); ``pending_k [B,Hkv,D]``, ``pending_v [B,Hkv,Dv]``: sums over the open chunk
    (``write="chunk_mean"`` only, else None)."""
    window: WindowCache
    memory: Tensor
    pending_k: Tensor | None = None
    pending_v: Tensor | None = None

    @property
    def seen(self) -> int:
        return self.window.seen


def init_state(batch: int, n_kv_head: int, head_dim: int, window: int, write: str, device,
               dtype) -> TensorCacheState:
    """An empty state (no token seen)."""
    buf = torch.zeros(batch, n_kv_head, window, head_dim, device=device, dtype=dtype)
    mem = dict(device=device, dtype=memory_dtype(dtype))
    pending = ((torch.zeros(batch, n_kv_head, head_dim, **mem), torch.zeros(batch, n_kv_head, head_dim, **mem))
               if write == "chunk_mean" else (None, None))
    return TensorCacheState(WindowCache(buf, buf.clone()), torch.zeros(batch, n_kv_head, head_dim, head_dim, **mem),
                            *pending)


def leaving(buffer: WindowCache, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
    """Tokens that leave a window of ``W`` while ``n`` new tokens ``k, v [B,Hkv,n,D]`` arrive after ``buffer``.

    Returns ``(k_out, v_out [B,Hkv,e,D], first)``: the ``e`` leaving tokens oldest first, and the index of the
    first new token whose arrival evicts one (``first = n - e``); new token ``first + t`` evicts ``k_out[t]``.
    """
    w, seen, n = buffer.k.shape[2], buffer.seen, k.shape[2]
    lo, hi = max(0, seen - w), max(0, seen + n - w)                  # global indices of leaving tokens
    old = torch.arange(lo, min(hi, seen), device=k.device) % w       # those still in the ring buffer
    k_out = torch.cat([buffer.k[:, :, old], k[:, :, max(0, lo - seen):max(0, hi - seen)]], dim=2)
    v_out = torch.cat([buffer.v[:, :, old], v[:, :, max(0, lo - seen):max(0, hi - seen)]], dim=2)
    return k_out, v_out, n - (hi - lo)


def window_attention_step(q: Tensor, k: Tensor, v: Tensor, buffer: WindowCache) -> tuple[Tensor, WindowCache]:
    """L1 of ``n > 1`` new tokens (``q [B,Hq,n,D]``, ``k, v [B,Hkv,n,D]``) after ``buffer``, in ``O(n * W)``
    (blocked), and the buffer with the last ``W`` tokens written to their slots (``t % W``)."""
    w, n = buffer.k.shape[2], q.shape[2]
    old_k, old_v = buffer.ordered()
    out = blocked_window_attention(q, torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2), w)
    keep = min(n, w)
    slots = torch.arange(buffer.seen + n - keep, buffer.seen + n, device=k.device) % w
    kb, vb = buffer.k.clone(), buffer.v.clone()
    kb[:, :, slots], vb[:, :, slots] = k[:, :, n - keep:], v[:, :, n - keep:]
    return out, WindowCache(kb, vb, buffer.seen + n)


def read_exact(fq: Tensor, fk_out: Tensor, v_out: Tensor, first: int, lam: Tensor, memory: Tensor,
               chunk: int) -> tuple[Tensor, Tensor]:
    """Memory reads of ``n`` new queries ``fq [B,Hkv,G,n,D]`` with exact writes of the leaving tokens
    ``fk_out [B,Hkv,e,D]``, ``v_out [B,Hkv,e,Dv]`` (scaled by eta); new query ``first + t`` reads ``A`` after
    the write of leaving token ``t``. Returns ``(r [B,Hkv,G,n,Dv], memory after all writes)``."""
    if fq.shape[3] == 1 and first == 0:                                  # decoding: one write, one read
        memory = lam.view(1, -1, 1, 1) * memory + fk_out[:, :, 0, :, None] * v_out[:, :, 0, None, :]
        return fq @ memory.unsqueeze(2), memory
    before = fq[:, :, :, :first] @ memory.unsqueeze(2)                 # queries that evict nothing
    after, memory = decayed_scan(fq[:, :, :, first:], fk_out, v_out, lam, chunk, memory)
    return torch.cat([before, after], dim=3), memory


def read_chunk_mean(fq: Tensor, fk_out: Tensor, v_out: Tensor, first: int, lam: Tensor, state: TensorCacheState,
                    window: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As ``read_exact`` for ``write="chunk_mean"`` (see ``naive``), one leaving token at a time.
    Returns ``(r, memory, pending_k, pending_v)``."""
    memory, sum_k, sum_v = state.memory, state.pending_k, state.pending_v
    pending = max(0, state.seen - window) % chunk
    decay = lam.view(1, -1, 1, 1) ** chunk
    reads = [fq[:, :, :, :first] @ memory.unsqueeze(2)]
    for t in range(fk_out.shape[2]):
        sum_k, sum_v, pending = sum_k + fk_out[:, :, t], sum_v + v_out[:, :, t], pending + 1
        if pending == chunk:
            memory = decay * memory + sum_k.unsqueeze(-1) * sum_v.unsqueeze(-2) / chunk
            sum_k, sum_v, pending = torch.zeros_like(sum_k), torch.zeros_like(sum_v), 0
        reads.append(fq[:, :, :, first + t:first + t + 1] @ memory.unsqueeze(2))
    return torch.cat(reads, dim=3), memory, sum_k, sum_v


@dataclass
class StaticTensorCacheState:
    """``TensorCacheState`` in buffers updated in place: the ring buffer ``window`` (``StaticWindowCache``),
    ``memory [B,Hkv,D,Dv]`` and, for ``write="chunk_mean"``, the open chunk's sums (else None)."""
    window: StaticWindowCache
    memory: Tensor
    pending_k: Tensor | None = None
    pending_v: Tensor | None = None

    def load(self, state: TensorCacheState) -> None:
        """Copy an eager state's tensors in."""
        self.window.load(state.window)
        self.memory.copy_(state.memory)
        if self.pending_k is not None:
            self.pending_k.copy_(state.pending_k)
            self.pending_v.copy_(state.pending_v)


def init_static_state(batch: int, n_kv_head: int, head_dim: int, window: int, write: str, device,
                      dtype) -> StaticTensorCacheState:
    state = init_state(batch, n_kv_head, head_dim, window, write, device, dtype)
    return StaticTensorCacheState(StaticWindowCache(state.window.k, state.window.v), state.memory,
                                  state.pending_k, state.pending_v)
