"""The registered mechanisms ``"power"`` (deg 2) and ``"power4"`` (deg 4).

Gate. The mechanism interface passes only ``q, k, v``, so there is no per-token gate projection here;
``gate="decay"`` (the default) learns one constant log-decay per KV head, ``log_g_h = -softplus(theta_h)``,
initialised to half-lives spread geometrically from 32 to 512 tokens; ``gate="none"`` is ungated. The
standalone functions (``power_retention``, ``power_retention_step``) take any per-token ``log_g``.

Rotary. The GPT applies RoPE before calling the mechanism, so ``rotary`` is off by default; ``rotary=True``
rotates ``q, k`` here (positions ``0..T-1`` in ``forward``, ``seen..`` in ``step``) for standalone use.

Parallel form. The Triton kernel wherever it applies (CUDA, deg 2, fp16/bf16) for sequences longer than
``switch_over``; otherwise the quadratic form (the same function) while it costs fewer flops than the chunked one
(``T (d + e) <= 4 D e + c (d + e)`` a query, ``D`` the expanded dim) and at most ``QUADRATIC_MAX_TOKENS`` (its
``T x T`` weights), and the chunked form beyond (``prefers_quadratic``). Decoding one token at a time: the
Triton decode kernel wherever it applies (CUDA, deg 2), the PyTorch recurrent form otherwise.
Defaults suit the CPU bench's tiny GPT (head_dim 16, block 128): ``power`` folds after 64 tokens in chunks
of 32 (its state, 136 x 17 floats per KV head, equals about 72 tokens of K/V at head_dim 16); ``power4``'s
state is 3876 x 17 floats per KV head (about 2000 tokens of K/V), so it stays on plain K/V up to 1024 tokens
and folds in chunks of 64.

Sequence parallel. With ``sequence_parallel=True`` and ``torch.distributed`` initialised with more than one rank,
``forward`` takes this rank's contiguous stretch of every sequence and runs ``distributed.power``'s sharded form
over the default process group (each rank passes its shard's global ``positions`` to ``GPT.forward`` for RoPE);
otherwise the option changes nothing. It is off by default: in data-parallel training the ranks hold different
sequences, which must not be chained. Decoding (``step``) stays single-process.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...rope import apply_rope
from ...attention import check_scale
from ..base import Mechanism, check_dtype, check_int, check_state_bytes_args, register
from .chunk import check_rope_base, power_retention, takes_kernel
from .expand import check_deg, expanded_dim
from .naive import power_retention_naive
from .recurrent import (PowerState, StaticPowerState, check_schedule, init_power_state, init_static_power_state,
                        power_retention_step, power_state_bytes, power_step_static, recent_count, static_variant)

GATES = ("decay", "none")
QUADRATIC_MAX_TOKENS = 4096  # the quadratic form's [B, H, T, T] weights stay small below this


def prefers_quadratic(T: int, d: int, e: int, deg: int, chunk_size: int) -> bool:
    """Whether the quadratic form costs fewer flops a query than the chunked one (``T (d + e)`` against
    ``4 D e + c (d + e)``), within ``QUADRATIC_MAX_TOKENS``."""
    return T <= QUADRATIC_MAX_TOKENS and T * (d + e) <= 4 * expanded_dim(d, deg) * e + chunk_size * (d + e)



@register("power4", deg=4, chunk_size=64, switch_over=1024)
@register("power", deg=2, chunk_size=32, switch_over=64)
class PowerRetention(Mechanism):
    """Power retention: weights ``g_ij (scale q_i . k_j)^deg`` normalised by their sum; state flat in context."""

    static_state = StaticPowerState

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, deg: int = 2, chunk_size: int = 32,
                 switch_over: int = 64, gate: str = "decay", scale: float | None = None, rotary: bool = False,
                 rope_base: float = 10000.0, use_kernel: bool | None = None, sequence_parallel: bool = False):
        super().__init__(n_head, n_kv_head, head_dim)
        check_deg(deg)
        check_schedule(chunk_size, switch_over)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        check_scale(scale, head_dim)
        check_rope_base(rope_base)
        if use_kernel not in (None, True, False):
            raise ValueError(f"use_kernel must be None, True or False, got {use_kernel!r}")
        if sequence_parallel and rotary:
            raise ValueError("rotary=True rotates at positions 0..T-1 of the shard; with sequence_parallel=True apply "
                             "RoPE at the global positions before the mechanism (the GPT does, with positions=...)")
        self.deg, self.chunk_size, self.switch_over, self.gate = deg, chunk_size, switch_over, gate
        self.sequence_parallel = bool(sequence_parallel)
        self.scale, self.rotary, self.rope_base, self.use_kernel = scale, rotary, rope_base, use_kernel
        if gate == "decay":
            spread = torch.linspace(0, 1, n_kv_head) if n_kv_head > 1 else torch.zeros(1)
            half_life = 32.0 * 16.0 ** spread
            rate = math.log(2) / half_life                                         # -log_g
            self.decay_logit = nn.Parameter(torch.log(torch.expm1(rate)))

    def _log_g(self, q: Tensor, T: int) -> Tensor | None:
        if self.gate == "none":
            return None
        log_g = -F.softplus(self.decay_logit)                                      # [Hkv]
        return log_g.to(q.dtype if q.dtype == torch.float64 else torch.float32)[None, :, None].expand(
            q.shape[0], -1, T)

    def _rotate(self, q: Tensor, k: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """RoPE at positions ``start, start + 1, ..`` (``start`` a host int, or ``[1]`` on the device)."""
        if not self.rotary:
            return q, k
        pos = start + torch.arange(q.shape[2], device=q.device)
        return apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check(q, k, v)
        if q.numel() == 0:
            return self.empty_output(q, v)
        T = q.shape[2]
        q, k = self._rotate(q, k, 0)
        log_g = self._log_g(q, T)
        if self.sequence_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from ...distributed.power import sharded_power_retention   # distributed imports the mechanisms
            return sharded_power_retention(q, k, v, log_g, self.deg, self.chunk_size, self.scale)
        if T <= self.switch_over or (not takes_kernel(q, k, v, self.deg, self.chunk_size, self.use_kernel)
                                     and prefers_quadratic(T, q.shape[-1], v.shape[-1], self.deg, self.chunk_size)):
            return power_retention_naive(q, k, v, log_g, self.deg, self.scale)
        return power_retention(q, k, v, log_g, self.deg, self.chunk_size, self.scale, use_kernel=self.use_kernel)

    def init_state(self, batch: int, device="cpu", dtype=torch.float32) -> PowerState:
        return init_power_state(check_int("batch", batch), self.n_kv_head, self.head_dim, self.head_dim, self.gate != "none",
                                device, check_dtype(dtype))

    def state_shapes(self, state, batch: int) -> dict:
        H, d, D = self.n_kv_head, self.head_dim, expanded_dim(self.head_dim, self.deg)
        static = isinstance(state, StaticPowerState)
        r = self.switch_over if static else None
        gated = self.gate != "none"
        folded = static or state.S is not None
        return {"k": (state.k, (batch, H, r, d)), "v": (state.v, (batch, H, r, d)),
                "g": (state.g, (batch, H, r) if gated else None),
                "S": (state.S, (batch, H, D, d) if folded else None), "z": (state.z, (batch, H, D) if folded else None)}

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: PowerState) -> tuple[Tensor, PowerState]:
        self.expect_state(state, PowerState, q)
        if state.k.shape[2] != recent_count(state.seen, self.chunk_size, self.switch_over):
            raise ValueError(f"PowerRetention ({self.extra_repr()}): the state holds {state.k.shape[2]} unfolded tokens "
                             f"after {state.seen}, where this schedule keeps "
                             f"{recent_count(state.seen, self.chunk_size, self.switch_over)}: a state made with another "
                             "chunk_size / switch_over")
        self.check(q, k, v, context_len=state.seen + q.shape[2])
        if q.shape[2] == 0:
            return self.empty_output(q, v), state
        q, k = self._rotate(q, k, state.seen)
        return power_retention_step(q, k, v, state, self._log_g(q, q.shape[2]), self.deg, self.scale,
                                    self.chunk_size, self.switch_over, use_kernel=self.use_kernel)

    def init_static_state(self, batch: int, capacity: int, device="cpu", dtype=torch.float32) -> StaticPowerState:
        check_int("capacity", capacity)
        return init_static_power_state(check_int("batch", batch), self.n_kv_head, self.head_dim, self.head_dim, self.deg,
                                       self.gate != "none", self.switch_over, device, check_dtype(dtype))

    def static_variant(self, pos: int) -> tuple[bool, bool]:
        return static_variant(pos, self.chunk_size, self.switch_over)

    def eager_state(self, state: StaticPowerState, seen: int) -> PowerState:
        return state.as_state(seen, self.chunk_size)

    def prefill_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticPowerState, start: int) -> Tensor:
        """Fewer than ``chunk_size`` tokens go one at a time through ``step_static``, in place (the eager form would
        copy ``S`` for every fold: more than a batch filling the GPU can afford); longer inputs through the eager
        form (the chunked form for a long prefill)."""
        check_int("start", start, 0)
        if q.shape[2] == 0:
            self.check_static(q, k, v, state)
            return self.empty_output(q, v)
        if q.shape[2] >= self.chunk_size:
            return super().prefill_static(q, k, v, state, start)
        outs = []
        for i in range(q.shape[2]):
            pos = torch.full((1,), start + i, dtype=torch.long, device=q.device)
            one = slice(i, i + 1)
            outs.append(self.step_static(q[:, :, one], k[:, :, one], v[:, :, one], state, pos,
                                         self.static_variant(start + i)))
        return torch.cat(outs, 2)

    def step_static(self, q: Tensor, k: Tensor, v: Tensor, state: StaticPowerState, pos: Tensor,
                    variant: tuple[bool, bool]) -> Tensor:
        self.check_static(q, k, v, state)
        q, k = self._rotate(q, k, pos)
        return power_step_static(q, k, v, state, pos, variant, self._log_g(q, 1), self.deg, self.scale,
                                 self.chunk_size, self.use_kernel)

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        check_state_bytes_args(context_len, batch)
        return power_state_bytes(context_len, batch, self.n_kv_head, self.head_dim, self.head_dim, self.deg,
                                 self.gate != "none", self.chunk_size, self.switch_over, dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", deg={self.deg}, chunk_size={self.chunk_size}, "
                f"switch_over={self.switch_over}, gate={self.gate!r}, rotary={self.rotary}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))
