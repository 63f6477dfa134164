"""The rotary embedding of a pretrained Llama/Qwen-style transformers model, seen as complex frequency bands.

Rotate-half pairing (transformers' ``rotate_half``): band ``f`` of a head vector ``x [.., D]`` is the complex
number ``x[f] + i·x[f + D/2]``; at position ``p`` the model multiplies it by ``s_f · e^{i p ω_f}`` where ``ω_f``
is the band's angular frequency and ``s_f`` the rotary attention scaling (1 for the default rope).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

# Rope types whose frequencies do not depend on the sequence length (the scores assume fixed ω_f).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings of a model: ``inv_freq [D/2]`` (ω_f, float64) and the scalar attention scaling s_f."""

    head_dim: int
    inv_freq: Tensor
    attention_scaling: float
    rope_type: str
    rope_theta: float

    def settings(self) -> dict:
        """JSON-friendly description (stored in calibration metadata)."""
        return {"rope_type": self.rope_type, "rope_theta": self.rope_theta, "head_dim": self.head_dim,
                "attention_scaling": self.attention_scaling}


def head_dim_of(config) -> int:
    """Per-head dimension of a Llama/Qwen-style config."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:   # older transformers: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]   # per-layer-type rope parameters: use the global attention's
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_spec(config) -> RopeSpec:
    """Rotary frequencies ω_f ``[D/2]`` and attention scaling of ``config``; clear error for unsupported types."""
    params = _rope_parameters(config)
    rope_type = params["rope_type"]
    head_dim = head_dim_of(config)
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"partial rotary embeddings are not supported (partial_rotary_factor="
                         f"{config.partial_rotary_factor}); expected 1.0")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported by the KV scorers; supported: "
                         f"{', '.join(_STATIC_ROPE_TYPES)} (dynamic/longrope change ω with the sequence length)")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        inv_freq = inv_freq.to(torch.float64)
    return RopeSpec(head_dim, inv_freq.cpu(), float(scaling), rope_type, theta)


def to_complex(x: Tensor) -> Tensor:
    """``x [..., D]`` real → ``[..., D/2]`` complex bands (rotate-half pairing: f with f + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.complex(x1, x2)


def from_complex(z: Tensor) -> Tensor:
    """Inverse of :func:`to_complex`: ``[..., D/2]`` complex → ``[..., D]`` real."""
    return torch.cat([z.real, z.imag], dim=-1)


def rotate(x: Tensor, positions: Tensor, spec: RopeSpec) -> Tensor:
    """Apply the model's rotary embedding: ``x [..., T, D]`` at ``positions`` broadcastable to ``[..., T]``.

    Includes the attention scaling s_f, like transformers' ``cos``/``sin``. Computed in float64, returned in x's dtype.
    """
    z = to_complex(x.to(torch.float64))
    angles = positions.to(torch.float64)[..., None] * spec.inv_freq.to(x.device)
    return from_complex(z * torch.polar(torch.full_like(angles, spec.attention_scaling), angles)).to(x.dtype)


def unrotate(keys: Tensor, positions: Tensor, spec: RopeSpec) -> Tensor:
    """Undo :func:`rotate` on cached keys ``[..., T, D]`` rotated at their original ``positions [..., T]``."""
    z = to_complex(keys.to(torch.float64))
    angles = positions.to(torch.float64)[..., None] * spec.inv_freq.to(keys.device)
    return from_complex(z * torch.polar(torch.full_like(angles, 1.0 / spec.attention_scaling), -angles)).to(keys.dtype)


def settings_json(spec: RopeSpec) -> str:
    return json.dumps(spec.settings(), sort_keys=True)
