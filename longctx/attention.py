"""Exact softmax attention, and the merge of partial results that blockwise and ring attention build on.

Layout everywhere in longctx: ``[batch, heads, seq, head_dim]``. Keys and values may carry fewer heads
than queries (grouped-query attention): ``n_head % n_kv_head == 0`` and query head ``h`` reads KV head
``h // (n_head // n_kv_head)``.

Causal masks are aligned bottom-right: with ``Tq`` queries and ``Tk >= Tq`` keys, query ``i`` sits at
position ``Tk - Tq + i`` and sees keys ``0 .. Tk - Tq + i``. With ``Tq == Tk`` this is the usual mask; with
``Tq < Tk`` it is what decoding with a cache needs.

Edges, the same in every function here:

- Empty inputs give empty results (``B``, heads, ``Tq`` or ``Dv`` of 0). A query with no key to see (``Tk == 0``,
  or a row above a causal mask with ``Tq > Tk`` in ``attention_reference``) gives ``out = 0`` and
  ``lse = -inf``: the softmax over no keys is undefined, but this is the partial result of an empty key set,
  which ``merge_attention`` adds exactly (it takes the other side unchanged).
- NaN and inf follow float arithmetic on the definition, so nothing non-finite comes back as a finite
  number: a row whose scores include NaN or ``+inf`` (NaN or inf in its query, NaN in a key it sees, an inf
  in a key meeting a query entry of its sign) gives NaN in ``out`` and NaN or ``+inf`` as its ``lse``; a
  score of ``-inf`` is a key of weight 0, and a row whose every score is ``-inf`` gives NaN (0/0) with lse
  ``-inf``. NaN or inf in a value reaches ``out`` in the rows that see it, and may reach rows a causal mask
  hides it from (kernels and the matrix form alike multiply it by a weight of 0, which IEEE makes NaN).
  No value is checked on CUDA (that would synchronise with the host; whether CUDA's fused kernels keep this
  contract is what ``tests/test_attention_edges.py``'s CUDA cases check, not yet run on a GPU). On CPU small
  checks steer round the places where the flash kernel differs: rows whose every score is NaN or ``-inf``
  (non-finite inputs, or finite ones whose scores overflow: ``_cpu_kernel_exact``), and float16/bfloat16
  inputs with an infinite key, whose ``±inf`` scores those kernels lose, run in float32
  (``_cpu_half_loses_inf``).
- ``scale`` must be finite and positive (ValueError).
"""
from __future__ import annotations

import math
import numbers
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

#: SDPA backends on CUDA when the queries are fewer than the keys (decoding; a chunk after a cache). cuDNN is
#: left out: it builds an execution plan for every new key length, 47-68 ms each on an H100 against
#: 0.07-0.25 ms for a one-query flash call at 16K-1M keys (bf16; benchmarks/decode_attention.py).
GROWING_KEYS_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """Validate ``q [B,Hq,Tq,D]``, ``k [B,Hkv,Tk,D]``, ``v [B,Hkv,Tk,Dv]``; return ``(Hq, Hkv)``.

    Sizes of 0 are valid except ``Hkv`` (query heads are shared out over key/value heads) and ``D`` (no
    scores, and no default scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in heads and seq")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q head_dim {q.shape[3]} != k head_dim {k.shape[3]}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim of q and k must be at least 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0:
        raise ValueError(f"k and v need at least one head, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    return hq, hkv


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a float, ``head_dim ** -0.5`` where None; a ValueError unless finite and positive."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or isinstance(scale, Tensor)
                                       and scale.numel() == 1 and not scale.is_complex()):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and positive, got {value}")
    return value


def check_causal(causal) -> None:
    """``causal`` is True or False (a string such as ``"false"`` would be truthy: a mask nobody asked for)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")


def _empty(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the result has no elements or no keys: PyTorch's fused kernels crash on some of these (the CPU
    flash kernel with the lse dies of SIGFPE), and the matrix form gives them exactly, at no cost."""
    return 0 in (q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3])


def _cpu_kernel_exact(q: Tensor, scale: float, *keys: Tensor) -> bool:
    """Whether PyTorch's CPU flash kernel gives the definition's result, NaN included. It takes a row whose
    every score is NaN or -inf for a row with no key (out 0, lse 0), where the definition gives NaN; that
    cannot happen when the queries are finite and so are ``keys``, which every row sees, and their scores
    cannot overflow to -inf: ``max|q| · max|k| · D · scale`` stays below the largest float of the kernel's
    accumulation (float32; float64 for float64). (Host checks: on CPU only.)"""
    if q.device.type != "cpu":
        return True
    q, keys = q.detach(), [t.detach() for t in keys]
    if not all(bool(torch.isfinite(t).all()) for t in (q, *keys)):
        return False
    if q.numel() == 0 or not any(t.numel() for t in keys):
        return True
    largest = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).max
    bound = float(q.abs().max()) * max(float(t.abs().max()) for t in keys if t.numel()) * q.shape[-1] * scale
    return bound < largest


def _cpu_half_loses_inf(q: Tensor, k: Tensor) -> bool:
    """Whether these are float16/bfloat16 inputs on CPU with an infinite key: PyTorch's CPU kernels at those
    dtypes turn the ``±inf`` scores it makes into finite ones (torch 2.13, 64 tokens of head dim 64: every row
    finite where float32 gives the definition's NaN), so the caller reruns in float32. A pass over ``k`` (CPU
    only, where it costs no sync)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16) and k.numel() > 0
            and not bool(torch.isfinite(k).all()))


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]``: each KV head serves ``n_rep`` query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_mask(tq: int, tk: int, device=None) -> Tensor:
    """Boolean ``[tq, tk]`` mask, True where query ``i`` (at position ``tk - tq + i``) may see key ``j``."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return j <= i


def attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                        scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Plain matrix form, differentiable in both outputs: returns ``(out [B,Hq,Tq,Dv], lse [B,Hq,Tq])``.

    The test oracle (run it in float64) and the fallback where no fused kernel fits. Rows with no visible
    key (``Tk == 0``, or ``causal`` and ``Tq > Tk``) give ``out = 0`` and ``lse = -inf``; NaN and inf follow
    the definition (module docstring): a NaN query gives a NaN row, not zeros.
    """
    check_qkv(q, k, v)
    check_causal(causal)
    scale = check_scale(scale, q.shape[-1])
    return _matrix_form(q, k, v, causal_mask(q.shape[2], k.shape[2], q.device) if causal else None, scale)


def _matrix_form(q: Tensor, k: Tensor, v: Tensor, sees: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """``attention_reference`` with the keys each query sees given as a boolean ``[Tq, Tk]`` (None: all)."""
    hq, hkv = q.shape[1], k.shape[1]
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):  # scores and softmax in float32, as fused kernels do
        q, k, v = q.float(), k.float(), v.float()
    k, v = repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv)
    s = (q @ k.transpose(-1, -2)) * scale
    if sees is not None:
        s = s.masked_fill(~sees, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # A row that sees no key is shifted by 0, not by its lse of -inf, so its weights are exp(-inf) = 0 rather
    # than NaN; any other row keeps the NaN its values give. (With Tk = 0 there are no weights at all.)
    shift = lse if sees is None else torch.where(sees.any(-1), lse, 0.0)
    p = torch.exp(s - shift.unsqueeze(-1))
    return (p @ v).to(out_dtype), lse


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
         scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` with grouped-query heads, and on CUDA without cuDNN when
    ``Tq != Tk`` (see ``GROWING_KEYS_BACKENDS``). Shapes as in ``attention``; masks as SDPA takes them
    (``is_causal`` aligned top-left, unlike ``attention``). Edges as in the module docstring, but for one:
    with an ``attn_mask``, as in SDPA, a row whose every score is masked or ``-inf`` gives 0."""
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if _empty(q, k, v):  # no rows, or no keys: zeros whatever the mask
        return attention_reference(q, k, v, scale=scale)[0]
    if _cpu_half_loses_inf(q, k):
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
        return sdpa(q.float(), k.float(), v.float(), mask, is_causal, scale).to(q.dtype)
    # Without a mask every row sees key 0 (top-left causal too). With a mask the CPU kernel adds it to the
    # scores and keeps NaN (tests/test_attention_edges.py checks that).
    if attn_mask is None and not _cpu_kernel_exact(q, scale, k[:, :, :1]):
        sees = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril() if is_causal else None
        return _matrix_form(q, k, v, sees, scale)[0]
    return _sdpa(q, k, v, attn_mask, is_causal, scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    growing = q.device.type == "cuda" and q.shape[2] != k.shape[2]
    with sdpa_kernel(GROWING_KEYS_BACKENDS) if growing else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


def _fused_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor] | None:
    """PyTorch's fused kernels that also return the log-sum-exp; None where none applies."""
    if q.device.type == "cpu":
        if q.shape[-1] != v.shape[-1]:  # the CPU kernel needs Dv == D
            return None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    half = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1]
    square = q.shape[2] == k.shape[2]   # key lengths that change call after call cost cuDNN a plan each
    if q.device.type == "cuda" and half and square and q.shape[-1] <= 128:
        try:  # cuDNN's kernel is the fastest on Hopper where it applies
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
            return out, lse.reshape(q.shape[:3])
        except RuntimeError:  # no cuDNN, or a shape it rejects: flash below
            pass
    if q.device.type == "cuda" and half and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]
    if q.device.type == "cuda" and q.dtype != torch.float64:  # no fused CUDA kernel takes float64
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                         scale=scale)[:2]
        return out, lse[..., : q.shape[2]]
    return None


def _causal_prefill(q: Tensor, k: Tensor, v: Tensor, scale: float, n_rep: int) -> tuple[Tensor, Tensor] | None:
    """Bottom-right causal attention for ``Tq < Tk`` (a chunk of new tokens after a cache) without a
    ``Tq x Tk`` mask: the older keys unmasked and the last ``Tq`` keys with the square causal mask, each
    through a fused kernel, merged by their log-sum-exps. None where no fused kernel applies."""
    split = k.shape[2] - q.shape[2]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    older = _fused_with_lse(q, k[:, :, :split], v[:, :, :split], False, scale)
    recent = _fused_with_lse(q, k[:, :, split:], v[:, :, split:], True, scale)
    if older is None or recent is None:
        return None
    out, lse = merge_attention(*older, *recent)
    return out.to(q.dtype), lse


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
              return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention. ``q [B,Hq,Tq,D]``, ``k [B,Hkv,Tk,D]``, ``v [B,Hkv,Tk,Dv]`` -> ``[B,Hq,Tq,Dv]``.

    With ``return_lse`` also returns the float32 (float64 for float64 input) log-sum-exp ``[B,Hq,Tq]`` of
    each row of scaled scores. Dispatches to PyTorch's fused kernels (SDPA; the flash ops that return the
    lse on CPU and CUDA). Gradients flow through ``out``; when gradients are being recorded and the lse is
    asked for, the differentiable matrix form is used so the lse carries its gradient too.

    ``scale`` (default ``D ** -0.5``) must be finite and positive. ``causal`` needs ``Tq <= Tk``. Empty
    inputs give empty results; with no keys (``Tk == 0``, not causal) each query gives ``out = 0`` and
    ``lse = -inf``, the partial result of an empty key set that ``merge_attention`` adds exactly. NaN and
    inf follow the definition (module docstring): a NaN anywhere in a row's scores gives a NaN row.
    """
    hq, hkv = check_qkv(q, k, v)
    check_causal(causal)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={q.shape[2]} "
                         f"> Tk={k.shape[2]}")
    scale = check_scale(scale, q.shape[-1])
    causal = causal and q.shape[2] > 1  # one query (decoding) sees every key: no mask needed
    # Every row sees key 0, and the first row of a bottom-right causal mask sees key Tk - Tq first.
    first = k.shape[2] - q.shape[2] if causal else 0
    if _cpu_half_loses_inf(q, k):
        got = attention(q.float(), k.float(), v.float(), causal, scale, return_lse)
        return (got[0].to(q.dtype), got[1]) if return_lse else got.to(q.dtype)
    if _empty(q, k, v) or not _cpu_kernel_exact(q, scale, k[:, :, :1], k[:, :, first:first + 1]):
        out, lse = attention_reference(q, k, v, causal, scale)
        return (out, lse) if return_lse else out
    # Fused kernels align a causal mask top-left; with Tq < Tk we need bottom-right: without gradients the
    # split of _causal_prefill, otherwise (or where no fused kernel applies) an explicit mask.
    square = q.shape[2] == k.shape[2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if causal and not square and not needs_grad:
        split = _causal_prefill(q, k, v, scale, hq // hkv)
        if split is not None:
            return split if return_lse else split[0]
    if not return_lse:
        mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal and not square else None
        return _sdpa(q, k, v, mask, causal and square, scale)
    if needs_grad or (causal and not square):
        return attention_reference(q, k, v, causal, scale)
    fused = _fused_with_lse(q, repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv), causal, scale)
    return fused if fused is not None else attention_reference(q, k, v, causal, scale)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact attention over the union of two disjoint key sets, from each set's partial result.

    ``out_* [B,H,T,D]`` and ``lse_* [B,H,T]``: both outs of one shape, both lses of that shape less its last
    dim (nothing is broadcast), each pair of one floating dtype, all four on one device (ValueError or
    TypeError otherwise). Returns ``(out, lse)`` in float32 (float64 stays float64). A row that saw no key on
    one side (lse = -inf) takes the other side unchanged; NaN on either side gives NaN.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.dim() != 4:
        raise ValueError(f"out_a must be 4-D [batch, heads, seq, head_dim], got shape {tuple(out_a.shape)}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if lse_a.shape != lse_b.shape:
        raise ValueError(f"lse_a and lse_b must have one shape, got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    if lse_a.shape != out_a.shape[:-1]:
        raise ValueError(f"lse must be out's shape without head_dim: out {tuple(out_a.shape)} needs lse "
                         f"{tuple(out_a.shape[:-1])}, got {tuple(lse_a.shape)}")
    if out_a.dtype != out_b.dtype or lse_a.dtype != lse_b.dtype:
        raise TypeError(f"the two sides must share dtypes, got out {out_a.dtype} and {out_b.dtype}, "
                        f"lse {lse_a.dtype} and {lse_b.dtype}")
    if not (out_a.dtype.is_floating_point and lse_a.dtype.is_floating_point):
        raise TypeError(f"out and lse must be floating point, got {out_a.dtype} and {lse_a.dtype}")
    if not (out_a.device == lse_a.device == out_b.device == lse_b.device):
        raise ValueError(f"out_a, lse_a, out_b, lse_b must be on one device, got {out_a.device}, {lse_a.device}, "
                         f"{out_b.device}, {lse_b.device}")
    dt = torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(dt), lse_b.to(dt)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a.to(dt) + w_b * out_b.to(dt), lse


def attention_flops(batch: int, n_head: int, tq: int, tk: int, head_dim: int, causal: bool) -> float:
    """Forward matmul flops of exact attention (2 products of 2*Tq*Tk*D each), halved when causal+square."""
    f = 4.0 * batch * n_head * tq * tk * head_dim
    return f / 2 if causal and tq == tk else f


__all__ = ["attention", "attention_reference", "merge_attention", "repeat_kv", "causal_mask", "check_qkv",
           "check_scale", "attention_flops"]
