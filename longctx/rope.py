"""Rotary position embedding (rotate-half pairing, as in Llama): dimension ``i`` pairs with ``i + D/2``."""
from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, base: float = 10000.0, device=None) -> Tensor:
    """Angular frequency of each rotary pair: ``[head_dim // 2]``, float32."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate ``x [B, H, T, D]`` by the angles of ``positions [T]`` (or ``[B, T]``), in x's dtype."""
    if positions.shape[-1] != x.shape[2]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for a sequence of {x.shape[2]}")
    freqs = rope_frequencies(x.shape[-1], base, x.device)
    angles = positions.to(torch.float32)[..., None] * freqs          # [T, D/2] or [B, T, D/2]
    if angles.dim() == 3:
        angles = angles[:, None]                                      # [B, 1, T, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
