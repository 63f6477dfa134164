"""Settings of ``longctx throughput`` (longctx's own GPT): one dataclass, four presets, and their checks. No torch
here: the command refuses a bad option before torch loads."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .presets import DTYPE_NAMES

PATHS = ("eager", "static", "graph")
FILLS = ("prefill", "synthetic")


@dataclass
class ThroughputSettings:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    mechanisms: list = field(default_factory=lambda: ["full", "sliding_window", "power", "power4", "tensor_cache",
                                                      "raytention"])
    mechanism_options: dict = field(default_factory=dict)
    contexts: list = field(default_factory=lambda: [256, 1024])
    batches: list = field(default_factory=lambda: [1, 4])
    max_batch: bool = False           # also the largest batch that fits at each context (graph path)
    paths: list = field(default_factory=lambda: ["eager", "static"])
    eager_max_batch: int = 64         # the eager path only up to this batch (its growing cache copies itself)
    steps: int = 16                   # timed decode steps per row
    fill: str = "prefill"
    prefix: int = 2048                # synthetic fill: real tokens before the jump, at most
    prefix_tokens: int = 1 << 22      # batch x prefix (a max-batch row of 30,000 sequences gets 139 real tokens)
    call_tokens: int = 1 << 16        # batch x tokens of one prefill call (bounds the prefill's transients)
    max_batch_cap: int = 32768        # the max-batch search stops here (sliding window would reach ~10^5)
    history_limit: dict = field(default_factory=lambda: {"raytention": 1 << 19})
                                      # mechanisms whose step reads the whole history: batch x context above
                                      # this is not measured (RayTention: ~0.4 s a step at 128K x 16)
    prefill_chunk: int = 1024
    dtype: str = "float32"
    memory_fraction: float = 0.9      # of the GPU's free memory that the max-batch estimate may fill


GPU_MECHANISMS = {"tensor_cache": {"feature": "normalize"}, "power4": {"switch_over": 4096}}
PRESETS = {
    "cpu": ThroughputSettings(),
    # the bench's GPU model: 4 layers, width 256, 8 query / 4 KV heads of 32
    "gpu": ThroughputSettings(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, mechanism_options=GPU_MECHANISMS,
                              contexts=[4096, 32768, 131072, 1 << 20], batches=[1, 16, 64], max_batch=True,
                              paths=["eager", "graph"], eager_max_batch=16, steps=128, fill="synthetic",
                              dtype="bfloat16"),
    # the width-512 model of the decoding anchors (8 / 8 heads of 64)
    "w512": ThroughputSettings(n_layer=4, n_embd=512, n_head=8, n_kv_head=8, mechanism_options=GPU_MECHANISMS,
                               contexts=[8192, 131072], batches=[1], max_batch=True, paths=["eager", "graph"],
                               eager_max_batch=1, steps=128, fill="synthetic", dtype="bfloat16"),
    # GPT-2 small's shape, GQA: 12 layers, width 768, 12 query / 4 KV heads of 64
    "gpt2": ThroughputSettings(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, mechanism_options=GPU_MECHANISMS,
                               contexts=[4096, 32768, 131072], batches=[1, 16, 64], max_batch=True,
                               paths=["eager", "graph"], eager_max_batch=1, steps=64, fill="synthetic",
                               dtype="bfloat16"),
}


def settings_for(preset: str, **overrides) -> ThroughputSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    s = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    check_settings(s)
    return s


#: Settings that ``longctx throughput`` sets from an option; errors about them name the option.
OPTIONS = ("contexts", "batches", "paths", "mechanisms", "steps", "fill")


def _option(name: str) -> str:
    return "--" + name if name in OPTIONS else name


def check_settings(s: ThroughputSettings) -> None:
    """Every bad value refused before any work starts (the mechanisms' names last: they need the registry, and
    so torch)."""
    for name in ("contexts", "batches"):
        bad = [x for x in getattr(s, name) if isinstance(x, bool) or not isinstance(x, int) or x < 1]
        if bad or not getattr(s, name) and not (name == "batches" and s.max_batch):
            raise ValueError(f"{_option(name)} must be integers >= 1, got {getattr(s, name)}")
    bad = [p for p in s.paths if p not in PATHS]
    if bad or not s.paths:
        raise ValueError(f"--paths must be among {PATHS}, got {s.paths}")
    if not s.mechanisms:
        raise ValueError("--mechanisms: no mechanism named")
    for name in ("contexts", "batches", "paths", "mechanisms"):   # a repeat would be measured twice
        values = getattr(s, name)
        if len(set(values)) != len(values):
            raise ValueError(f"{_option(name)}: a value is repeated in {list(values)}")
    for name in ("steps", "prefix", "prefill_chunk", "n_layer", "n_embd", "n_head", "n_kv_head"):
        if getattr(s, name) < 1:
            raise ValueError(f"{_option(name)} must be >= 1, got {getattr(s, name)}")
    if s.fill not in FILLS:
        raise ValueError(f"--fill must be one of {FILLS}, got {s.fill!r}")
    if s.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {s.dtype!r}")
    if not 0 < s.memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {s.memory_fraction}")
    from ..mechanisms import registered

    unknown = [m for m in s.mechanisms if m not in registered()]
    if unknown:
        raise ValueError(f"unknown mechanisms {unknown}; registered: {', '.join(registered())}")
