"""Power retention with the sequence split over the ranks of a process group (sequence parallelism).

Layout: contiguous. Rank ``r`` of ``N`` holds the ``r``-th stretch of the sequence, ``q [B, Hq, L_r, d]``,
``k [B, Hkv, L_r, d]``, ``v [B, Hkv, L_r, e]``, ``log_g [B, Hkv, L_r]``; ``layout.shard(x, N, r, "contiguous")``
cuts equal stretches, but the lengths may differ by rank (any ``L_r >= 1``). A rank needs no other rank's keys,
only the state the tokens before its shard leave behind (``S = sum_j g_(end, j) phi(k_j) v_j^T [D, e]``, ``z =
sum_j g_(end, j) phi(k_j) [D]``, kept as one tensor ``X = [S | z]`` of ``[B, Hkv, D, e + 1]``;
``power.continued``):

1. each rank forms its shard's own state from zero, ``X_r`` (``stretch_state``), and its decay across the shard,
   ``a_r = sum log_g`` (``[B, Hkv]``);
2. relay in rank order: rank ``r`` receives the state entering its shard, ``I_r`` (``I_0 = 0``), from
   ``r - 1`` and sends ``I_(r+1) = exp(a_r) I_r + X_r`` to ``r + 1``;
3. each rank's outputs (``continue_from``): its shard from zero through the Triton kernel where it applies (the
   chunked form elsewhere), numerators and normalisers, plus what ``I_r`` adds to each (``read_state``).

Backward (``relay.relay_state``): autograd through 3 gives ``dI_r``, the gradient of this rank's own outputs with
respect to its incoming state; relayed the other way, rank ``r`` receives ``Λ_(r+1)`` (the whole gradient of the
state leaving its shard, ``Λ_N = 0``) from ``r + 1`` and sends ``Λ_r = dI_r + exp(a_r) Λ_(r+1)`` to ``r - 1``;
then ``dX_r = Λ_(r+1)``, ``da_r = exp(a_r) <I_r, Λ_(r+1)>``, and autograd through 1 and 3 finishes the q, k, v
and gate gradients. The result is the single-process form's, up to the order of sums.

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

Scaling efficiency, a prediction (nothing measured: multi-GPU machines were not lent). Each rank does the
single-process work of its shard (the kernel's, where it applies) plus two passes over its tokens' features:
forming ``X_r`` (``2 D (e + 1)`` flops a key) and reading ``I_r`` (``2 D (e + 1) R`` a query, ``R = Hq / Hkv``),
in float32 matrix products. What is added is the relay, sequential and on the critical path (a rank's outputs
wait for its incoming state): ``(N - 1)`` hops of one state forward and again backward, ``(N - 1) (t_lat +
relay_bytes / BW)`` each way. So ``E(N) ~ 1 / (1 + (N - 1) hop / t_rank(L))``. With ``B = 1, Hkv = 8, d = e =
64, R = 1``: one hop of 4.3 MB at ~100 GB/s is ~45 us, 7 hops at ``N = 8`` ~0.3 ms each way.

The ``power`` / ``power4`` mechanisms use this with ``sequence_parallel=True`` when ``torch.distributed`` is
initialised with more than one rank (an option, not a new name: a data-parallel job, whose ranks hold different
sequences, must not have them chained by default). A group of one runs ``power_retention`` with no communication.
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
from ..mechanisms.power.chunk import check_chunk_size, power_retention
from ..mechanisms.power.continued import continue_from, stretch_state
from ..mechanisms.power.expand import check_deg, expanded_dim
from ..mechanisms.power.naive import check_gate, compute_dtype, default_scale
from .comm import RingComm, check_agreement, shard_shapes
from .relay import relay_state

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must share (the shard length need not), in the order of the agreement check's int64 row.
AGREED = ("dtype", "batch size", "query heads", "key/value heads", "head_dim", "value head_dim", "deg", "gated",
          "scale", "needs gradients")


def relay_bytes(batch: int, n_kv: int, d: int, e: int, deg: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the one state a rank sends per call (forward; the backward sends as many): ``B x Hkv x D x (e+1)``
    in the arithmetic dtype of ``dtype`` inputs."""
    return batch * n_kv * expanded_dim(d, check_deg(deg)) * (e + 1) * compute_dtype(dtype).itemsize


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, deg: int, chunk_size: int,
                  scale: float | None) -> tuple[float, list[int]]:
    """This rank's own checks, no peer involved: ``(scale, facts)``, ``facts`` coding ``AGREED``."""
    check_qkv(q, k, v)
    check_gate(log_g, k, poison=False)      # refused on CPU; on CUDA cut_chunks poisons it
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
    shards = shard_shapes(rows)
    return (f"Every rank must pass its shard of one sequence (q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, e] of "
            f"one dtype and the same sizes but L on every rank), log_g on all ranks or none, and the same deg and "
            f"scale, with gradients on all ranks or none; the shards are {shards}")


def _alone(group: dist.ProcessGroup | None) -> bool:
    """Whether this process is the whole group: no ``torch.distributed`` and no group given, or a group of one. (Read
    before anything else: on one GPU at 4K tokens a step is ~1.8 ms of mostly host time, which the ring's
    checks would add to.)"""
    if not (dist.is_available() and dist.is_initialized()):
        return group is None
    return dist.get_world_size(group) == 1


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
    if _alone(group):      # nothing to relay: power_retention itself (its checks; the Triton kernel where it applies)
        return power_retention(q, k, v, log_g, deg, chunk_size, scale)
    comm = RingComm(group, who="sharded power retention")
    try:
        scale, facts = _check_inputs(q, k, v, log_g, deg, chunk_size, scale)
    except (TypeError, ValueError):
        # tell the others, so that they raise now rather than wait for this rank
        dev = q.device if isinstance(q, Tensor) and q.device.type in ("cpu", "cuda") else torch.device("cpu")
        with contextlib.suppress(Exception):   # this rank's own error is the one to raise here
            check_agreement(comm, AGREED, None, dev, _decode, _explain)
        raise
    check_agreement(comm, AGREED, facts, q.device, _decode, _explain)
    log_g = check_gate(log_g, k)            # poisoned on CUDA (refused on CPU by the checks above)
    incoming = relay_state(*stretch_state(k, v, log_g, deg), comm)
    return continue_from(q, k, v, log_g, incoming, deg, chunk_size, scale)


__all__ = ["sharded_power_retention", "relay_bytes", "AGREED"]
