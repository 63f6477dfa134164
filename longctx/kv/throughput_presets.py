"""Settings of ``longctx throughput --hf``: the caches, the model shapes, one dataclass, two presets and their checks.
No torch here: the command refuses a bad option before torch and transformers load."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..bench.presets import DTYPE_NAMES

CACHES = ("dynamic", "static-hf", "static", "triattention", "streamingllm", "keynorm")
COMPRESSED = ("triattention", "streamingllm", "keynorm")

TINY_LLAMA = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
# SmolLM2-135M-Instruct's architecture (the package's config.json) and a Llama-3.2-1B-like one
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "max_position_embeddings": 8192, "tie_word_embeddings": True}
LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
            "max_position_embeddings": 131072, "tie_word_embeddings": True}
MODELS = {"tiny": TINY_LLAMA, "smollm2": SMOLLM2_135M, "llama1b": LLAMA_1B}


@dataclass
class KVThroughputSettings:
    model: str = "tiny"
    caches: list = field(default_factory=lambda: ["dynamic", "static-hf", "static", "triattention"])
    budgets: list = field(default_factory=lambda: [0.5])     # fractions of the context kept (compressed caches)
    contexts: list = field(default_factory=lambda: [192])
    batches: list = field(default_factory=lambda: [2])
    max_batch: bool = False
    max_batch_caches: list = field(default_factory=lambda: ["static", "triattention"])
    steps: int = 40                   # timed steps of the slot decoder (over two prunes with the default slack)
    eager_steps: int = 16             # timed steps of the eager caches
    slack: int = 16                   # a compressed cache prunes every slack steps
    dtype: str = "float32"
    memory_fraction: float = 0.85     # of the GPU's free memory that the max-batch estimate may fill
    max_batch_cap: int = 4096


PRESETS = {
    "cpu": KVThroughputSettings(),
    "gpu": KVThroughputSettings(model="smollm2", caches=["dynamic", "static-hf", "static", "triattention"],
                                budgets=[0.1, 0.25, 0.5], contexts=[8192, 32768, 131072], batches=[1, 16],
                                max_batch=True, max_batch_caches=["dynamic", "static", "triattention"], steps=256,
                                eager_steps=32, slack=128, dtype="bfloat16"),
}


def settings_for(model: str, **overrides) -> KVThroughputSettings:
    """The GPU preset for ``model`` (``tiny``: the CPU preset), with the overrides that are not None."""
    base = PRESETS["cpu"] if model == "tiny" else replace(PRESETS["gpu"], model=model)
    s = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    check_settings(s)
    return s


def check_settings(s: KVThroughputSettings) -> None:
    if s.model not in MODELS:
        raise ValueError(f"--hf must be one of {', '.join(MODELS)}, got {s.model!r}")
    for name in [*s.caches, *s.max_batch_caches]:
        if name not in CACHES:
            raise ValueError(f"unknown cache {name!r}; expected some of {', '.join(CACHES)}")
    if not s.budgets or not all(0 < b <= 1 for b in s.budgets):
        raise ValueError(f"--budgets must be fractions in (0, 1], got {s.budgets}")
    for name, values in (("--contexts", s.contexts), ("--batches", s.batches), ("--steps", [s.steps]),
                         ("eager_steps", [s.eager_steps]), ("slack", [s.slack])):
        if any(v < 1 for v in values):
            raise ValueError(f"{name} must be >= 1, got {values if name in ('--contexts', '--batches') else values[0]}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name}: a value is repeated in {list(values)}")
    if s.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {s.dtype!r}")


def variants(s: KVThroughputSettings, batch_label) -> list[tuple[str, float | None]]:
    """(cache, budget fraction) pairs measured at one batch label."""
    names = s.max_batch_caches if batch_label == "max" else s.caches
    return [(c, b) for c in names for b in (s.budgets if c in COMPRESSED else [None])]
