"""Power retention, quadratic definition (the tests' oracle; float64-friendly).

For query ``i`` and the keys ``j <= i`` before it::

    w_ij  = g_ij * (scale * q_i . k_j)^p,      g_ij = exp(G_i - G_j),   G_t = sum_{u <= t} log_g_u
    out_i = sum_j w_ij v_j / sum_j w_ij

``log_g <= 0`` is an optional per-token, per-KV-head gate (``None``: ``g_ij = 1``). Layout as everywhere in
longctx: ``q [B, Hq, T, d]``, ``k [B, Hkv, T, d]``, ``v [B, Hkv, T, e]``, ``log_g [B, Hkv, T]``; query head ``h``
reads KV head ``h // (Hq // Hkv)``. A row whose weights are all zero (only possible with ``q = 0`` or,
for ``deg = 1``, cancelling signs) outputs zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...attention import check_qkv, check_scale
from .expand import check_deg


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype: float64 stays, everything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


REFUSED_ON = ("cpu",)   # devices whose gates are checked on the host; elsewhere they are poisoned (check_gate)
LOG_G_FLOOR = -80.0     # a log gate below it counts as it (check_gate)


def check_gate(log_g: Tensor | None, k: Tensor, poison: bool = True) -> Tensor | None:
    """The gate to compute with: ``log_g [B, Hkv, T]`` on k's device, every value finite and ``<= 0`` (the log of
    a forget gate in ``(0, 1]``; a positive gate grows the state without bound and ``-inf`` turns the gate
    differences into NaN). A wrong shape or device raises. Values: on CPU a gate that breaks the rule is refused
    (ValueError). On CUDA reading a check's result would synchronise with the host on every call, so the gate is
    *poisoned* instead (:func:`poison_gate`): each bad value becomes NaN, and so do the outputs it reaches (its
    token's and every later token's of that head), never a finite number; ``poison=False`` leaves that to the
    caller (the Triton kernel poisons inside its forward, outside autograd). The models make their gates with
    ``logsigmoid`` (finite, ``<= 0``): the poisoning then changes nothing.

    A value below ``LOG_G_FLOOR`` (-80) counts as -80 (a hard reset: the gate factor e^-80 ~ 1.8e-35 forgets the
    state as fully as e^-1e6 does), so that the gate's running sums keep float32's precision after it: at -1e6
    float32 values are 0.06 apart, and every later gate factor of such a sum was off by up to 6%. ``poison=False``
    leaves the floor to the caller too."""
    if log_g is None:
        return None
    if not isinstance(log_g, Tensor) or not log_g.dtype.is_floating_point:
        raise TypeError(f"log_g must be a floating-point tensor [batch, kv_heads, seq] (or None), got "
                        f"{log_g.dtype if isinstance(log_g, Tensor) else type(log_g).__name__}")
    B, Hkv, T = k.shape[:3]
    if tuple(log_g.shape) != (B, Hkv, T):
        raise ValueError(f"log_g must be [batch, kv_heads, seq] = {(B, Hkv, T)}, got {tuple(log_g.shape)}")
    if log_g.device != k.device:
        raise ValueError(f"log_g is on {log_g.device}, k on {k.device}")
    if log_g.device.type not in REFUSED_ON:
        return poison_gate(log_g) if poison else log_g
    if log_g.numel():
        bad = ~(torch.isfinite(log_g) & (log_g <= 0))
        if bool(bad.any()):
            raise ValueError(f"log_g must be finite and <= 0 (the log of a forget gate in (0, 1]); {int(bad.sum())} "
                             f"of {log_g.numel()} values are not, e.g. {log_g[bad].flatten()[0].item()}")
    return log_g.clamp_min(LOG_G_FLOOR) if poison else log_g


def poison_gate(log_g: Tensor) -> Tensor:
    """``log_g`` with every value that is not finite and ``<= 0`` replaced by NaN, and floored at ``LOG_G_FLOOR``;
    elementwise, no host sync."""
    return torch.where((log_g <= 0) & (log_g > float("-inf")), log_g.clamp_min(LOG_G_FLOOR), float("nan"))


def default_scale(d: int, scale: float | None) -> float:
    """``scale`` as a float, ``d ** -0.5`` where None; a ValueError unless finite and positive (a scale of 0 makes every
    weight 0 and every output 0; a negative one flips the sign of even powers' bases, which they then hide)."""
    return check_scale(scale, d)


def group_queries(q: Tensor, n_kv: int) -> Tensor:
    """``[B, Hq, T, d] -> [B, Hkv, Hq/Hkv, T, d]``: the query heads that share each KV head."""
    B, Hq, T, d = q.shape
    return q.reshape(B, n_kv, Hq // n_kv, T, d)


def power_weights(q: Tensor, k: Tensor, gq: Tensor | None, gk: Tensor | None, deg: int, scale: float) -> Tensor:
    """Causal weights ``w [B, Hkv, R, Tq, Tk]`` for grouped queries ``q [B, Hkv, R, Tq, d]``, ``k [B, Hkv, Tk, d]``.

    Bottom-right aligned: query ``i`` sits at key position ``Tk - Tq + i``. ``gq [B, Hkv, Tq]``, ``gk [B, Hkv, Tk]``
    are cumulative log-gates on one reference (``None`` for no gate). Masked entries are exactly 0.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    x = scale * (q @ k.unsqueeze(2).transpose(-1, -2))                            # [B, Hkv, R, Tq, Tk]
    visible = torch.arange(tq, device=q.device)[:, None] + (tk - tq) >= torch.arange(tk, device=q.device)[None]
    w = x.pow(deg)
    if gq is None:
        return w.masked_fill(~visible, 0.0)
    diff = (gq[..., :, None] - gk[..., None, :]).unsqueeze(2)                    # [B, Hkv, 1, Tq, Tk]
    return w * torch.exp(diff.masked_fill(~visible, float("-inf")))             # masked before exp: no overflow


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num [..., e] / den [...]`` with rows whose weights sum to exactly zero set to zero."""
    return num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)


def power_retention_naive(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None, deg: int = 2,
                          scale: float | None = None) -> Tensor:
    """Quadratic power retention: ``o [B, Hq, T, e]`` in ``q``'s dtype (arithmetic in float32 or float64).

    ``scale`` defaults to ``d ** -0.5``.
    """
    check_qkv(q, k, v)
    log_g = check_gate(log_g, k)
    check_deg(deg)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same length, got {q.shape[2]} and {k.shape[2]}")
    ct = compute_dtype(q.dtype)
    B, Hq, T, _ = q.shape
    qg = group_queries(q.to(ct), k.shape[1])
    G = None if log_g is None else torch.cumsum(log_g.to(ct), -1)
    w = power_weights(qg, k.to(ct), G, G, deg, default_scale(q.shape[-1], scale))
    out = safe_ratio(w @ v.to(ct).unsqueeze(2), w.sum(-1))
    return out.reshape(B, Hq, T, v.shape[-1]).to(q.dtype)   # -1 is ambiguous for 0 elements (B or T of 0)
