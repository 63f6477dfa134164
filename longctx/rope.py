"""Rotary position embedding (rotate-half pairing, as in Llama): dimension ``i`` pairs with ``i + D/2``."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, base: float = 10000.0, device=None) -> Tensor:
    """Angular frequency of each rotary pair: ``[head_dim // 2]``, float32."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


@lru_cache(maxsize=32)
def _frequencies(head_dim: int, base: float, device: torch.device) -> Tensor:
    """``rope_frequencies`` kept per device: no allocation per call (capturable in a CUDA graph)."""
    return rope_frequencies(head_dim, base, device)


def rope_table(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of the angles of ``positions [T]`` (or ``[B, T]``): ``[T, D/2]`` (or ``[B, 1, T, D/2]``) in
    ``dtype``; computed once and applied to every head and layer by ``rotate``."""
    angles = positions.to(torch.float32)[..., None] * _frequencies(head_dim, float(base), positions.device)
    if angles.dim() == 3:
        angles = angles[:, None]                                      # [B, 1, T, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by a ``rope_table``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by the angles of ``positions [T]`` (or ``[B, T]``), in x's dtype."""
    if positions.shape[-1] != x.shape[2]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for a sequence of {x.shape[2]}")
    return rotate(x, *rope_table(positions, x.shape[-1], base, x.dtype))
