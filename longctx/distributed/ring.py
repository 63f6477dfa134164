"""Ring attention: exact softmax attention with the sequence split over the ranks of a process group.

Each rank holds its shard of the sequence (``layout.py``): ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``
with ``L = T / N`` on each of the ``N`` ranks. The key/value shards travel around the ring (``comm.py``),
the next one in flight while the current one is used; each rank attends its queries to every shard with
PyTorch's fused kernels that return the log-sum-exp, and merges the partial results in float32 (float64
for float64 input) with the lse trick. The backward pass sends the key/value shards around again, with
their gradients travelling beside them and coming home after a full turn; each block's backward uses the
saved global output and lse, so nothing of the forward is recomputed beyond the blocks themselves.

Causal work per step (``src`` = the rank whose shard this rank holds at that step):

* step 0 (its own shard): the causal diagonal block — the only masked block;
* zigzag, ``src < rank``: all local queries against the *first* half of the shard (the later half is in
  every local query's future);
* zigzag, ``src > rank``: the *second* half of the local queries against the whole shard (the first
  half of the queries precedes all of it);
* contiguous: ``src < rank`` the whole block, ``src > rank`` nothing (fully masked blocks are skipped).

So under zigzag every rank computes half a block per step, none of it masked.

Before any transfer the ranks check that they agree (``_check_agreement``): one ``all_gather`` of a few
int64 per rank. Shards of one number of elements but different shapes would otherwise travel the ring
unnoticed and give a wrong result, and shards of different sizes or dtypes would abort a rank inside gloo.
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..attention import check_qkv, repeat_kv
from .comm import RingComm, RingShift, check_agreement, shard_shapes
from .layout import LAYOUTS, check_layout, required_multiple

aten = torch.ops.aten

KERNELS = ("auto", "cpu", "flash", "cudnn", "efficient")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every rank must share, in the order of the int64 row each rank contributes to the agreement check,
# after a flag: 1 = its inputs passed its own checks, 0 = it refused them (and raises its own error).
AGREED = ("dtype", "batch size", "query heads", "key/value heads", "shard length", "head_dim", "value head_dim",
          "causal", "layout", "scale", "document ids")
QUERY_CHUNK = 512   # queries per piece of a masked block (bounds its [B, H, chunk, L] scores)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_kernel(kernel: str, q: Tensor, n_kv_head: int | None = None) -> str:
    """The fused attention op used per block: ``cpu`` (CPU flash), ``flash``, ``cudnn`` or ``efficient``
    (CUDA). ``auto``: ``cpu`` on CPU; on CUDA for fp16/bf16 ``cudnn`` where it runs these shapes with
    head_dim <= 128 (the fastest on Hopper), else ``flash`` (head_dim <= 256), else ``efficient``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    dev = q.device.type
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"ring attention runs on CPU or CUDA tensors, got device {q.device}")
    if kernel == "auto":
        if dev == "cpu":
            return "cpu"
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
            return "efficient"
        hkv = q.shape[1] if n_kv_head is None else n_kv_head
        if q.shape[-1] <= 128 and kernel_runs("cudnn", q.device, q.dtype, q.shape[1], hkv, q.shape[-1]):
            return "cudnn"
        return "flash"
    if (kernel == "cpu") != (dev == "cpu"):
        raise ValueError(f"kernel {kernel!r} does not run on device {q.device}")
    if kernel in ("flash", "cudnn") and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"kernel {kernel!r} needs float16 or bfloat16 inputs, got {q.dtype}")
    return kernel


@functools.lru_cache(maxsize=None)
def kernel_runs(kernel: str, device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> bool:
    """Whether ``kernel`` runs a small causal block of this geometry forward and backward on ``device``:
    decided once per geometry, locally, before any ring transfer is posted (no random draws)."""
    if kernel == "cudnn" and not torch.backends.cudnn.is_available():
        return False
    try:
        q = torch.linspace(-1, 1, 128 * d, device=device, dtype=dtype).view(1, 1, 128, d).expand(1, hq, 128, d)
        q = q.contiguous()
        k = v = q[:, :hkv].contiguous()
        o, l, aux = _block_forward(kernel, q, k, v, True, d ** -0.5)
        _block_backward(kernel, o, q, k, v, o, l.contiguous(), True, d ** -0.5, aux)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - any failure of the probe means: use another kernel
        return False


def _block_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float
                   ) -> tuple[Tensor, Tensor, tuple]:
    """One block: ``(out [B,Hq,Tq,D], lse [B,Hq,Tq], aux)``; ``aux`` is what the op's backward also needs."""
    tq = q.shape[2]
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, ()
    if kernel == "flash":
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return r[0], r[1], (r[6], r[7])
    if kernel == "cudnn":
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        return r[0], r[1].reshape(r[1].shape[0], r[1].shape[1], tq), (r[6], r[7])
    rep = q.shape[1] // k.shape[1]
    r = aten._scaled_dot_product_efficient_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), None, True, 0.0,
                                                     causal, scale=scale)
    return r[0], r[1][..., :tq], (r[2], r[3])


def _block_backward(kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    causal: bool, scale: float, aux: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of one block given the *global* ``out`` and ``lse [B,Hq,Tq]`` (contiguous)
    of these queries: the softmax of this block is then the global one restricted to the block's keys."""
    tq, tk = q.shape[2], k.shape[2]
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                         scale=scale)
    if kernel == "flash":
        return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, None, None, tq, tk, 0.0,
                                                                 causal, aux[0], aux[1], scale=scale)
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention_backward(dout, q, k, v, out, lse.unsqueeze(-1), aux[0],
                                                                 aux[1], None, None, None, tq, tk, 0.0, causal,
                                                                 scale=scale)
    hkv, rep = k.shape[1], q.shape[1] // k.shape[1]
    lse = F.pad(lse, (0, -tq % 32))  # the memory-efficient kernel keeps its lse padded to 32 rows
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, repeat_kv(k, rep), repeat_kv(v, rep), None, out, lse, aux[0], aux[1], 0.0,
        [True, True, True, False], causal, scale=scale)
    if rep > 1:
        dk = dk.unflatten(1, (hkv, rep)).sum(2)
        dv = dv.unflatten(1, (hkv, rep)).sum(2)
    return dq, dk, dv


def _masked_block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One block under an explicit ``mask [B, Tq, Tk]`` (True: attend), in float32 (float64 for float64):
    ``(out [B,Hq,Tq,Dv], lse [B,Hq,Tq])``; a row with nothing to attend gives ``out = 0, lse = -inf``.
    Matrix form in pieces of ``QUERY_CHUNK`` queries (packed documents: no fused kernel takes such masks and
    returns the lse on every device)."""
    B, hq, tq, d = q.shape
    hkv, acc = k.shape[1], _acc_dtype(q.dtype)
    g = hq // hkv
    kf, vf = k.to(acc), v.to(acc)
    out = torch.empty(B, hkv, g, tq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(B, hkv, g, tq, dtype=acc, device=q.device)
    for i in range(0, tq, QUERY_CHUNK):
        qg = q[:, :, i:i + QUERY_CHUNK].to(acc).unflatten(1, (hkv, g))                  # [B, Hkv, G, t, D]
        m = mask[:, None, None, i:i + QUERY_CHUNK]                                       # [B, 1, 1, t, Tk]
        s = (scale * qg @ kf[:, :, None].transpose(-1, -2)).masked_fill(~m, float("-inf"))
        l = torch.logsumexp(s, dim=-1)
        p = torch.where(m, torch.exp(s - l.unsqueeze(-1)), 0.0)
        out[:, :, :, i:i + QUERY_CHUNK] = p @ vf[:, :, None]
        lse[:, :, :, i:i + QUERY_CHUNK] = l
    return out.flatten(1, 2), lse.flatten(1, 2)


def _masked_block_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` (float32, float64 for float64) of one masked block given the *global* ``out``
    and ``lse`` of these queries (as ``_block_backward``): ``p = exp(s - lse)``, ``ds = p (dout·vᵀ - Σ dout∘out)``."""
    B, hq, tq, d = q.shape
    hkv, acc = k.shape[1], _acc_dtype(q.dtype)
    g = hq // hkv
    kf, vf = k.to(acc), v.to(acc)
    dq = torch.empty(B, hkv, g, tq, d, dtype=acc, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for i in range(0, tq, QUERY_CHUNK):
        piece = slice(i, i + QUERY_CHUNK)
        qg, og, dog = (x[:, :, piece].to(acc).unflatten(1, (hkv, g)) for x in (q, out, dout))
        m = mask[:, None, None, piece]
        s = scale * qg @ kf[:, :, None].transpose(-1, -2)
        p = torch.where(m, torch.exp(s - lse[:, :, piece].to(acc).unflatten(1, (hkv, g)).unsqueeze(-1)), 0.0)
        dv += (p.transpose(-1, -2) @ dog).sum(2)
        ds = p * (dog @ vf[:, :, None].transpose(-1, -2) - (dog * og).sum(-1, keepdim=True))
        dq[:, :, :, piece] = scale * ds @ kf[:, :, None]
        dk += scale * (ds.transpose(-1, -2) @ qg).sum(2)
    return dq.flatten(1, 2), dk, dv


def _doc_mask(kind: str, docs_q: Tensor, docs_k: Tensor, c: int) -> Tensor:
    """``[B, Tq, Tk]`` for block ``kind``: same document, and (``"diag"``) causal in local order."""
    if kind == "kv_lo":
        docs_k = docs_k[:, :c]
    elif kind == "q_hi":
        docs_q = docs_q[:, c:]
    mask = docs_q[:, :, None] == docs_k[:, None, :]
    if kind == "diag":
        mask &= torch.ones(mask.shape[1:], dtype=torch.bool, device=mask.device).tril()
    return mask


def block_kind(step: int, rank: int, world_size: int, causal: bool, layout: str) -> str:
    """What rank ``rank`` computes at ``step`` (holding the shard of rank ``(rank - step) % world_size``):
    ``"diag"`` (causal own block), ``"full"``, ``"kv_lo"`` (all queries x first half of the keys),
    ``"q_hi"`` (second half of the queries x all keys) or ``"skip"``."""
    if not causal:
        return "full"
    if step == 0:
        return "diag"
    src = (rank - step) % world_size
    if layout == "zigzag":
        return "kv_lo" if src < rank else "q_hi"
    return "full" if src < rank else "skip"


def _merge_into(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold a partial result ``(o [B,H,T,D], l [B,H,T])`` into the running ``(out, lse)``, in place."""
    new = torch.logaddexp(lse, l)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).addcmul_(o, torch.exp(l - new).unsqueeze(-1))
    lse.copy_(new)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, docs: Tensor | None, comm: RingComm, causal: bool, layout: str,
                  scale: float, kernel: str) -> tuple[Tensor, Tensor, tuple]:
    n, rank = comm.world_size, comm.rank
    B, H, L, _ = q.shape
    c = L // 2
    acc = _acc_dtype(q.dtype)
    kv = RingShift(comm, torch.stack((k, v)), "keys/values")
    # a copy travels: the buffer received two steps later lands in the slot it leaves behind
    kdocs = RingShift(comm, docs.clone(), "document ids") if docs is not None else None
    out = torch.empty_like(q, dtype=acc)          # q's memory layout, so the result keeps it
    lse = torch.empty(B, H, L, dtype=acc, device=q.device)
    aux: tuple = ()

    def block(kind: str, qb: Tensor, kb: Tensor, vb: Tensor, masked: bool) -> tuple[Tensor, Tensor, tuple]:
        if kdocs is None:
            return _block_forward(kernel, qb, kb, vb, masked, scale)
        return (*_masked_block_forward(qb, kb, vb, _doc_mask(kind, docs, kdocs.current, c), scale), ())

    for step in range(n):
        if step + 1 < n:
            kv.start()
            if kdocs is not None:
                kdocs.start()
        ks, vs = kv.current.unbind(0)
        kind = block_kind(step, rank, n, causal, layout)
        if kind == "diag" or (kind == "full" and step == 0):
            o, l, aux = block(kind, q, ks, vs, kind == "diag")
            out.copy_(o)
            lse.copy_(l)
        elif kind == "full":
            o, l, _ = block(kind, q, ks, vs, False)
            _merge_into(out, lse, o, l)
        elif kind == "kv_lo":
            o, l, _ = block(kind, q, ks[:, :, :c], vs[:, :, :c], False)
            _merge_into(out, lse, o, l)
        elif kind == "q_hi":
            o, l, _ = block(kind, q[:, :, c:], ks, vs, False)
            _merge_into(out[:, :, c:], lse[:, :, c:], o, l)
        if step + 1 < n:
            kv.finish()
            if kdocs is not None:
                kdocs.finish()
    return out.to(q.dtype), lse, aux


def _ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, docs: Tensor | None, out: Tensor, lse: Tensor,
                   comm: RingComm, causal: bool, layout: str, scale: float, kernel: str, aux: tuple
                   ) -> tuple[Tensor, Tensor, Tensor]:
    n, rank = comm.world_size, comm.rank
    c = q.shape[2] // 2
    acc = _acc_dtype(q.dtype)
    kv = RingShift(comm, torch.stack((k, v)), "keys/values")
    kdocs = RingShift(comm, docs.clone(), "document ids") if docs is not None else None

    def block(kind: str, do: Tensor, qb: Tensor, kb: Tensor, vb: Tensor, ob: Tensor, lb: Tensor, masked: bool):
        if kdocs is None:
            return _block_backward(kernel, do, qb, kb, vb, ob, lb, masked, scale, aux)
        return _masked_block_backward(do, qb, kb, vb, ob, lb, _doc_mask(kind, docs, kdocs.current, c), scale)

    dkv: RingShift | None = None                     # gradients of the shard held, travelling with it
    halves = causal and layout == "zigzag" and n > 1
    if halves:
        q_hi, out_hi, dout_hi, lse_hi = q[:, :, c:], out[:, :, c:], dout[:, :, c:], lse[:, :, c:].contiguous()
    dq = torch.empty_like(q, dtype=acc)
    for step in range(n):
        if step + 1 < n:
            kv.start()
            if kdocs is not None:
                kdocs.start()
        ks, vs = kv.current.unbind(0)
        kind = block_kind(step, rank, n, causal, layout)
        if kind in ("diag", "full"):
            g = block(kind, dout, q, ks, vs, out, lse, kind == "diag")
        elif kind == "kv_lo":
            g = block(kind, dout, q, ks[:, :, :c], vs[:, :, :c], out, lse, False)
        elif kind == "q_hi":
            g = block(kind, dout_hi, q_hi, ks, vs, out_hi, lse_hi, False)
        if step == 0:                                # always "diag" or "full": initialises the accumulators
            dq.copy_(g[0])
            first = torch.empty((2, *k.shape), dtype=acc, device=k.device)
            first[0].copy_(g[1])
            first[1].copy_(g[2])
            dkv = RingShift(comm, first, "key/value gradients")
        else:
            dks, dvs = dkv.finish().unbind(0)        # this shard's gradients from the ranks before
            if kind == "full":
                dq.add_(g[0])
                dks.add_(g[1])
                dvs.add_(g[2])
            elif kind == "kv_lo":
                dq.add_(g[0])
                dks[:, :, :c].add_(g[1])
                dvs[:, :, :c].add_(g[2])
            elif kind == "q_hi":
                dq[:, :, c:].add_(g[0])
                dks.add_(g[1])
                dvs.add_(g[2])
        dkv.start()                                  # pass them on; after the last step they arrive home
        if step + 1 < n:
            kv.finish()
            if kdocs is not None:
                kdocs.finish()
    dk, dv = dkv.finish().unbind(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, docs: Tensor | None, causal: bool, layout: str,
                  scale: float | None, kernel: str) -> tuple[str, float, list[int]]:
    """This rank's own checks, no peer involved: ``(kernel, scale, facts)``, ``facts`` coding ``AGREED``."""
    check_qkv(q, k, v)
    if docs is not None and (not isinstance(docs, Tensor) or docs.dtype != torch.int64
                             or docs.shape != (q.shape[0], q.shape[2]) or docs.device != q.device):
        raise ValueError(f"document_ids must be an int64 tensor [batch, shard length] = [{q.shape[0]}, {q.shape[2]}] "
                         f"on {q.device}, got " + (f"{docs.dtype} {tuple(docs.shape)} on {docs.device}"
                                                   if isinstance(docs, Tensor) else type(docs).__name__))
    check_layout(layout)
    if k.shape != v.shape:
        raise ValueError(f"ring attention needs k and v of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"ring attention takes float16, bfloat16, float32 or float64 inputs, got {q.dtype}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must hold the same tokens (one shard), got {q.shape[2]} and {k.shape[2]}")
    kernel = pick_kernel(kernel, q, k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]     # compared exactly, as the ranks use it
    (B, hq, L, d), hkv, dv = q.shape, k.shape[1], v.shape[3]
    facts = [DTYPES.index(q.dtype), B, hq, hkv, L, d, dv, int(bool(causal)), LAYOUTS.index(layout), scale_bits,
             int(docs is not None)]
    return kernel, scale, facts


def _decode(name: str, code: int):
    if name == "dtype":
        return DTYPES[code]
    if name in ("causal", "document ids"):
        return bool(code)
    if name == "layout":
        return repr(LAYOUTS[code])
    if name == "scale":
        return struct.unpack("<d", struct.pack("<q", code))[0]
    return code


def _check_agreement(comm: RingComm, facts: list[int] | None, device: torch.device) -> None:
    """``comm.check_agreement`` on the ``AGREED`` facts of ring attention (``None``: this rank refused its own)."""
    def explain(rows: list[dict]) -> str:
        shards = shard_shapes(rows, "shard length")
        return (f"Every rank must pass its shard of one sequence (q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, "
                f"Dv] of one dtype and the same sizes on every rank) and the same causal, layout and scale; the "
                f"shards are {shards}")
    check_agreement(comm, AGREED, facts, device, _decode, explain)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, docs, comm, causal, layout, scale, kernel):
        out, lse, aux = _ring_forward(q, k, v, docs, comm, causal, layout, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.docs = docs
        ctx.config = (comm, causal, layout, scale, kernel, aux)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1 or 0 in dout.stride():
            dout = dout.contiguous()
        dq, dk, dv = _ring_backward(dout, q, k, v, ctx.docs, out, lse, *ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, causal: bool = True,
                   layout: str = "zigzag", scale: float | None = None, kernel: str = "auto",
                   document_ids: Tensor | None = None, comm: RingComm | None = None) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``; this rank's output shard.

    Call it on every rank of ``group`` (default: the default process group; without ``torch.distributed``
    initialised it runs on this process alone) with this rank's shard in ``layout`` (see
    ``longctx.distributed.layout``): ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``, the same ``L`` on every
    rank, ``Hq % Hkv == 0``. Returns ``[B, Hq, L, D]`` in q's dtype, equal to exact attention over the whole
    sequence restricted to this rank's queries; differentiable in ``q, k, v``. ``causal`` masks by global
    position. ``kernel`` picks the fused op per block (see ``pick_kernel``); every rank must pick the same.

    The ranks check that they agree before any transfer: one ``all_gather`` of 12 int64 per rank (96 bytes,
    ``1 + len(AGREED)``) on q's device, whose result is read on the host (on CUDA, one synchronisation per
    call). It carries each rank's dtype, ``B, Hq, Hkv, L, D, Dv``, ``causal``, ``layout``, ``scale`` and whether
    it passes document ids;
    where they differ, every rank raises the same ValueError naming what differs and which ranks hold which
    values; where they agree but ``L`` does not fit ``layout``, every rank raises the same ValueError too. A
    rank that refuses its own inputs still joins the check, so the others raise at once instead of waiting.
    The backward pass reuses the forward's check; a group of one needs no collective. A peer that raised
    before the check, died or hangs makes it raise ``RingCommError`` (bounded by the group's timeout).

    Packed documents: ``document_ids [B, L]`` (int64, this rank's tokens' document numbers, in the same layout)
    restricts attention to keys of the same document (and, causal, not later). The ids travel around the ring
    with the keys; every block then runs the masked matrix form (``_masked_block_forward``: float32 scores of
    ``QUERY_CHUNK`` queries at a time, no fused kernel), so packed rows cost more time and memory than plain ones.
    ``comm`` replaces ``group`` by a ready ring (``RingComm.alone()``: this process only).
    """
    comm = comm if comm is not None else RingComm(group)
    try:
        kernel, scale, facts = _check_inputs(q, k, v, document_ids, causal, layout, scale, kernel)
    except (TypeError, ValueError):
        if comm.world_size > 1:   # tell the others, so that they raise now rather than wait for this rank
            dev = q.device if isinstance(q, Tensor) and q.device.type in ("cpu", "cuda") else torch.device("cpu")
            with contextlib.suppress(Exception):   # this rank's own error is the one to raise here
                _check_agreement(comm, None, dev)
        raise
    n, L = comm.world_size, q.shape[2]
    if n > 1:
        _check_agreement(comm, facts, q.device)
    multiple = required_multiple(n, layout)
    if L * n % multiple or L == 0:     # L agreed: every rank raises this alike
        what = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(f"the {layout} layout over {n} ranks needs a total sequence length that is a multiple of "
                         f"{what} = {multiple}; got {L} tokens on each rank ({L * n} in total)")
    return _RingAttention.apply(q, k, v, document_ids, comm, causal, layout, scale, kernel)


__all__ = ["ring_attention", "block_kind", "pick_kernel", "kernel_runs", "KERNELS"]
