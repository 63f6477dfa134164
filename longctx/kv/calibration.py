"""Calibration of TriAttention: per layer, head and rotary band, the centre of the pre-RoPE queries.

One forward pass over calibration text; forward hooks on each attention's ``q_proj`` (or ``q_norm`` when the
model normalises queries before the rotary embedding, as Qwen3 does) collect the pre-RoPE queries. Per band f
(rotate-half pairing, see :mod:`longctx.kv.rope`): ``μ_f = E[q_f]`` (complex mean) and ``a_f = E[|q_f|]``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from ..atomic import atomic_write
from .rope import RopeSpec, head_dim_of, rope_spec, to_complex

FORMAT = "longctx-triattention-stats-v1"


def config_hash(config) -> str:
    """Short hash of the config fields the statistics depend on (shapes, vocabulary, rotary settings)."""
    spec = rope_spec(config)
    fields = {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
        "hidden_size": config.hidden_size,
        "head_dim": head_dim_of(config),
        "vocab_size": getattr(config, "vocab_size", None),
        "rope": spec.settings(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class QueryStats:
    """Calibration statistics: ``mu [L, H, D/2]`` complex128, ``abs_mean [L, H, D/2]`` float64, rotary spec."""

    mu: Tensor
    abs_mean: Tensor
    rope: RopeSpec
    model_name: str
    config_hash: str
    n_tokens: int

    @property
    def n_layers(self) -> int:
        return self.mu.shape[0]

    @property
    def n_heads(self) -> int:
        return self.mu.shape[1]

    def check_finite(self, source: str = "the statistics") -> None:
        """Raise ValueError where ``mu`` or ``abs_mean`` holds NaN or inf (every TriAttention score would)."""
        for name, t in (("mu", self.mu), ("abs_mean", self.abs_mean)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{source}: {name} holds NaN or inf values; recalibrate with `longctx calibrate` "
                                 "(in float32 if the model ran in half precision)")

    def check_config(self, config) -> None:
        """Raise ValueError unless these statistics were computed for a model with ``config``."""
        h = config_hash(config)
        if h != self.config_hash:
            raise ValueError(
                f"stats do not match the model: stats are for {self.model_name!r} (config hash {self.config_hash}, "
                f"{self.n_layers} layers, {self.n_heads} heads, head_dim {self.rope.head_dim}, rope "
                f"{self.rope.settings()}), the model has config hash {h} ({config.num_hidden_layers} layers, "
                f"{config.num_attention_heads} heads, head_dim {head_dim_of(config)}, rope {rope_spec(config).settings()})"
                "; recalibrate with `longctx calibrate`")


def _query_modules(model) -> list[tuple[torch.nn.Module, int]]:
    """(module whose output is the pre-RoPE query, n_heads) for each decoder layer, in order."""
    config = model.config
    found = []
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "layer_idx"):
            found.append((module.layer_idx, getattr(module, "q_norm", None) or module.q_proj))
    if len(found) != config.num_hidden_layers:
        raise ValueError(f"found {len(found)} attention modules with q_proj, expected num_hidden_layers="
                         f"{config.num_hidden_layers}; only Llama/Qwen-style models are supported")
    return [(m, config.num_attention_heads) for _, m in sorted(found, key=lambda x: x[0])]


@torch.no_grad()
def calibrate(model, input_ids: Tensor, model_name: str = "") -> QueryStats:
    """Run ``model`` once over ``input_ids [B, T]`` and return the query statistics of every layer and head."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(input_ids.shape)}")
    config = model.config
    spec = rope_spec(config)
    head_dim = spec.head_dim
    modules = _query_modules(model)
    sums: list[list[Tensor]] = [[] for _ in modules]

    def hook_for(i: int, n_heads: int):
        def hook(_module, _inputs, out):
            q = to_complex(out.reshape(-1, n_heads, head_dim).to(torch.float64))   # [N, H, D/2]
            sums[i] = [q.sum(0), q.abs().sum(0)]
        return hook

    handles = [m.register_forward_hook(hook_for(i, h)) for i, (m, h) in enumerate(modules)]
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = input_ids.numel()
    mu = torch.stack([s[0] for s in sums]).cpu() / n
    abs_mean = torch.stack([s[1] for s in sums]).cpu() / n
    name = model_name or getattr(config, "_name_or_path", "") or ""
    return QueryStats(mu, abs_mean, spec, str(name), config_hash(config), n)


def save_stats(stats: QueryStats, path: str | Path) -> Path:
    """Write ``stats`` as safetensors with metadata, atomically; statistics holding NaN or inf are refused."""
    stats.check_finite("the calibration")
    tensors = {"mu_real": stats.mu.real.contiguous(), "mu_imag": stats.mu.imag.contiguous(),
               "abs_mean": stats.abs_mean.contiguous(), "inv_freq": stats.rope.inv_freq.contiguous()}
    meta = {"format": FORMAT, "model_name": stats.model_name, "head_dim": str(stats.rope.head_dim),
            "rope": json.dumps(stats.rope.settings(), sort_keys=True), "config_hash": stats.config_hash,
            "n_tokens": str(stats.n_tokens)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def is_stats_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file in the format :func:`save_stats` writes (its header only: the values
    are checked by :func:`load_stats`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (OSError, SafetensorError):
        return False


def load_stats(path: str | Path, config=None) -> QueryStats:
    """Read statistics written by :func:`save_stats`; with ``config``, raise ValueError if they do not match it.
    A file that is not a complete stats file of this format, or statistics holding NaN or inf, are a ValueError
    naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stats file not found: {path}")

    def foreign(why: str) -> ValueError:
        return ValueError(f"{path} is not a TriAttention stats file ({why}); make one with `longctx calibrate`")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise foreign(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        t = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise foreign(f"unreadable: {e}") from None
    try:
        rope = json.loads(meta["rope"])
        spec = RopeSpec(int(meta["head_dim"]), t["inv_freq"], float(rope["attention_scaling"]), rope["rope_type"],
                        float(rope["rope_theta"]))
        stats = QueryStats(torch.complex(t["mu_real"], t["mu_imag"]), t["abs_mean"], spec, meta["model_name"],
                           meta["config_hash"], int(meta["n_tokens"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:   # a missing or malformed field or tensor
        raise foreign(f"{type(e).__name__}: {e}") from None
    half = spec.head_dim // 2
    if stats.mu.dim() != 3 or stats.abs_mean.shape != stats.mu.shape or stats.mu.shape[-1] != half \
            or tuple(spec.inv_freq.shape) != (half,):
        raise foreign(f"mu {tuple(stats.mu.shape)}, abs_mean {tuple(stats.abs_mean.shape)} and inv_freq "
                      f"{tuple(spec.inv_freq.shape)} are not [layers, heads, {half}] and [{half}]")
    stats.check_finite(str(path))
    if config is not None:
        stats.check_config(config)
    return stats
