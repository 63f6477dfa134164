"""The registered ``"tensor_cache"`` mechanism: sliding-window attention (L1) plus an associative memory (L2)
written by the tokens that leave the window, mixed by a learned per-head gate. Definition: ``naive``.

With ``sequence_parallel=True`` (``write="exact"``) and ``torch.distributed`` initialised with more than one rank,
``forward`` takes this rank's contiguous stretch of every sequence and runs ``distributed.tensor_cache``'s sharded
form over the default process group (a halo of ``window`` tokens and the memory come from the ranks before);
otherwise the option changes nothing. Off by default: data-parallel ranks hold different sequences."""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..base import Mechanism, check_dtype, check_int, check_state_bytes_args, dtype_bytes, register
from ..sliding_window import SlidingWindowAttention
from .naive import FEATURES, WRITES, feature_map
from .recurrent import (StaticTensorCacheState, TensorCacheState, init_state, init_static_state, leaving,
                        memory_dtype, read_chunk_mean, read_exact, window_attention_step)
from .scan import chunk_mean_scan, decayed_scan
from .window import blocked_window_attention


def _wide(x: Tensor) -> Tensor:
    return x.to(memory_dtype(x.dtype))


@register("tensor_cache", window=32)
class TensorCache(Mechanism):
    """Tensor Cache (arXiv 2605.22884): per KV head a learned decay ``lam = sigmoid(.)`` in (0, 1) and write rate
    ``eta = softplus(.)`` > 0; per query head a gate ``g`` (``out = sigmoid(g) L1 + (1 - sigmoid(g)) L2``).

    Options: ``window`` W; ``feature`` ``"identity"`` or ``"normalize"`` (phi); ``write`` ``"exact"`` (every
    evicted token written) or ``"chunk_mean"`` (the shortcut, see ``naive``); ``chunk`` the scan's block size
    (for ``chunk_mean`` also the write granularity); ``decay_init``, ``eta_init``, ``gate_init`` the initial
    ``lam``, ``eta`` and gate logit (defaults chosen on the recall task of the tests: with ``eta_init`` 0.1 or
    0.25 the memory learned recall beyond the window markedly slower than with 1). The three parameters are stored as offsets from these initial values, so
    weight decay pulls them towards the initialisation rather than towards ``lam = 0.5, eta = 0.69``.
    """

    static_state = StaticTensorCacheState

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, window: int = 32, feature: str = "identity",
                 write: str = "exact", chunk: int = 64, decay_init: float = 0.99, eta_init: float = 1.0,
                 gate_init: float = 0.0, sequence_parallel: bool = False):
        super().__init__(n_head, n_kv_head, head_dim)
        check_int("window", window)
        check_int("chunk", chunk)
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        if write not in WRITES:
            raise ValueError(f"write must be one of {WRITES}, got {write!r}")
        for name, value in (("decay_init", decay_init), ("eta_init", eta_init), ("gate_init", gate_init)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 < decay_init < 1:
            raise ValueError(f"decay_init must be in (0, 1), got {decay_init}")
        if not 0 < eta_init < math.inf:
            raise ValueError(f"eta_init must be a finite number > 0, got {eta_init}")
        if not math.isfinite(gate_init):
            raise ValueError(f"gate_init must be finite, got {gate_init}")
        if sequence_parallel and write != "exact":
            raise ValueError(f"sequence_parallel=True needs write='exact' (chunk-mean writes are grouped from the "
                             f"start of the sequence), got write={write!r}")
        self.window, self.feature, self.write, self.chunk = window, feature, write, chunk
        self.sequence_parallel = bool(sequence_parallel)
        self.decay_logit0 = math.log(decay_init / (1 - decay_init))
        self.eta_raw0 = math.log(math.expm1(eta_init))
        self.gate0 = float(gate_init)
        self.decay_offset = nn.Parameter(torch.zeros(n_kv_head))
        self.eta_offset = nn.Parameter(torch.zeros(n_kv_head))
        self.gate_offset = nn.Parameter(torch.zeros(n_head))
        self.window_attention = SlidingWindowAttention(n_head, n_kv_head, head_dim, window)

    # The three below are computed in at least float32 even in a 16-bit model: lam near 1 needs the bits.
    @property
    def decay(self) -> Tensor:
        """``lam [Hkv]`` in (0, 1)."""
        return torch.sigmoid(self.decay_logit0 + _wide(self.decay_offset))

    @property
    def eta(self) -> Tensor:
        """Write rate ``eta [Hkv]`` > 0."""
        return nn.functional.softplus(self.eta_raw0 + _wide(self.eta_offset))

    @property
    def gate(self) -> Tensor:
        """Gate logits ``g [Hq]``: the weight of L1 is ``sigmoid(g)``."""
        return self.gate0 + _wide(self.gate_offset)

    def _mix(self, l1: Tensor, r: Tensor) -> Tensor:
        """``l1 [B,Hq,n,Dv]``, memory read ``r [B,Hkv,G,n,Dv]`` -> gated output ``[B,Hq,n,Dv]`` in ``l1``'s dtype."""
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1)
        return (g * l1 + (1 - g) * r.flatten(1, 2)).to(l1.dtype)

    def _queries(self, q: Tensor, dtype: torch.dtype) -> Tensor:
        """``phi(q)`` grouped by KV head: ``[B,Hq,n,D]`` -> ``[B,Hkv,G,n,D]`` in ``dtype``."""
        B, _, n, D = q.shape
        return feature_map(q.to(dtype), self.feature).view(B, self.n_kv_head, -1, n, D)

    def _writes(self, k: Tensor, v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """What evicted tokens write: ``(phi(k), eta * v)`` in ``dtype``."""
        return feature_map(k.to(dtype), self.feature), v.to(dtype) * self.eta.view(1, -1, 1, 1).to(dtype)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Parallel form. ``q [B,Hq,T,D]``, ``k, v [B,Hkv,T,D]`` -> ``[B,Hq,T,D]``."""
        self.check(q, k, v)
        if q.numel() == 0:
            return self.empty_output(q, v)
        if self.sequence_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from ...distributed.tensor_cache import sharded_tensor_cache   # distributed imports the mechanisms
            return sharded_tensor_cache(self, q, k, v)
        T, W = q.shape[2], self.window
        l1 = blocked_window_attention(q, k, v, W)
        dt = memory_dtype(q.dtype)
        fq = self._queries(q, dt)
        r = fq.new_zeros(*fq.shape[:-1], v.shape[-1])                   # queries i < W read an empty memory
        if T > W:  # query i reads the writes of tokens j <= i - W: a decayed scan with queries W rows ahead
            fk, vs = self._writes(k[:, :, :T - W], v[:, :, :T - W], dt)
            lam = self.decay.to(dt)
            if self.write == "exact":
                late, _ = decayed_scan(fq[:, :, :, W:], fk, vs, lam, self.chunk)
            else:
                late = chunk_mean_scan(fq[:, :, :, W:], fk, vs, lam, self.chunk)
            r = torch.cat([r[:, :, :, :W], late], dim=3)
        return self._mix(l1, r)

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> TensorCacheState:
        return init_state(check_int("batch", batch), self.n_kv_head, self.head_dim, self.window, self.write, device,
                          check_dtype(dtype))

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: TensorCacheState) -> tuple[Tensor, TensorCacheState]:
        """Append ``T_new`` tokens ``q [B,Hq,T_new,D]``, ``k, v [B,Hkv,T_new,D]``; returns their outputs."""
        self.expect_state(state, TensorCacheState, q)
        self.check(q, k, v, context_len=1)
        if q.shape[2] == 0:
            return self.empty_output(q, v), state
        k_out, v_out, first = leaving(state.window, k, v)
        if q.shape[2] == 1:
            l1, window = self.window_attention.step(q, k, v, state.window)
        else:
            l1, window = window_attention_step(q, k, v, state.window)
        dt = state.memory.dtype
        fq, (fk_out, v_out), lam = self._queries(q, dt), self._writes(k_out, v_out, dt), self.decay.to(dt)
        if self.write == "exact":
            r, memory = read_exact(fq, fk_out, v_out, first, lam, state.memory, self.chunk)
            return self._mix(l1, r), TensorCacheState(window, memory)
        r, memory, pk, pv = read_chunk_mean(fq, fk_out, v_out, first, lam, state, self.window, self.chunk)
        return self._mix(l1, r), TensorCacheState(window, memory, pk, pv)

    def state_shapes(self, state, batch: int) -> dict:
        H, D = self.n_kv_head, self.head_dim
        window = (batch, H, self.window, D)
        pending = (batch, H, D) if self.write == "chunk_mean" else None
        return {"k": (state.window.k, window), "v": (state.window.v, window), "memory": (state.memory, (batch, H, D, D)),
                "pending_k": (state.pending_k, pending), "pending_v": (state.pending_v, pending)}

    def init_static_state(self, batch: int, capacity: int, device="cpu", dtype=torch.float32) -> StaticTensorCacheState:
        check_int("capacity", capacity)
        return init_static_state(check_int("batch", batch), self.n_kv_head, self.head_dim, self.window, self.write,
                                 device, check_dtype(dtype))

    def static_variant(self, pos: int) -> tuple[bool, bool]:
        """``(evicts, flushes)``: whether the token at ``pos`` pushes one out of the window into the memory, and
        (``chunk_mean``) whether that write completes a chunk."""
        evicts = pos >= self.window
        return evicts, evicts and self.write == "chunk_mean" and (pos - self.window + 1) % self.chunk == 0

    def eager_state(self, state: StaticTensorCacheState, seen: int) -> TensorCacheState:
        return TensorCacheState(self.window_attention.eager_state(state.window, seen), state.memory, state.pending_k,
                                state.pending_v)

    def step_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticTensorCacheState, pos: Tensor,
                    variant: tuple[bool, bool]) -> Tensor:
        """One token at ``pos [1]``: the token leaving the window (read from its slot before the new one takes
        it) is written into the memory, then the window attends and the memory is read."""
        self.check_static(q, k, v, state)
        evicts, flushes = variant
        dt, lam = state.memory.dtype, self.decay.to(state.memory.dtype)
        if evicts:
            slot = pos % self.window
            fk, ve = self._writes(state.window.k.index_select(2, slot), state.window.v.index_select(2, slot), dt)
            if self.write == "exact":
                state.memory.mul_(lam.view(1, -1, 1, 1)).add_(fk[:, :, 0, :, None] * ve[:, :, 0, None, :])
            else:
                state.pending_k.add_(fk[:, :, 0])
                state.pending_v.add_(ve[:, :, 0])
                if flushes:
                    outer = state.pending_k.unsqueeze(-1) * state.pending_v.unsqueeze(-2) / self.chunk
                    state.memory.mul_(lam.view(1, -1, 1, 1) ** self.chunk).add_(outer)
                    state.pending_k.zero_()
                    state.pending_v.zero_()
        l1 = self.window_attention.step_static(q, k, v, state.window, pos)
        return self._mix(l1, self._queries(q, dt) @ state.memory.unsqueeze(2))

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        check_state_bytes_args(context_len, batch)
        # Ring buffer of W raw keys and values, the D x D memory (+ the open chunk's two sums) in at least
        # float32, all allocated from token one on.
        d = self.head_dim
        mem = d * d + (2 * d if self.write == "chunk_mean" else 0)
        return batch * self.n_kv_head * (2 * self.window * d * dtype_bytes(dtype)
                                         + mem * dtype_bytes(memory_dtype(dtype)))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, feature={self.feature!r}, write={self.write!r}, "
                f"chunk={self.chunk}" + (", sequence_parallel=True" if self.sequence_parallel else ""))
