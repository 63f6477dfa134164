"""Flash-decoding: softmax attention for ONE query token over a fixed-size KV buffer whose valid length lives in
device memory (reference: ``decode_attention_reference`` below, pure PyTorch).

    o[b, h] = softmax_j(scale q[b, h] . k[b, kv, j]) @ v[b, kv, j],   j in [0, length),   kv = h // (Hq / Hkv)

Layout: ``q [B, Hq, 1, D]``, ``k_buf [B, Hkv, N, D]``, ``v_buf [B, Hkv, N, Dv]``, ``o [B, Hq, 1, Dv]`` in ``q``'s
dtype; ``length`` is an integer tensor of one element on ``q``'s device. Slots ``>= length`` are never read (they
may hold anything, NaN included), and the length is read on the device, so the call is free of host syncs and
data-dependent shapes: it can be captured in a CUDA graph once for the buffer's capacity ``N`` and replayed while
the length grows. The caller guarantees ``1 <= length <= N`` (not checked: that would need a host sync).

Why split. One token of decoding reads every valid key and value once for a few flops each: bandwidth-bound.
One program per (batch row, KV head) would leave most of the GPU idle at batch 1 (8 KV heads against 132 SMs on an
H100), so the valid slots are cut into ``n_splits`` pieces, one program each:

1. ``_split_partials`` grid (B*Hkv, n_splits): program ``s`` covers slots ``[s*C, (s+1)*C) ∩ [0, length)`` where
   ``C = ceil(ceil(length / n_splits) / BLOCK) * BLOCK`` is computed on the device from the length, so every
   program gets an equal share of the *valid* slots however small the length is against the capacity (a split
   fixed on the host from ``N`` would leave most programs idle while the cache fills). It reads each ``[BLOCK, D]``
   block of K and V once for all ``G = Hq / Hkv`` query heads of its KV head (``tl.dot`` of the ``[G, D]`` queries,
   padded to 16 rows, with the block), keeps the softmax online in fp32, and writes its normalised partial output
   and base-2 log-sum-exp to fp32 scratch ``[B, Hkv, n_splits, G, Dv]`` / ``[B, Hkv, n_splits, G]``. A program
   whose share starts at or past ``length`` loops zero times and writes ``lse = -inf``, zero output.
2. ``_merge_splits`` grid (B*Hq,): ``o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``, ``M = max_s lse_s``.

With one split (small ``N``: a sliding window of 64 slots, say) kernel 1 writes ``o`` itself and kernel 2 is
skipped. ``n_splits`` depends on static facts only (``N``, ``B*Hkv``, the SM count on CUDA; a fixed stand-in under
the interpreter): about ``WAVES`` programs per SM, at least ``MIN_SPLIT`` slots of capacity per split, at most
``MAX_SPLITS``. Plain ``@triton.jit`` without autotuning, so the same code runs under ``TRITON_INTERPRET=1``.

Measured on an H100 (bf16, D = 128, replayed from a CUDA graph, Hq/Hkv = 32/8): 2.8 TB/s of KV read at batch 1
and 128K valid slots, 3.0 TB/s at batch 8 and 32K, within a few percent of SDPA's flash kernel on the valid slice
(which needs the length on the host).
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from .attention import check_qkv

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path works without triton
    triton = None

BLOCK_BYTES = 16384   # K bytes per loop step of kernel 1 at 16 bits: 64 slots of D = 128, 256 of D = 32 (an H100
                      # read a 1M-token cache of D = 32 at 2.1x its bandwidth bound with 64-slot steps)
MERGE_BLOCK = 64      # splits per loop step of kernel 2
MIN_SPLIT = 256       # fewest slots of capacity worth a program of their own
MAX_SPLITS = 256      # most splits per (batch row, KV head): bounds the scratch and the merge
MAX_GROUP = 64        # most query heads per KV head (the [G, Dv] accumulator lives in registers)
WAVES = 2             # programs per SM aimed at when the capacity is long
INTERPRETER_SMS = 16  # the SM count assumed under the interpreter (no device to ask)
WARPS, STAGES, MERGE_WARPS = 4, 2, 2  # launches on a GPU
# (BLOCK_BYTES, WAVES, MAX_SPLITS, MERGE_BLOCK and the launches: the best of a sweep on an H100, bf16, D = 128)
HEAD_DIMS = (16, 32, 64, 128)  # D and Dv: powers of two (block ranges in the kernels)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_length(length: Tensor, q: Tensor) -> None:
    if not isinstance(length, Tensor) or length.numel() != 1 or length.dim() > 1:
        raise ValueError(f"length must be a 1-element tensor of shape [1], got "
                         f"{tuple(length.shape) if isinstance(length, Tensor) else type(length).__name__}")
    if length.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"length must be an int32 or int64 tensor, got {length.dtype}")
    if length.device != q.device:
        raise ValueError(f"length must be on q's device {q.device}, got {length.device}")


def _check_length_value(length: Tensor, slots: int) -> None:
    """On CPU (where reading it costs no sync): ``0 <= length <= slots``; past the buffer the kernels would read
    slots that are not there (the reference silently reads the valid ones only)."""
    if length.device.type == "cpu" and not 0 <= int(length) <= slots:
        raise ValueError(f"length must lie in [0, {slots}] (the buffers' slots), got {int(length)}")


def _check(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor) -> None:
    check_qkv(q, k_buf, v_buf)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one token [batch, heads, 1, head_dim], got shape {tuple(q.shape)}")
    _check_length(length, q)
    _check_length_value(length, k_buf.shape[2])


def decode_attention_reference(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor,
                               scale: float | None = None) -> Tensor:
    """``o [B, Hq, 1, Dv]`` (``q``'s dtype) over slots ``[0, length)`` of the buffers, in float32 (float64 for
    float64 inputs). Capture-safe (no host sync, static shapes); garbage past ``length`` is replaced through
    ``torch.where`` before it can reach a sum (``0 * NaN`` would be NaN)."""
    _check(q, k_buf, v_buf, length)
    B, Hq, _, D = q.shape
    Hkv, N = k_buf.shape[1], k_buf.shape[2]
    scale = D ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)
    valid = torch.arange(N, device=q.device) < length.reshape(1)            # [N]
    qg = q.to(ct).reshape(B, Hkv, Hq // Hkv, D)                             # the query heads of each KV head
    scores = scale * qg @ k_buf.to(ct).transpose(-1, -2)                    # [B, Hkv, G, N]
    p = torch.softmax(torch.where(valid, scores, float("-inf")), dim=-1)
    v = torch.where(valid[:, None], v_buf.to(ct), 0.0)
    return (p @ v).reshape(B, Hq, 1, v_buf.shape[-1]).to(q.dtype)


def decode_kernel_applies(q: Tensor, k_buf: Tensor, v_buf: Tensor) -> bool:
    """Triton importable, ``q`` on CUDA (or the interpreter), fp16/bf16/fp32, ``D`` and ``Dv`` in ``HEAD_DIMS``,
    at most ``MAX_GROUP`` query heads per KV head."""
    return (triton is not None and (q.is_cuda or _interpreting()) and q.dim() == 4 and k_buf.dim() == 4
            and v_buf.dim() == 4 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] in HEAD_DIMS and v_buf.shape[-1] in HEAD_DIMS
            and k_buf.shape[1] > 0 and q.shape[1] % k_buf.shape[1] == 0 and q.shape[1] // k_buf.shape[1] <= MAX_GROUP)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count (cached); ``INTERPRETER_SMS`` off CUDA, where nothing is queried."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(n: int, programs_per_split: int, device: torch.device) -> int:
    """Splits of the ``n``-slot capacity for ``programs_per_split = B * Hkv``: about ``WAVES`` programs per SM,
    no split of fewer than ``MIN_SPLIT`` slots (so 1 split up to ``MIN_SPLIT`` slots), at most ``MAX_SPLITS``."""
    wanted = -(-WAVES * sm_count(device) // programs_per_split)
    return max(1, min(wanted, -(-n // MIN_SPLIT), MAX_SPLITS))


if triton is not None:
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, INTERP: tl.constexpr):
        """``tl.dot`` with fp32 accumulation: exact fp32 products for fp32 inputs (no tf32), and under the
        interpreter (whose 16-bit dot is wrong in triton 3.8) the operands widened to fp32 first."""
        if INTERP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _split_partials(Q, K, V, L, ACC, LSE, n_splits, qk_scale,
                        skb, skh, skn, svb, svh, svn,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
        bkv = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        length = tl.load(L).to(tl.int32)
        share = tl.cdiv(tl.cdiv(length, n_splits), BLOCK) * BLOCK       # slots per program, from the live length
        start = s * share
        end = tl.minimum(start + share, length)
        gi = tl.arange(0, GP)
        di = tl.arange(0, D)
        ei = tl.arange(0, DV)
        head = gi < G                                                 # rows past G pad the dot to 16
        q = tl.load(Q + (bkv * G + gi)[:, None] * D + di[None, :], mask=head[:, None], other=0.0)
        kp = K + (bkv // HKV) * skb + (bkv % HKV) * skh
        vp = V + (bkv // HKV) * svb + (bkv % HKV) * svh
        m = tl.full([GP], float("-inf"), tl.float32)
        den = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, DV], dtype=tl.float32)
        for n0 in range(start, end, BLOCK):                            # zero steps where start >= length
            rows = n0 + tl.arange(0, BLOCK)
            live = rows < end                                          # every step has a live row: m stays finite
            slot = rows.to(tl.int64)[:, None]                          # slot-major caches: N * stride > 2^31
            k = tl.load(kp + slot * skn + di[None, :], mask=live[:, None], other=0.0)
            x = _dot(q, tl.trans(k), IEEE, INTERP) * qk_scale          # [GP, BLOCK], base-2 logits
            x = tl.where(live[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(x - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            v = tl.load(vp + slot * svn + ei[None, :], mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, INTERP)
            m = m_new
        empty = den == 0.0
        o = acc / tl.where(empty, 1.0, den)[:, None]
        out = ((bkv * n_splits + s) * G + gi)[:, None] * DV + ei[None, :]
        tl.store(ACC + out, o.to(ACC.dtype.element_ty), mask=head[:, None])
        if not DIRECT:
            lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, den)))
            tl.store(LSE + (bkv * n_splits + s) * G + gi, lse, mask=head)

    @triton.jit
    def _merge_splits(ACC, LSE, O, n_splits, G: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)                             # = bkv * G + g
        base = (bh // G) * n_splits * G + bh % G                       # split s of this head: base + s * G
        ei = tl.arange(0, DV)
        mx = tl.full([BS], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BS):
            si = s0 + tl.arange(0, BS)
            mx = tl.maximum(mx, tl.load(LSE + base + si * G, mask=si < n_splits, other=float("-inf")))
        top = tl.max(mx, 0)                                            # finite: split 0 holds slot 0
        den = tl.zeros([BS], dtype=tl.float32)
        num = tl.zeros([BS, DV], dtype=tl.float32)
        for s0 in range(0, n_splits, BS):
            si = s0 + tl.arange(0, BS)
            live = si < n_splits
            w = tl.exp2(tl.load(LSE + base + si * G, mask=live, other=float("-inf")) - top)
            part = tl.load(ACC + (base + si * G)[:, None] * DV + ei[None, :], mask=live[:, None], other=0.0)
            num += w[:, None] * part
            den += w
        o = tl.sum(num, 0) / tl.sum(den, 0)
        tl.store(O + bh * DV + ei, o.to(O.dtype.element_ty))


def block_slots(d: int) -> int:
    """KV slots per loop step: ``BLOCK_BYTES`` of 16-bit keys, 64 to 256 slots (small head dims need longer steps
    to keep enough bytes in flight)."""
    return min(256, max(64, BLOCK_BYTES // (2 * d)))


def _rows_contiguous(x: Tensor) -> Tensor:
    """The buffers may be strided views (no copy of a large cache), but each slot's vector must be contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_attention_triton(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor, scale: float,
                            n_splits: int | None = None) -> Tensor:
    """The two kernels (inputs checked by the caller); ``n_splits``: ``num_splits(...)`` unless given."""
    B, Hq, _, D = q.shape
    Hkv, N, Dv = k_buf.shape[1], k_buf.shape[2], v_buf.shape[-1]
    G = Hq // Hkv
    ns = num_splits(N, B * Hkv, q.device) if n_splits is None else n_splits
    k, v = _rows_contiguous(k_buf), _rows_contiguous(v_buf)
    o = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    direct = ns == 1
    acc = o if direct else torch.empty(B, Hkv, ns, G, Dv, device=q.device, dtype=torch.float32)
    lse = o if direct else torch.empty(B, Hkv, ns, G, device=q.device, dtype=torch.float32)
    _split_partials[(B * Hkv, ns)](
        q.contiguous(), k, v, length, acc, lse, ns, scale * math.log2(math.e),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HKV=Hkv, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, DV=Dv, BLOCK=block_slots(D), DIRECT=direct,
        IEEE=q.dtype == torch.float32, INTERP=_interpreting(), num_warps=WARPS, num_stages=STAGES)
    if not direct:
        _merge_splits[(B * Hq,)](acc, lse, o, ns, G=G, DV=Dv, BS=MERGE_BLOCK, num_warps=MERGE_WARPS)
    return o


def decode_attention(q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor, scale: float | None = None,
                     use_kernel: bool | None = None) -> Tensor:
    """One query token's attention ``o [B, Hq, 1, Dv]`` (``q``'s dtype) over slots ``[0, length)`` of ``k_buf
    [B, Hkv, N, D]`` / ``v_buf [B, Hkv, N, Dv]`` (``length``: int32/int64 ``[1]`` on ``q``'s device, ``1 <= length
    <= N`` by contract). ``use_kernel``: ``None`` picks the Triton kernel where ``decode_kernel_applies``, ``True``
    insists (``ValueError`` where it does not apply), ``False`` runs ``decode_attention_reference``."""
    _check(q, k_buf, v_buf, length)
    applies = decode_kernel_applies(q, k_buf, v_buf)
    if use_kernel and not applies:
        raise ValueError(
            "use_kernel=True: the decode attention kernel needs triton, q on CUDA (or TRITON_INTERPRET=1), "
            f"fp16/bf16/fp32, head dims in {HEAD_DIMS} and at most {MAX_GROUP} query heads per KV head; got "
            f"device {q.device}, {q.dtype}, D={q.shape[-1]}, Dv={v_buf.shape[-1]}, Hq={q.shape[1]}, "
            f"Hkv={k_buf.shape[1]}")
    if use_kernel is False or not applies:
        return decode_attention_reference(q, k_buf, v_buf, length, scale)
    return decode_attention_triton(q, k_buf, v_buf, length, q.shape[-1] ** -0.5 if scale is None else scale)
