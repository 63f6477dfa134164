"""Bench settings: one dataclass, two presets (tiny on a CPU, larger on one GPU)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class BenchSettings:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    block_size: int = 128             # training context (text and recall)
    batch_size: int = 16
    steps: int = 120                  # text-model optimiser steps
    lr: float = 3e-3
    eval_batches: int = 8
    recall_steps: int = 250           # recall-model optimiser steps
    recall_lr: float = 1e-2
    recall_pairs: int = 1             # on 2 CPU cores a tiny model learns 1 pair in 250 steps (full attention
                                      # 0.79, sliding window 0.0); 4 pairs stay near chance even at 500 steps
    recall_min_distance: int = 64     # pairs sit farther back than a 32-token window
    eval_context_multiples: list = field(default_factory=lambda: [2, 4])   # length generalisation: val loss
                                                                           # at these multiples of block_size
    measure_context: int = 4096       # context at which decode state and speed are measured
    decode_steps: int = 16
    contexts: list = field(default_factory=lambda: [1024, 16384, 131072, 1 << 20])
    dtype: str = "float32"


PRESETS: dict[str, BenchSettings] = {
    "cpu": BenchSettings(),
    "gpu": BenchSettings(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, block_size=512, batch_size=32,
                         steps=2000, lr=1.5e-3, eval_batches=32, recall_steps=1500, recall_lr=3e-3,
                         recall_pairs=16, recall_min_distance=256, measure_context=131072, decode_steps=32,
                         contexts=[16384, 65536, 131072, 262144, 1 << 20], dtype="bfloat16"),
}


def settings_for(preset: str, **overrides) -> BenchSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
