"""Power retention with the sequence split over the ranks of a process group (sequence parallelism).

Layout: contiguous. Rank ``r`` of ``N`` holds the ``r``-th stretch of the sequence, ``q [B, Hq, L_r, d]``,
``k [B, Hkv, L_r, d]``, ``v [B, Hkv, L_r, e]``, ``log_g [B, Hkv, L_r]``; ``layout.shard(x, N, r, "contiguous")``
cuts equal stretches, but the lengths may differ by rank (any ``L_r >= 1``: the chunked form pads a partial last
chunk). A rank needs no other rank's keys, only the state the tokens before its shard leave behind
(``power.chunk``: ``S = sum_j g_(end, j) phi(k_j) v_j^T [D, e]``, ``z = sum_j g_(end, j) phi(k_j) [D]``, kept
here as one tensor ``X = [S | z]`` of ``[B, Hkv, D, e + 1]``):

1. each rank computes its shard's own state ``X_r`` (from zero) and its decay across the shard,
   ``a_r = sum log_g`` over the shard (``[B, Hkv]``);
2. relay in rank order: rank ``r`` receives the state entering its shard, ``I_r`` (``I_0 = 0``), from
   ``r - 1`` and sends ``I_(r+1) = exp(a_r) I_r + X_r`` to ``r + 1``;
3. each rank runs the chunked form on its shard from ``I_r``.

Backward (``relay.relay_state``): autograd through 3 gives ``dI_r``, the gradient of this rank's own outputs with
respect to its incoming state; relayed the other way, rank ``r`` receives ``Λ_(r+1)`` (the whole gradient of the
state leaving its shard, ``Λ_N = 0``) from ``r + 1`` and sends ``Λ_r = dI_r + exp(a_r) Λ_(r+1)`` to ``r - 1``;
then ``dX_r = Λ_(r+1)``, ``da_r = exp(a_r) <I_r, Λ_(r+1)>``, and autograd through 1 finishes the q, k, v and gate
gradients. The result is the single-process chunked form's, up to the order of sums.

Bytes moved per call (``relay_bytes``: ``B x Hkv x D x (e + 1)`` numbers in the arithmetic dtype, float32 for
fp16/bf16/float32 inputs, ``D = C(d + deg - 1, deg)``), independent of the shard length: forward, every rank but
the last sends one state and every rank but the first receives one, plus one ``all_gather`` of ``1 +
len(AGREED)`` int64 per rank (the agreement check); backward, the same one state the other way, no collective.
Ring attention moves ``(N - 1) x 2 x B x Hkv x L x d`` elements per rank forward (input dtype), and backward
those again plus ``N x 2 x B x Hkv x L x d`` float32 gradients. With ``B = 1, Hkv = 8, d = e = 64``, bf16:

==========================  ===========================  ==========================================
per rank and layer          forward                      backward
==========================  ===========================  ==========================================
power (deg 2, D = 2080)     4.3 MB, any L, any N         4.3 MB
ring, L = 4096, N = 8       58.7 MB                      58.7 MB + 134 MB
power4 (deg 4, D = 766480)  1.6 GB                       1.6 GB
==========================  ===========================  ==========================================

Deg 2 sends less than the ring from ``(N - 1) L > D (e + 1) x 4 / (2 d x 2) ~ 2100`` tokens on; deg 4 at
``d = 64`` only beyond ~780K (its state is what makes it costly anywhere; at the bench's ``d = 16``, ``D = 3876``).

Scaling efficiency, a prediction (nothing measured: no GPU this session). The relay is sequential: its latency
is ``(N - 1)`` hops of one state, ``(N - 1) (t_lat + relay_bytes / BW)``, on the critical path, since a rank's
outputs wait for its incoming state. Per token and KV head, the chunked form costs about
``2 D (e + 1) (1 + R) + 2 c R (d + e)`` flops (``R = Hq / Hkv``, ``c`` the chunk), the shard state of step 1
another ``2 D (e + 1)`` (computed twice: once here, once inside the chunked form). So efficiency ``E(N) ~ 1 / (1
+ 1 / (1 + R + c R (d + e) / (D (e + 1))) + (N - 1) hop / t_chunk(L))``. ``d = e = 64, c = 64``: ``R = 1`` gives
about 0.67 before communication, ``R = 4`` about 0.84. One hop of 4.3 MB at ~100 GB/s is ~45 us, 7 hops at
``N = 8`` ~0.3 ms, against 1.5e11 flops of chunked form per layer for ``L = 32K`` at ``R = 1`` (1.5 ms at 100
TFLOP/s, several ms in the PyTorch chunked form this runs: the Triton kernel takes no initial state), so the relay
should cost 5-20% and the doubled state pass a third (R = 1) to a sixth (R = 4). Improvements left: the Triton
kernel with an initial state, step 1 folded into the chunked form's own chunk states (no second pass), and a
log-depth scan for large ``N``.

The ``power`` / ``power4`` mechanisms use this with ``sequence_parallel=True`` when ``torch.distributed`` is
initialised with more than one rank (an option, not a new name: a data-parallel job, whose ranks hold different
sequences, must not have them chained by default). A group of one runs the chunked form with no communication.
A rank that raises, dies or hangs makes the others raise ``RingCommError`` at their next transfer, within the
process group's timeout.
"""
from __future__ import annotations

import contextlib
import struct

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import check_qkv
from ..mechanisms.power.chunk import check_chunk_size, power_retention_chunk
from ..mechanisms.power.expand import check_deg, expanded_dim, sympow
from ..mechanisms.power.naive import check_gate, compute_dtype, default_scale
from .comm import RingComm, by_rank, check_agreement
from .relay import relay_state

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must share (the shard length need not), in the order of the agreement check's int64 row.
AGREED = ("dtype", "batch size", "query heads", "key/value heads", "head_dim", "value head_dim", "deg", "gated",
          "scale", "needs gradients")


def relay_bytes(batch: int, n_kv: int, d: int, e: int, deg: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the one state a rank sends per call (forward; the backward sends as many): ``B x Hkv x D x (e+1)``
    in the arithmetic dtype of ``dtype`` inputs."""
    return batch * n_kv * expanded_dim(d, check_deg(deg)) * (e + 1) * compute_dtype(dtype).itemsize


def shard_state(k: Tensor, v: Tensor, log_g: Tensor | None, deg: int) -> tuple[Tensor, Tensor]:
    """The state a shard leaves from zero, ``X [B, Hkv, D, e + 1]`` (``[S | z]``, on the gate level of its last
    token), and its log-decay ``a [B, Hkv]``, both in the arithmetic dtype."""
    ct = compute_dtype(k.dtype)
    phik = sympow(k.to(ct), deg)                                                   # [B, Hkv, L, D]
    if log_g is None:
        log_decay = k.new_zeros(k.shape[:2], dtype=ct)
    else:
        G = torch.cumsum(log_g.to(ct), -1)
        log_decay = G[..., -1]
        phik = phik * torch.exp(log_decay[..., None] - G)[..., None]
    v1 = torch.cat([v.to(ct), v.new_ones(*v.shape[:3], 1, dtype=ct)], -1)         # the ones column sums z
    return phik.transpose(-1, -2) @ v1, log_decay


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, deg: int, chunk_size: int,
                  scale: float | None) -> tuple[float, list[int]]:
    """This rank's own checks, no peer involved: ``(scale, facts)``, ``facts`` coding ``AGREED``."""
    check_qkv(q, k, v)
    check_gate(log_g, k)
    check_deg(deg)
    check_chunk_size(chunk_size)
    if q.dtype not in DTYPES:
        raise TypeError(f"sharded power retention takes float16, bfloat16, float32 or float64 inputs, got {q.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same tokens (one shard), got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("sharded power retention needs at least one token on every rank, got a shard of 0")
    scale = default_scale(q.shape[-1], scale)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (k, v, log_g))
    (B, hq, _, d), hkv, e = q.shape, k.shape[1], v.shape[3]
    facts = [DTYPES.index(q.dtype), B, hq, hkv, d, e, deg, int(log_g is not None),
             struct.unpack("<q", struct.pack("<d", scale))[0], int(grads)]
    return scale, facts


def _decode(name: str, code: int):
    if name == "dtype":
        return DTYPES[code]
    if name in ("gated", "needs gradients"):
        return bool(code)
    if name == "scale":
        return struct.unpack("<d", struct.pack("<q", code))[0]
    return code


def _explain(rows: list[dict]) -> str:
    shards = by_rank([f"q [{r['batch size']}, {r['query heads']}, L, {r['head_dim']}], k [{r['batch size']}, "
                      f"{r['key/value heads']}, L, {r['head_dim']}], v [.., {r['value head_dim']}] ({r['dtype']})"
                      for r in rows])
    return (f"Every rank must pass its shard of one sequence (q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, e] of "
            f"one dtype and the same sizes but L on every rank), log_g on all ranks or none, and the same deg and "
            f"scale, with gradients on all ranks or none; the shards are {shards}")


def sharded_power_retention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, deg: int = 2,
                            chunk_size: int = 64, scale: float | None = None,
                            group: dist.ProcessGroup | None = None) -> Tensor:
    """Power retention over a sequence split contiguously across the ranks of ``group``; this rank's outputs.

    Call it on every rank of ``group`` (default: the default process group; without ``torch.distributed``
    initialised it runs on this process alone) with this rank's stretch of the sequence, in rank order:
    ``q [B, Hq, L, d]``, ``k [B, Hkv, L, d]``, ``v [B, Hkv, L, e]``, ``log_g [B, Hkv, L]`` (optional gate,
    ``<= 0``), ``L >= 1`` (it may differ by rank). ``deg``, ``chunk_size``, ``scale`` as in
    ``power_retention_chunk``; q and k already rotated at their global positions if RoPE is wanted. Returns
    ``o [B, Hq, L, e]`` in q's dtype, equal to power retention over the whole sequence restricted to this rank's
    queries; differentiable in ``q, k, v, log_g``.

    The ranks first check that they agree (one ``all_gather`` of ``1 + len(AGREED)`` int64 per rank): where their
    dtype, ``B, Hq, Hkv, d, e``, ``deg``, gating, ``scale`` or need of gradients differ, or a rank refuses its own
    inputs, every rank raises the same ValueError. Then one state of ``relay_bytes`` moves between neighbours
    forward and one backward; a peer that raised, died or hangs makes the wait raise ``RingCommError``.
    """
    comm = RingComm(group, who="sharded power retention")
    try:
        scale, facts = _check_inputs(q, k, v, log_g, deg, chunk_size, scale)
    except (TypeError, ValueError):
        if comm.world_size > 1:   # tell the others, so that they raise now rather than wait for this rank
            dev = q.device if isinstance(q, Tensor) and q.device.type in ("cpu", "cuda") else torch.device("cpu")
            with contextlib.suppress(Exception):   # this rank's own error is the one to raise here
                check_agreement(comm, AGREED, None, dev, _decode, _explain)
        raise
    if comm.world_size == 1:
        return power_retention_chunk(q, k, v, log_g, deg, chunk_size, scale)
    check_agreement(comm, AGREED, facts, q.device, _decode, _explain)
    incoming = relay_state(*shard_state(k, v, log_g, deg), comm)
    e = v.shape[-1]
    return power_retention_chunk(q, k, v, log_g, deg, chunk_size, scale,
                                 initial_state=(incoming[..., :e], incoming[..., e]))


__all__ = ["sharded_power_retention", "shard_state", "relay_bytes", "AGREED"]
