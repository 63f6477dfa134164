"""Chunked parallel form of power retention: O(T) in sequence length, exact.

The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the weights are formed as in
attention (``c x c`` per chunk); everything before the chunk is summarised by the state entering it::

    S = sum_j g_(end, j) phi(k_j) v_j^T   [D, e]        z = sum_j g_(end, j) phi(k_j)   [D]

(``phi`` the symmetric power of ``expand``, ``D = C(d+p-1, p)``), so that query ``i`` of chunk ``n`` adds
``scale^p g_(i, start) phi(q_i)^T S_n`` to its numerator and ``scale^p g_(i, start) phi(q_i)^T z_n`` to its
denominator. Arithmetic is float32 (float64 for float64 inputs) whatever the input dtype: the state of an
ungated 1M-token sequence holds sums of ~1e6 terms of size ``|k|^(2p)``, far inside float32's range, so
fp16/bf16 inputs never overflow (fp16's own range, 65504, would not survive 64K tokens).

Two halves: ``cut_chunks`` computes all that does not depend on the state entering the sequence (the weights
inside each chunk, each chunk's own state), ``read_chunks`` scans the chunks' states from a given one and reads
them; ``read_chunks_with_den`` reads them from zero with their normalisers, what ``power.continued`` adds an
incoming state's part to where the kernel does not apply.

Differentiable through autograd. This is also the reference the Triton kernel
(``longctx.mechanisms.power.chunk_triton``) is tested against.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention import check_qkv
from ...rope import apply_rope
from .expand import check_deg, expanded_dim, sympow
from .naive import check_gate, compute_dtype, default_scale, group_queries, safe_ratio


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def check_rope_base(base, name: str = "rope_base") -> float:
    """A rotary base: a finite number > 1 (as ``GPTConfig.rope_base``); a clear error naming ``name`` otherwise."""
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1 < base < math.inf:
        raise ValueError(f"{name} must be a finite number > 1, got {base!r}")
    return base


def empty_state(batch: int, n_kv: int, d: int, e: int, deg: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Zero state ``(S [B, Hkv, D, e], z [B, Hkv, D])``."""
    D = expanded_dim(d, deg)
    return (torch.zeros(batch, n_kv, D, e, device=device, dtype=dtype),
            torch.zeros(batch, n_kv, D, device=device, dtype=dtype))


def power_retention_chunk(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, deg: int = 2,
                          chunk_size: int = 64, scale: float | None = None,
                          initial_state: tuple[Tensor, Tensor] | None = None, return_state: bool = False):
    """Chunked power retention. ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]``, ``log_g [B,Hkv,T]``.

    ``initial_state = (S [B,Hkv,D,e], z [B,Hkv,D])`` summarises tokens before this call, on the gate level just
    before the first token. Returns ``o [B,Hq,T,e]`` (``q``'s dtype), and with ``return_state`` also the state
    after the last token (arithmetic dtype, on the gate level of the last token). ``T`` need not be a
    multiple of ``chunk_size``.
    """
    chunks = cut_chunks(q, k, v, log_g, deg, chunk_size, scale)
    B, Hkv, _, D, e = chunks.dS.shape
    if initial_state is None:
        S, z = empty_state(B, Hkv, chunks.qc.shape[-1], e, deg, q.device, chunks.dS.dtype)
    else:
        S, z = _check_state(initial_state, B, Hkv, D, e, chunks.dS.dtype)
    o, state = read_chunks(chunks, S, z)
    return (o, state) if return_state else o


class Chunks(NamedTuple):
    """What the chunked form computes before it needs the state entering the sequence (arithmetic dtype;
    ``n`` chunks of ``c`` tokens, the last zero-padded; ``R = Hq / Hkv``, ``D`` the expanded dim)."""
    num: Tensor        # [B, Hkv, R, n, c, e]   numerators inside each chunk
    den: Tensor        # [B, Hkv, R, n, c]      their normalisers
    qc: Tensor         # [B, Hkv, R, n, c, d]   queries
    r: Tensor          # [B, Hkv, 1, n, c]      scale^deg x the decay from each chunk's start to each token
    dS: Tensor         # [B, Hkv, n, D, e]      each chunk's own state, on the level of its last token
    dz: Tensor         # [B, Hkv, n, D]
    gamma: Tensor      # [B, Hkv, n]            decay across each chunk
    log_decay: Tensor  # [B, Hkv]               log-decay across the whole sequence
    deg: int
    T: int
    dtype: torch.dtype  # q's: the output's


def cut_chunks(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, deg: int, chunk_size: int,
               scale: float | None) -> Chunks:
    """The state-independent part of ``power_retention_chunk`` (shapes there): the attention-like weights inside
    each chunk and each chunk's own state."""
    check_qkv(q, k, v)
    log_g = check_gate(log_g, k)
    check_deg(deg)
    check_chunk_size(chunk_size)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same length, got {q.shape[2]} and {k.shape[2]}")
    ct = compute_dtype(q.dtype)
    B, Hq, T, d = q.shape
    Hkv, e = k.shape[1], v.shape[-1]
    scale = default_scale(d, scale)
    c = chunk_size
    n = max(1, -(-T // c))
    pad = n * c - T
    qg = F.pad(group_queries(q.to(ct), Hkv), (0, 0, 0, pad))                    # [B, Hkv, R, Tp, d]
    kp, vp = F.pad(k.to(ct), (0, 0, 0, pad)), F.pad(v.to(ct), (0, 0, 0, pad))
    lg = torch.zeros(B, Hkv, T, dtype=ct, device=q.device) if log_g is None else log_g.to(ct)
    # the gate summed inside each chunk (padded tokens: log_g = 0); every factor below is a difference inside one
    # chunk or a chunk's total, so no running sum over the sequence (which loses the gate's low bits) is needed
    G = F.pad(lg, (0, pad)).view(B, Hkv, n, c).cumsum(-1)
    qc = qg.view(B, Hkv, Hq // Hkv, n, c, d)
    kc, vc = kp.view(B, Hkv, n, c, d), vp.view(B, Hkv, n, c, e)

    # inside each chunk: attention-like weights
    x = scale * torch.einsum("bhrncd,bhnsd->bhrncs", qc, kc)
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf")))
    w = x.pow(deg) * decay.unsqueeze(2)
    num = torch.einsum("bhrncs,bhnse->bhrnce", w, vc)
    den = w.sum(-1)

    # each chunk's own state
    G_end = G[..., -1]                                                            # [B, Hkv, n]: whole chunk
    phik = sympow(kc, deg) * torch.exp(G_end[..., None] - G)[..., None]          # [B, Hkv, n, c, D]
    dS = torch.einsum("bhncD,bhnce->bhnDe", phik, vc)
    dz = phik.sum(-2)
    gamma = torch.exp(G_end)
    # queries read the state through r (deg-homogeneity of phi carries the scale and the gate)
    r = (scale ** deg) * torch.exp(G).unsqueeze(2)                               # [B, Hkv, 1, n, c]
    return Chunks(num, den, qc, r, dS, dz, gamma, G_end.sum(-1), deg, T, q.dtype)


def read_chunks(chunks: Chunks, S: Tensor, z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``o [B, Hq, T, e]`` from the state ``(S [B,Hkv,D,e], z [B,Hkv,D])`` entering the sequence, and the
    state after its last token."""
    o, _, state = _read_rows(chunks, S, z)
    return o.to(chunks.dtype), state


def read_chunks_with_den(chunks: Chunks) -> tuple[Tensor, Tensor]:
    """From a zero state: ``(o [B, Hq, T, e], den [B, Hq, T])`` in the arithmetic dtype, ``den`` the sum of each
    row's weights and ``o = num / den`` (0 where ``den = 0``): ``power_retention_triton(return_den=True)``'s
    outputs, from the chunked form."""
    B, Hkv, _, D, e = chunks.dS.shape
    o, den, _ = _read_rows(chunks, *empty_state(B, Hkv, chunks.qc.shape[-1], e, chunks.deg, chunks.dS.device,
                                                chunks.dS.dtype))
    return o, den


def _read_rows(chunks: Chunks, S: Tensor, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """``(o [B, Hq, T, e], den [B, Hq, T])`` in the arithmetic dtype from the state entering the sequence, and the
    state after its last token."""
    S_in, z_in = [], []
    for m in range(chunks.gamma.shape[-1]):
        S_in.append(S)
        z_in.append(z)
        S = chunks.gamma[..., m, None, None] * S + chunks.dS[:, :, m]
        z = chunks.gamma[..., m, None] * z + chunks.dz[:, :, m]
    S_in, z_in = torch.stack(S_in, 2), torch.stack(z_in, 2)                      # [B, Hkv, n, D, (e)]
    phiq = sympow(chunks.qc, chunks.deg)                                          # [B, Hkv, R, n, c, D]
    num = chunks.num + chunks.r[..., None] * torch.einsum("bhrncD,bhnDe->bhrnce", phiq, S_in)
    den = chunks.den + chunks.r * torch.einsum("bhrncD,bhnD->bhrnc", phiq, z_in)
    B, Hkv, R, n, c, e = num.shape
    o = safe_ratio(num, den).reshape(B, Hkv * R, n * c, e)[:, :, :chunks.T]
    return o, den.reshape(B, Hkv * R, n * c)[:, :, :chunks.T], (S, z)


def _check_state(state, B: int, Hkv: int, D: int, e: int, ct: torch.dtype) -> tuple[Tensor, Tensor]:
    S, z = state
    if tuple(S.shape) != (B, Hkv, D, e) or tuple(z.shape) != (B, Hkv, D):
        raise ValueError(f"initial_state must be (S {(B, Hkv, D, e)}, z {(B, Hkv, D)}), "
                         f"got {tuple(S.shape)}, {tuple(z.shape)}")
    return S.to(ct), z.to(ct)


def power_retention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, deg: int = 2,
                    chunk_size: int = 64, scale: float | None = None, rotary_base: float | None = None,
                    positions: Tensor | None = None, use_kernel: bool | None = None) -> Tensor:
    """Power retention, parallel training / prefill form: ``o [B, Hq, T, e]``. Forward and backward.

    ``q [B,Hq,T,d]``, ``k [B,Hkv,T,d]``, ``v [B,Hkv,T,e]``, ``log_g [B,Hkv,T]`` (optional gate, ``<= 0``),
    ``deg`` 1 or even, ``scale`` default ``d ** -0.5``. ``rotary_base``: apply rotary embeddings to ``q`` and
    ``k`` first, at ``positions [T]`` (default ``0 .. T-1``). ``use_kernel``: the Triton kernel (CUDA, deg 2,
    fp16/bf16, ``d`` and ``e`` in 16, 32, 64, 128, ``chunk_size`` 16, 32 or a multiple of 64); ``None``
    uses it wherever it applies.
    """
    check_qkv(q, k, v)
    check_deg(deg)
    check_chunk_size(chunk_size)
    if rotary_base is not None:
        check_rope_base(rotary_base, "rotary_base")
        pos = torch.arange(q.shape[2], device=q.device) if positions is None else positions
        if not isinstance(pos, Tensor) or tuple(pos.shape) != (q.shape[2],):
            raise ValueError(f"positions must be a tensor [seq] = [{q.shape[2]}], got "
                             f"{tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__}")
        q, k = apply_rope(q, pos, rotary_base), apply_rope(k, pos, rotary_base)
    if takes_kernel(q, k, v, deg, chunk_size, use_kernel):
        from .chunk_triton import power_retention_triton
        return power_retention_triton(q, k, v, log_g, chunk_size=chunk_size, scale=scale)
    return power_retention_chunk(q, k, v, log_g, deg, chunk_size, scale)


def takes_kernel(q: Tensor, k: Tensor, v: Tensor, deg: int, chunk_size: int, use_kernel: bool | None) -> bool:
    """Whether ``power_retention`` runs these inputs through the Triton kernel: ``use_kernel=True`` (an error
    where the kernel does not apply), or ``None`` and the kernel applies on CUDA."""
    from .chunk_triton import GRID_MAX, kernel_applies
    return kernel_choice(use_kernel, kernel_applies(q, k, v, deg, chunk_size), q, lambda: (
        "the Triton kernel needs triton, CUDA (or TRITON_INTERPRET=1), deg=2, fp16/bf16 q/k/v, head dims d, e in "
        f"(16, 32, 64, 128), chunk_size 16, 32 or a multiple of 64, and at most {GRID_MAX} chunks and {GRID_MAX} "
        f"batch x heads; got deg={deg}, {q.dtype} on {q.device}, chunk_size={chunk_size}, shape {tuple(q.shape)}"))


def kernel_choice(use_kernel: bool | None, fits: bool, q: Tensor, needs) -> bool:
    """The ``use_kernel`` policy of every Triton path: ``True`` requires the kernel (``ValueError``
    "use_kernel=True: " + ``needs()`` where it does not fit), ``None`` takes it wherever it fits on CUDA,
    ``False`` never."""
    if use_kernel and not fits:
        raise ValueError(f"use_kernel=True: {needs()}")
    return bool(use_kernel) or (use_kernel is None and fits and q.is_cuda)
