"""Decoding form of power retention: a fixed-size state plus the most recent tokens kept as plain K/V.

``PowerState`` holds ``S [B, Hkv, D, e]`` and ``z [B, Hkv, D]`` (``None`` until the first fold), the recent
keys/values ``k [B, Hkv, R, d]``, ``v [B, Hkv, R, e]`` not folded yet, their cumulative log-gates ``g [B, Hkv, R]``
(gated states only) on the level of the state, and ``seen``, the tokens consumed.

Folding schedule (depends on ``seen`` alone, so the state size is a function of the context length):
recent tokens accumulate until there are ``switch_over``; then the oldest ``chunk_size`` are folded into
``S, z``, leaving ``switch_over - chunk_size``. So a context shorter than ``switch_over`` costs exactly its
K/V, like attention, and a longer one costs ``S, z`` plus between ``switch_over - chunk_size`` and
``switch_over - 1`` recent tokens, whatever its length. ``S, z, g`` are float32 (float64 for float64
states) whatever the K/V dtype: sums over millions of tokens stay in range and keep their precision.

A step of ``T_new`` tokens is processed in pieces that end at fold points; each piece's queries read the
state and attend (with the power weights) to the recent tokens and the piece itself. A step longer than
``switch_over`` (a prefill) runs the chunked form instead and leaves the same recent tokens unfolded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...attention import check_qkv
from ..base import check_dtype, check_int
from .chunk import check_chunk_size, kernel_choice
from .expand import check_deg, expanded_dim, sympow
from .naive import check_gate, compute_dtype, default_scale, group_queries, power_weights, safe_ratio


@dataclass
class PowerState:
    k: Tensor
    v: Tensor
    g: Tensor | None = None
    S: Tensor | None = None
    z: Tensor | None = None
    seen: int = 0


def check_schedule(chunk_size: int, switch_over: int) -> None:
    check_chunk_size(chunk_size)
    if (isinstance(switch_over, bool) or not isinstance(switch_over, int) or switch_over < chunk_size
            or switch_over % chunk_size):
        raise ValueError(f"switch_over must be a multiple of chunk_size ({chunk_size}) and at least it, "
                         f"got {switch_over!r}")


def recent_count(context_len: int, chunk_size: int, switch_over: int) -> int:
    """Tokens kept unfolded after ``context_len`` tokens."""
    if context_len < switch_over:
        return context_len
    return switch_over - chunk_size + (context_len - switch_over) % chunk_size


def init_power_state(batch: int, n_kv: int, d: int, e: int, gated: bool, device="cpu",
                     dtype=torch.float32) -> PowerState:
    """Empty state: no recent tokens, no ``S, z`` yet."""
    _check_sizes(batch=batch, n_kv=n_kv, d=d, e=e)
    k = torch.empty(batch, n_kv, 0, d, device=device, dtype=dtype)
    v = torch.empty(batch, n_kv, 0, e, device=device, dtype=dtype)
    g = torch.empty(batch, n_kv, 0, device=device, dtype=compute_dtype(dtype)) if gated else None
    return PowerState(k, v, g)


def _check_sizes(**sizes) -> None:
    """Each of ``sizes`` an int >= 1 (``context_len``: >= 0), named in the error otherwise."""
    for name, value in sizes.items():
        check_int(name, value, 0 if name == "context_len" else 1)


def power_state_bytes(context_len: int, batch: int, n_kv: int, d: int, e: int, deg: int, gated: bool,
                      chunk_size: int, switch_over: int, dtype=torch.bfloat16) -> int:
    """Bytes held by ``PowerState`` after ``context_len`` tokens (K/V in ``dtype``; S, z, g in its
    arithmetic dtype)."""
    _check_sizes(context_len=context_len, batch=batch, n_kv=n_kv, d=d, e=e)
    check_deg(deg)
    check_schedule(chunk_size, switch_over)
    check_dtype(dtype)
    kv_bytes = torch.empty((), dtype=dtype).element_size()
    st_bytes = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    r = recent_count(context_len, chunk_size, switch_over)
    total = batch * n_kv * r * ((d + e) * kv_bytes + (st_bytes if gated else 0))
    if context_len >= switch_over:
        D = expanded_dim(d, deg)
        total += batch * n_kv * D * (e + 1) * st_bytes
    return total


def check_power_state(state: PowerState, q: Tensor, k: Tensor, v: Tensor, deg: int, chunk_size: int,
                      switch_over: int) -> None:
    """A clear error where ``state`` does not continue ``q [B, Hq, T, d]``, ``k [B, Hkv, T, d]``, ``v [B, Hkv, T, e]``:
    not a ``PowerState``, another batch, KV heads, head dims, dtype or device, an ``S`` of another degree, or a
    number of unfolded tokens that this ``chunk_size`` / ``switch_over`` would not leave after ``state.seen``.
    (Shapes only: no host sync.)"""
    if not isinstance(state, PowerState):
        raise TypeError(f"state must be a PowerState (init_power_state), got {type(state).__name__}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k and v must hold the same tokens, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    (B, Hkv, _, d), e = k.shape, v.shape[-1]
    r = recent_count(state.seen, chunk_size, switch_over)
    D = expanded_dim(d, deg)
    want = {"k": (state.k, (B, Hkv, r, d)), "v": (state.v, (B, Hkv, r, e)),
            "g": (state.g, None if state.g is None else (B, Hkv, r)),
            "S": (state.S, None if state.S is None else (B, Hkv, D, e)),
            "z": (state.z, None if state.z is None else (B, Hkv, D))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"the state's {name} is {tuple(t.shape)}, expected {shape} for these tokens (batch {B}, "
                             f"{Hkv} KV heads, d={d}, e={e}, deg={deg}, {r} unfolded tokens after {state.seen} with "
                             f"chunk_size={chunk_size}, switch_over={switch_over}): a state made for other inputs or "
                             "another configuration")
    if (state.S is None) != (state.seen < switch_over):
        raise ValueError(f"the state {'has no' if state.S is None else 'has an'} S after {state.seen} tokens, where "
                         f"switch_over={switch_over} {'folds' if state.S is None else 'does not fold'}: a state made "
                         "with another chunk_size / switch_over")
    if state.k.dtype != k.dtype or state.k.device != k.device:
        raise ValueError(f"the state's k is {state.k.dtype} on {state.k.device}; the tokens are {k.dtype} on {k.device}")


def _fold(state: PowerState, n: int, deg: int) -> PowerState:
    """Fold the oldest ``n`` recent tokens into ``S, z``; the state's gate level moves to the last of them."""
    B, Hkv, _, d = state.k.shape
    if state.S is None:
        ct = compute_dtype(state.k.dtype)
        S = torch.zeros(B, Hkv, expanded_dim(d, deg), state.v.shape[-1], device=state.k.device, dtype=ct)
        z = torch.zeros(B, Hkv, S.shape[2], device=state.k.device, dtype=ct)
    else:
        S, z = state.S.clone(), state.z.clone()                  # the input state is not modified
    g = None if state.g is None else state.g[:, :, :n]
    level = _fold_into(state.k[:, :, :n], state.v[:, :, :n], g, S, z, deg)
    g = None if state.g is None else state.g[:, :, n:] - level
    return PowerState(state.k[:, :, n:], state.v[:, :, n:], g, S, z, state.seen)


def _fold_into(k: Tensor, v: Tensor, g: Tensor | None, S: Tensor, z: Tensor, deg: int) -> Tensor | None:
    """Fold ``k [b, Hkv, n, d]``, ``v [b, Hkv, n, e]`` with their cumulative log-gates ``g [b, Hkv, n]`` (None:
    ungated) into ``S [b, Hkv, D, e]``, ``z [b, Hkv, D]`` in place (``S`` contiguous). Returns the state's new gate
    level ``[b, Hkv, 1]``, the last folded token's (None ungated): the gates of the tokens left are rebased on it."""
    ct = S.dtype
    phik = sympow(k.to(ct), deg)                                                    # [b, Hkv, n, D]
    level = None
    if g is not None:
        level = g[:, :, -1:]
        phik = phik * torch.exp(level - g)[..., None]
        S.mul_(torch.exp(level)[..., None])
        z.mul_(torch.exp(level))
    b, Hkv, D, e = S.shape
    n = k.shape[2]
    S.view(b * Hkv, D, e).baddbmm_(phik.transpose(-1, -2).reshape(b * Hkv, D, n), v.to(ct).reshape(b * Hkv, n, e))
    z.add_(phik.sum(-2))
    return level


def _read_folded(num: Tensor, den: Tensor, qg: Tensor, gq: Tensor | None, S: Tensor, z: Tensor, deg: int,
                 scale: float) -> tuple[Tensor, Tensor]:
    """``num [B, Hkv, G, T, e]``, ``den [B, Hkv, G, T]`` plus the folded state's part ``phi(q) . S``,
    ``phi(q) . z`` for grouped queries ``qg [B, Hkv, G, T, d]`` with log-gates ``gq [B, Hkv, T]`` on the state's
    level (None: ungated)."""
    phiq = sympow(qg, deg) * scale ** deg
    if gq is not None:
        phiq = phiq * torch.exp(gq)[:, :, None, :, None]
    return num + phiq @ S.unsqueeze(2), den + (phiq @ z[:, :, None, :, None]).squeeze(-1)


def takes_decode_kernel(q: Tensor, k: Tensor, v: Tensor, deg: int, use_kernel: bool | None) -> bool:
    """Whether a one-token piece runs through the Triton decode kernel: ``use_kernel=True`` (an error where it
    does not apply), or ``None`` and it applies on CUDA."""
    from .decode_triton import decode_kernel_applies
    return kernel_choice(use_kernel, decode_kernel_applies(q, k, v, deg), q, lambda: (
        "the decode kernel needs triton, CUDA (or TRITON_INTERPRET=1), deg=2, one new token, fp16/bf16/fp32 inputs "
        f"and head dims d, e in (16, 32, 64, 128); got deg={deg}, {q.dtype} on {q.device}, q {tuple(q.shape)}, "
        f"v {tuple(v.shape)}"))


def _piece(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, state: PowerState, deg: int,
           scale: float, use_kernel: bool | None = False) -> tuple[Tensor, PowerState]:
    """Outputs of ``T_p`` new tokens that need no fold among them, and the state with them appended (one token
    through the Triton decode kernel where ``takes_decode_kernel``)."""
    ct = compute_dtype(q.dtype)
    B, Hq, Tp, _ = q.shape
    Hkv = k.shape[1]
    keys, vals = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
    g = None
    if state.g is not None:
        last = state.g[:, :, -1:] if state.g.shape[2] else state.g.new_zeros(B, Hkv, 1)
        g = torch.cat([state.g, last + torch.cumsum(log_g.to(ct), -1)], 2)
    if Tp == 1 and takes_decode_kernel(q, k, v, deg, use_kernel):
        from .decode_triton import power_decode_step_triton
        out = power_decode_step_triton(q, keys, vals, g, state.S, state.z, scale)
        return out, PowerState(keys, vals, g, state.S, state.z, state.seen + 1)
    qg = group_queries(q.to(ct), Hkv)                                             # [B, Hkv, R, Tp, d]
    gq = None if g is None else g[:, :, -Tp:]
    w = power_weights(qg, keys.to(ct), gq, g, deg, scale)                         # [B, Hkv, R, Tp, Tk]
    num = w @ vals.to(ct).unsqueeze(2)
    den = w.sum(-1)
    if state.S is not None:
        num, den = _read_folded(num, den, qg, gq, state.S, state.z, deg, scale)
    out = safe_ratio(num, den).reshape(B, Hq, Tp, v.shape[-1]).to(q.dtype)
    return out, PowerState(keys, vals, g, state.S, state.z, state.seen + Tp)


def power_retention_step(q: Tensor, k: Tensor, v: Tensor, state: PowerState, log_g: Tensor | None = None,
                         deg: int = 2, scale: float | None = None, chunk_size: int = 64,
                         switch_over: int = 128, use_kernel: bool | None = None) -> tuple[Tensor, PowerState]:
    """Consume ``T_new`` tokens (none: an empty output, the same state): ``q [B,Hq,T_new,d]``,
    ``k, v [B,Hkv,T_new,·]``, ``log_g [B,Hkv,T_new]`` (required exactly when the state is gated). Returns ``(o [B,Hq,T_new,e], new state)``; ``state`` is not
    modified. ``use_kernel``: one-token steps through the Triton decode kernel (CUDA, deg 2, head dims 16–128);
    ``None`` uses it wherever it applies, ``True`` raises where it does not. A prefill of ``switch_over`` tokens or
    more runs through the chunked Triton kernel wherever it applies unless ``use_kernel=False``."""
    check_qkv(q, k, v)
    check_deg(deg)
    check_schedule(chunk_size, switch_over)
    check_power_state(state, q, k, v, deg, chunk_size, switch_over)
    if (log_g is None) != (state.g is None):
        raise ValueError("log_g must be given exactly when the state was made gated (init_power_state gated=True)")
    log_g = check_gate(log_g, k)
    scale = default_scale(q.shape[-1], scale)
    if q.numel() == 0:   # no new tokens (or a batch of 0): nothing to add
        return q.new_empty(*q.shape[:3], v.shape[-1]), state
    if q.shape[2] >= switch_over:   # pieces would be at most chunk_size tokens each, every one over all recent keys
        return _long_step(q, k, v, log_g, state, deg, scale, chunk_size, switch_over,
                          use_kernel=False if use_kernel is False else None)
    outs, start, T = [], 0, q.shape[2]
    while start < T:
        stop = min(T, start + switch_over - state.k.shape[2])     # the next fold point
        sl = slice(start, stop)
        o, state = _piece(q[:, :, sl], k[:, :, sl], v[:, :, sl], None if log_g is None else log_g[:, :, sl],
                          state, deg, scale, use_kernel)
        outs.append(o)
        if state.k.shape[2] >= switch_over:
            state = _fold(state, chunk_size, deg)
        start = stop
    return torch.cat(outs, 2), state


def _long_step(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, state: PowerState, deg: int, scale: float,
               chunk_size: int, switch_over: int, use_kernel: bool | None) -> tuple[Tensor, PowerState]:
    """``T_new >= switch_over`` tokens (a prefill) in a few large operations rather than one piece per fold:
    fold the recent tokens, continue that state over all but the last ``r`` new tokens (``power_retention_continued``:
    the chunked kernel where it applies, else the chunked form), and append those ``r`` as recent tokens, ``r``
    being what the folding schedule leaves unfolded at the new length. The same outputs and the same state layout
    as the piecewise path (its sums in another order)."""
    from .continued import power_retention_continued

    T = q.shape[2]
    r = recent_count(state.seen + T, chunk_size, switch_over)
    if state.k.shape[2]:
        state = _fold(state, state.k.shape[2], deg)
    bulk = T - r
    gate = None if log_g is None else log_g[:, :, :bulk]
    initial = None if state.S is None else (state.S, state.z)
    out, (S, z) = power_retention_continued(q[:, :, :bulk], k[:, :, :bulk], v[:, :, :bulk], gate, initial, deg,
                                            chunk_size, scale, use_kernel, return_state=True)
    folded = PowerState(k[:, :, :0], v[:, :, :0], None if state.g is None else state.g[:, :, :0], S, z,
                        state.seen + bulk)
    if r == 0:
        return out, folded
    tail, state = _piece(q[:, :, bulk:], k[:, :, bulk:], v[:, :, bulk:], None if log_g is None else log_g[:, :, bulk:],
                         folded, deg, scale)
    return torch.cat([out, tail], 2), state


# --- static state: buffers allocated once, updated in place (graph-captured decoding) ---------------------

@dataclass
class StaticPowerState:
    """``PowerState`` in fixed buffers: the recent tokens ``k [B, Hkv, switch_over, d]``, ``v [B, Hkv,
    switch_over, e]`` and their log-gates ``g [B, Hkv, switch_over]`` (float32; None ungated) fill slots ``[0, r)``
    with ``r = recent_count(seen)``, oldest first; ``S [B, Hkv, D, e]``, ``z [B, Hkv, D]`` (float32) are zero
    until the first fold. A fold moves the oldest ``chunk_size`` tokens into ``S, z`` and shifts the rest down."""
    k: Tensor
    v: Tensor
    g: Tensor | None
    S: Tensor
    z: Tensor

    def as_state(self, seen: int, chunk_size: int) -> PowerState:
        """The ``PowerState`` after ``seen`` tokens, viewing these buffers."""
        so = self.k.shape[2]
        r, folded = recent_count(seen, chunk_size, so), seen >= so
        return PowerState(self.k[:, :, :r], self.v[:, :, :r], None if self.g is None else self.g[:, :, :r],
                          self.S if folded else None, self.z if folded else None, seen)

    def load(self, state: PowerState) -> None:
        """Copy an eager state's tensors in."""
        r = state.k.shape[2]
        self.k[:, :, :r], self.v[:, :, :r] = state.k, state.v
        if self.g is not None:
            self.g[:, :, :r] = state.g
        if state.S is not None:
            self.S.copy_(state.S)
            self.z.copy_(state.z)


def init_static_power_state(batch: int, n_kv: int, d: int, e: int, deg: int, gated: bool, switch_over: int,
                            device="cpu", dtype=torch.float32) -> StaticPowerState:
    ct, D = compute_dtype(dtype), expanded_dim(d, check_deg(deg))
    return StaticPowerState(torch.zeros(batch, n_kv, switch_over, d, device=device, dtype=dtype),
                            torch.zeros(batch, n_kv, switch_over, e, device=device, dtype=dtype),
                            torch.zeros(batch, n_kv, switch_over, device=device, dtype=ct) if gated else None,
                            torch.zeros(batch, n_kv, D, e, device=device, dtype=ct),
                            torch.zeros(batch, n_kv, D, device=device, dtype=ct))


def static_variant(pos: int, chunk_size: int, switch_over: int) -> tuple[bool, bool]:
    """``(folded, folds)`` for the token at position ``pos``: whether ``S, z`` hold anything yet, and whether this
    token completes a fold."""
    return pos >= switch_over, pos + 1 >= switch_over and (pos + 1 - switch_over) % chunk_size == 0


def power_step_static(q: Tensor, k: Tensor, v: Tensor, state: StaticPowerState, pos: Tensor,
                      variant: tuple[bool, bool], log_g: Tensor | None, deg: int, scale: float | None,
                      chunk_size: int, use_kernel: bool | None = None) -> Tensor:
    """One token ``q [B, Hq, 1, d]``, ``k, v [B, Hkv, 1, ·]``, ``log_g [B, Hkv, 1]`` at position ``pos [1]``
    (device) with ``variant = static_variant(pos)``: appends it to the buffers in place, folds where the
    variant says, and returns ``o [B, Hq, 1, e]``. Capture-safe: no host sync, the same kernels for every
    position of one variant (the Triton decode kernel where ``takes_decode_kernel``)."""
    folded, folds = variant
    so = state.k.shape[2]
    scale = default_scale(q.shape[-1], scale)
    slot = (pos - so) % chunk_size + (so - chunk_size) if folded else pos       # recent_count(pos), on the device
    if takes_decode_kernel(q, k, v, deg, use_kernel):
        from .decode_triton import power_decode_static_triton
        out = power_decode_static_triton(q, k, v, log_g, state.k, state.v, state.g, state.S if folded else None,
                                         state.z, slot, scale)
    else:
        out = _static_piece(q, k, v, log_g, state, slot, folded, deg, scale)
    if folds:
        _fold_static(state, chunk_size, deg)
    return out


def _static_piece(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None, state: StaticPowerState, slot: Tensor,
                  folded: bool, deg: int, scale: float) -> Tensor:
    """PyTorch form of one static step (the decode kernel's reference): write the token into ``slot``, then
    weigh the recent slots ``[0, slot]`` and read the state."""
    ct = compute_dtype(q.dtype)
    B, Hq, _, _ = q.shape
    Hkv, so = k.shape[1], state.k.shape[2]
    state.k.index_copy_(2, slot, k)
    state.v.index_copy_(2, slot, v)
    live = torch.arange(so, device=q.device) <= slot                               # [so]
    qg = group_queries(q.to(ct), Hkv)                                              # [B, Hkv, G, 1, d]
    w = (scale * (qg @ state.k.to(ct).unsqueeze(2).transpose(-1, -2))).pow(deg)    # [B, Hkv, G, 1, so]
    gq = None
    if state.g is not None:
        prev = torch.where(slot > 0, state.g.index_select(2, (slot - 1).clamp_min(0)), 0.0)
        gq = prev + log_g.to(ct)                                                    # [B, Hkv, 1]
        state.g.index_copy_(2, slot, gq)
        w = w * torch.exp(torch.where(live, gq - state.g, float("-inf")))[:, :, None, None, :]
    w = torch.where(live, w, 0.0)
    num = w @ torch.where(live[:, None], state.v.to(ct), 0.0).unsqueeze(2)        # [B, Hkv, G, 1, e]
    den = w.sum(-1)
    if folded:
        num, den = _read_folded(num, den, qg, gq, state.S, state.z, deg, scale)
    return safe_ratio(num, den).reshape(B, Hq, 1, -1).to(q.dtype)


#: Bytes of expanded keys a fold may build at once: large batches fold in slices of the batch (deg 4's features
#: of 64 keys are ~53 MB per sequence and KV head group).
FOLD_SLICE_BYTES = 1 << 28


def _fold_static(state: StaticPowerState, n: int, deg: int) -> None:
    """``_fold`` in place on full buffers: the oldest ``n`` slots go into ``S, z``, the rest move down ``n``."""
    B, Hkv, D, e = state.S.shape
    rows = max(1, FOLD_SLICE_BYTES // (Hkv * n * D * state.S.element_size()))
    for b in range(0, B, rows):
        sl = slice(b, b + rows)
        _fold_rows(state.k[sl], state.v[sl], None if state.g is None else state.g[sl], state.S[sl], state.z[sl],
                   n, deg)


def _fold_rows(k: Tensor, v: Tensor, g: Tensor | None, S: Tensor, z: Tensor, n: int, deg: int) -> None:
    """``_fold_static`` on views of some batch rows."""
    level = _fold_into(k[:, :, :n], v[:, :, :n], None if g is None else g[:, :, :n], S, z, deg)
    if g is not None:
        g[:, :, :-n] = g[:, :, n:] - level
    k[:, :, :-n] = k[:, :, n:].clone()
    v[:, :, :-n] = v[:, :, n:].clone()
