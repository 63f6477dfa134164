"""Tensor Cache with the sequence split contiguously over the ranks of a process group (sequence parallelism).

Rank ``r`` holds tokens ``[s, s + L)`` (``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``, ``L >= window`` on every
rank; the lengths may differ). Query ``i`` attends to keys ``(i - W, i]`` and reads the memory holding the writes of
tokens ``j <= i - W`` (``mechanisms.tensor_cache.naive``), so a rank needs two things from before its shard:

1. the halo, the previous rank's last ``W`` keys and values (``relay.exchange_halo``, all ranks at once): the
   window of its first queries, and the tokens that leave the window during its shard, written to the memory
   here, so that a token evicted across a shard boundary is written exactly once, by the rank whose queries
   evict it;
2. the memory entering its shard, ``A`` after the writes of tokens ``j < s - W`` (``relay.relay_state``, in rank
   order): its own writes, ``n = h + L - W`` of them (``h`` = 0 halo tokens on rank 0, ``W`` elsewhere), leave
   ``lam^n A + A_local``.

The memory read is linear in the incoming memory, so one ``decayed_scan`` from zero gives both the shard's own
reads and ``A_local``; after the relay, row ``m`` adds ``lam^(m+1) phi(q) A``. Autograd, the halo's gradients
sent back and the relay's reverse scan give the q, k, v and parameter gradients (each rank holds its shard's part
of the parameter gradients: sum them over the ranks, as in data parallelism). ``write="exact"`` only: the
chunk-mean shortcut groups evicted tokens in chunks aligned to the start of the sequence.

Bytes per rank and call, independent of ``L``: forward, the halo ``B x Hkv x W x 2D`` (input dtype) and one
memory ``B x Hkv x D x D`` (float32, float64 for float64 inputs), each sent by every rank but the last; backward
the same two the other way; plus the agreement check's ``all_gather`` of ``1 + len(AGREED)`` int64. For ``W = 32,
D = 64``, bf16, ``B = 1``, ``Hkv = 8``: 65 KB of halo and 131 KB of memory, against ring attention's
``(N - 1) x 2 x B x Hkv x L x D`` elements (58.7 MB forward at ``L = 4096``, ``N = 8``). The halo goes in
parallel; the memory relay is sequential, ``N - 1`` hops of 131 KB (microseconds each on NVLink) on the critical
path. The prediction (not measured: no GPU this session) is a scaling efficiency close to 1 once ``L >> W``: the
work beyond one process's share is the halo's ``W`` extra keys in the window attention and one ``L x D x D``
read of the incoming memory per query head.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import check_qkv
from ..mechanisms.tensor_cache.recurrent import memory_dtype
from ..mechanisms.tensor_cache.scan import decayed_scan
from ..mechanisms.tensor_cache.window import blocked_window_attention
from .comm import RingComm, check_agreement, shard_shapes
from .relay import exchange_halo, relay_state

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must share (the shard length need not), in the order of the agreement check's int64 row.
AGREED = ("dtype", "batch size", "query heads", "key/value heads", "head_dim", "value head_dim", "window",
          "needs gradients")


def _check_inputs(mech, q: Tensor, k: Tensor, v: Tensor) -> list[int]:
    """This rank's own checks: ``facts`` coding ``AGREED``."""
    check_qkv(q, k, v)
    if q.dtype not in DTYPES:
        raise TypeError(f"sharded Tensor Cache takes float16, bfloat16, float32 or float64 inputs, got {q.dtype}")
    if mech.write != "exact":
        raise ValueError(f"sharded Tensor Cache needs write='exact', got write={mech.write!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same tokens (one shard), got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] < mech.window:
        raise ValueError(f"sharded Tensor Cache needs at least window = {mech.window} tokens on every rank (the next "
                         f"rank's halo), got a shard of {q.shape[2]}")
    params = [p.requires_grad for p in mech.parameters()]
    grads = torch.is_grad_enabled() and (any(params) or any(t.requires_grad for t in (q, k, v)))
    (B, hq, _, d), hkv, e = q.shape, k.shape[1], v.shape[3]
    return [DTYPES.index(q.dtype), B, hq, hkv, d, e, mech.window, int(grads)]


def _decode(name: str, code: int):
    return DTYPES[code] if name == "dtype" else bool(code) if name == "needs gradients" else code


def _explain(rows: list[dict]) -> str:
    shards = shard_shapes(rows)
    return (f"Every rank must pass its shard of one sequence (q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] of "
            f"one dtype and the same sizes but L on every rank) to one Tensor Cache configuration, with gradients on "
            f"all ranks or none; the shards are {shards}")


def sharded_tensor_cache(mech, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``mech`` (a ``TensorCache``, ``write="exact"``) over a sequence split contiguously across the ranks of
    ``group`` (default: the default process group); this rank's outputs ``[B, Hq, L, Dv]``.

    Call it on every rank of ``group`` with this rank's stretch of the sequence, in rank order: ``q [B, Hq, L, D]``,
    ``k [B, Hkv, L, D]``, ``v [B, Hkv, L, Dv]``, ``L >= mech.window`` (it may differ by rank), q and k already
    rotated at their global positions. Equal to ``mech`` on the whole sequence restricted to this rank's queries;
    differentiable in ``q, k, v`` and ``mech``'s parameters (this rank's part of their gradients). The ranks check
    that they agree first (one ``all_gather``): every rank raises the same ValueError where they do not, or where
    one refuses its own inputs. A peer that raised, died or hangs makes the wait raise ``RingCommError``.
    """
    comm = RingComm(group, who="sharded Tensor Cache")
    try:
        facts = _check_inputs(mech, q, k, v)
    except (TypeError, ValueError):
        if comm.world_size > 1:   # tell the others, so that they raise now rather than wait for this rank
            dev = q.device if isinstance(q, Tensor) and q.device.type in ("cpu", "cuda") else torch.device("cpu")
            with contextlib.suppress(Exception):
                check_agreement(comm, AGREED, None, dev, _decode, _explain)
        raise
    if comm.world_size > 1:
        check_agreement(comm, AGREED, facts, q.device, _decode, _explain)
    W, (B, _, L, _) = mech.window, q.shape
    halo = exchange_halo(torch.cat([k[:, :, -W:], v[:, :, -W:]], -1), comm)       # [B, Hkv, h, D + Dv]
    hk, hv = halo.split([k.shape[-1], v.shape[-1]], -1)
    keys, values = torch.cat([hk, k], 2), torch.cat([hv, v], 2)                   # the halo, then the shard
    l1 = blocked_window_attention(q, keys, values, W)
    dt = memory_dtype(q.dtype)
    fq = mech._queries(q, dt)                                                     # [B, Hkv, G, L, D]
    n = halo.shape[2] + L - W                                                     # writes during this shard
    fk, vs = mech._writes(keys[:, :, :n], values[:, :, :n], dt)
    lam = mech.decay.to(dt)
    reads, local = decayed_scan(fq[:, :, :, L - n:], fk, vs, lam, mech.chunk)      # the last n queries read
    incoming = relay_state(local, (n * torch.log(lam)).expand(B, -1), comm)       # [B, Hkv, D, Dv]
    decay = lam.view(1, -1, 1, 1, 1) ** torch.arange(1, n + 1, device=q.device, dtype=dt).view(1, 1, 1, n, 1)
    reads = reads + (fq[:, :, :, L - n:] * decay) @ incoming.unsqueeze(2)
    r = torch.cat([fq.new_zeros(*fq.shape[:3], L - n, v.shape[-1]), reads], 3)    # rank 0's first W: no memory
    return mech._mix(l1, r)


__all__ = ["sharded_tensor_cache", "AGREED"]
