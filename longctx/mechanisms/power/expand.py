"""The symmetric p-th tensor power feature map: ``<phi(q), phi(k)> = (q . k)^p`` with ``C(d+p-1, p)`` features.

For every multiset ``i_1 <= ... <= i_p`` of coordinates there is one feature
``sqrt(p! / prod_c m_c!) * x_{i_1} ... x_{i_p}`` (``m_c`` the multiplicity of coordinate ``c``); the multinomial
theorem gives ``sum_features phi(q) phi(k) = (sum_i q_i k_i)^p``. The full tensor power ``x^{(x) p}`` has ``d^p``
entries; the symmetric one keeps each distinct monomial once: 2080 instead of 4096 for ``d=64, p=2``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def check_deg(deg) -> int:
    """``deg`` must be 1 (plain linear attention) or a positive even integer; anything else raises.

    Even powers make every weight ``(q . k)^p >= 0``, so the normaliser is a sum of non-negative terms. Odd
    powers change sign with ``q . k`` and the normaliser can vanish; the only odd degree accepted is 1, the
    classical normalised linear attention, which needs ``q . k > 0`` (e.g. positive features) from the caller.
    """
    if isinstance(deg, bool) or not isinstance(deg, int):
        raise TypeError(f"deg must be an int, got {deg!r}")
    if deg < 1 or (deg > 1 and deg % 2):
        raise ValueError(f"deg must be 1 or a positive even integer (odd powers make the normaliser change sign), "
                         f"got deg={deg}")
    return deg


def expanded_dim(d: int, deg: int) -> int:
    """Number of features of the symmetric ``deg``-th power of a ``d``-vector: ``C(d + deg - 1, deg)``."""
    return math.comb(d + deg - 1, deg)


@lru_cache(maxsize=32)
def _monomials(d: int, deg: int) -> tuple[Tensor, Tensor]:
    """``(index [D, deg] int64, weight [D] float64)``: sorted coordinate multisets and their sqrt-multinomials."""
    idx = torch.combinations(torch.arange(d), r=deg, with_replacement=True)
    if deg == 1:
        idx = idx.view(-1, 1)
    # multiplicities: positions where the sorted index repeats its predecessor start a run
    log_fact = torch.lgamma(torch.arange(1, deg + 2, dtype=torch.float64))        # log(n!) for n = 0..deg
    runs = torch.ones_like(idx)
    for c in range(1, deg):
        runs[:, c] = torch.where(idx[:, c] == idx[:, c - 1], runs[:, c - 1] + 1, 1)
    # a run of length m contributes log(m!) = sum over its members of log(position in run)
    log_m = torch.log(runs.double()).sum(1)
    weight = torch.exp(0.5 * (log_fact[deg] - log_m))
    return idx, weight


def sympow(x: Tensor, deg: int) -> Tensor:
    """``phi(x)``: ``x [..., d] -> [..., C(d+deg-1, deg)]`` in ``x``'s dtype; ``<phi(q), phi(k)> = (q.k)^deg``."""
    check_deg(deg)
    if deg == 1:
        return x
    # deg is even here: x_{i1} ... x_{ip} as a product of two half-degree monomials, two gathers instead of p
    weight, half_idx, left, right = _tables(x.shape[-1], deg, x.device, x.dtype)
    half = _raw_monomials(x, half_idx)                                              # [..., C(d+p/2-1, p/2)]
    return half[..., left] * half[..., right] * weight


@lru_cache(maxsize=64)
def _tables(d: int, deg: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``sympow``'s weights and index tables for an even ``deg`` on ``device`` (cached: no host-to-device copy
    per call, which also keeps ``sympow`` capturable in a CUDA graph)."""
    left, right = _half_positions(d, deg)
    return (_monomials(d, deg)[1].to(device=device, dtype=dtype), _monomials(d, deg // 2)[0].to(device),
            left.to(device), right.to(device))


def _raw_monomials(x: Tensor, idx: Tensor) -> Tensor:
    """Unweighted products ``prod_c x[..., idx[:, c]]``: ``[..., len(idx)]``."""
    out = x[..., idx[:, 0]]
    for c in range(1, idx.shape[1]):
        out = out * x[..., idx[:, c]]
    return out


@lru_cache(maxsize=32)
def _half_positions(d: int, deg: int) -> tuple[Tensor, Tensor]:
    """For each degree-``deg`` monomial, the positions of its first and second halves among degree-``deg/2`` ones."""
    idx, _ = _monomials(d, deg)
    half_idx, _ = _monomials(d, deg // 2)
    # rank of a sorted multiset among combinations_with_replacement: look it up in a dictionary
    pos = {tuple(row): i for i, row in enumerate(half_idx.tolist())}
    h = deg // 2
    rows = idx.tolist()
    left = torch.tensor([pos[tuple(r[:h])] for r in rows], dtype=torch.long)
    right = torch.tensor([pos[tuple(r[h:])] for r in rows], dtype=torch.long)
    return left, right
