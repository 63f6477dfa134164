"""Bench settings: one dataclass, two presets (tiny on a CPU, larger on one GPU)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

DTYPE_NAMES = ("float32", "bfloat16", "float16")   # what a dtype setting may name (measure.DTYPES: the torch dtypes)


@dataclass
class BenchSettings:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    block_size: int = 128             # training context (text and recall)
    mechanism_options: dict = field(default_factory=lambda: {"raytention": {"heads": 2, "ffn_hidden": 8}})
                                      # per mechanism; RayTention's AttnFFN width is chosen so that its
                                      # parameter count matches full attention's (105,848 vs 106,816)
    seeds: list = field(default_factory=lambda: [0])   # every model is trained once per seed
    exclude: list = field(default_factory=list)        # registered mechanisms left out by default
    batch_size: int = 16
    steps: int = 120                  # text-model optimiser steps
    lr: float = 3e-3
    eval_batches: int = 8
    recall_steps: int = 250           # recall-model optimiser steps
    recall_lr: float = 1e-2
    recall_pairs: list = field(default_factory=lambda: [1])
                                      # the recall model trains on these numbers of pairs (one drawn per step)
                                      # and is scored on each; on 2 CPU cores a tiny model learns 1 pair in 250
                                      # steps (full attention 0.79, sliding window 0.0), 4 pairs stay at chance
    recall_min_distance: int = 64     # pairs sit farther back than a 32-token window
    needle_distances: list = field(default_factory=lambda: [64, 127, 256])
                                      # one pair exactly this far back (the recall model; past block_size it
                                      # is also a length-generalisation test)
    eval_context_multiples: list = field(default_factory=lambda: [2, 4])   # length generalisation: val loss
                                                                           # at these multiples of block_size
    measure_contexts: list = field(default_factory=lambda: [4096])   # decode state, peak memory and speed
    decode_steps: int = 16
    prefill_chunk: int = 1024         # tokens per step call while filling the state before a measurement
    prefill_seconds: float = 120.0    # a context whose prefill would take longer (projected) is not measured
    contexts: list = field(default_factory=lambda: [1024, 16384, 131072, 1 << 20])   # state_bytes formula
    dtype: str = "float32"
    deterministic: bool = False       # torch.use_deterministic_algorithms for the run (bench.run)


GPU_CONTEXTS = [16384, 65536, 131072, 262144, 1 << 20]

PRESETS: dict[str, BenchSettings] = {
    "cpu": BenchSettings(),
    "gpu": BenchSettings(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, block_size=512,
                         mechanism_options={"raytention": {"heads": 2, "ffn_hidden": 32},    # 2.92M vs 2.95M
                                            # with raw keys Tensor Cache's memory read swamps the layer at this
                                            # width (H100 probe, 300 steps: loss 2.30 vs 1.55 nats normalised)
                                            "tensor_cache": {"feature": "normalize"},
                                            # evaluation at 2x / 4x the context and the 2000-token needle
                                            # ran deg 4's chunked form (52,360 features a token); up to 4096
                                            # tokens the quadratic form computes the same, much faster
                                            "power4": {"switch_over": 4096}},
                         seeds=[0, 1], exclude=["ring"],   # on one GPU ring attention is full attention
                         batch_size=32, steps=1000, lr=2e-3, eval_batches=32, recall_steps=600,
                         recall_lr=3e-3, recall_pairs=[2, 8, 32], recall_min_distance=256,
                         needle_distances=[256, 500, 1000, 2000], measure_contexts=GPU_CONTEXTS, decode_steps=32,
                         prefill_chunk=4096, prefill_seconds=200.0, contexts=GPU_CONTEXTS, dtype="bfloat16"),
}


def settings_for(preset: str, **overrides) -> BenchSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    s = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    check_settings(s)
    return s


#: Settings that ``longctx bench`` sets from an option; errors about them name the option.
OPTIONS = ("steps", "recall_steps", "n_layer", "n_embd", "n_head", "n_kv_head", "block_size", "batch_size",
           "measure_contexts", "seeds")


def _name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-") if field_name in OPTIONS else field_name


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_settings(s: BenchSettings) -> None:
    """Every bad value refused before any work starts, with the option (or field) named and what was expected."""
    for f in ("n_layer", "n_embd", "n_head", "n_kv_head", "block_size", "batch_size", "steps", "recall_steps",
              "eval_batches", "decode_steps", "prefill_chunk"):
        v = getattr(s, f)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{_name(f)}: expected an integer >= 1, got {v!r}")
    if s.n_embd % s.n_head:
        raise ValueError(f"--n-embd ({s.n_embd}) must be divisible by --n-head ({s.n_head})")
    if s.n_head % s.n_kv_head:
        raise ValueError(f"--n-head ({s.n_head}) must be a multiple of --n-kv-head ({s.n_kv_head})")
    for f, least, may_be_empty in (("seeds", 0, False), ("measure_contexts", 1, False), ("recall_pairs", 1, False),
                                   ("contexts", 1, True), ("needle_distances", 1, True),
                                   ("eval_context_multiples", 1, True)):
        v = getattr(s, f)
        if (not isinstance(v, (list, tuple)) or not (v or may_be_empty)
                or not all(_is_int(x) and least <= x < 2 ** 63 for x in v)):   # torch's seeds and sizes are int64
            what = "a list of integers" if may_be_empty else "one or more integers"
            raise ValueError(f"{_name(f)}: expected {what} >= {least} and < 2**63, got {v!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"{_name(f)}: a value is repeated in {list(v)}")
    if not _is_int(s.recall_min_distance) or s.recall_min_distance < 0:
        raise ValueError(f"recall_min_distance: expected an integer >= 0, got {s.recall_min_distance!r}")
    if max(s.recall_pairs) > 64:
        raise ValueError(f"recall_pairs: at most 64 pairs (64 distinct keys), got {s.recall_pairs}")
    for f in ("lr", "recall_lr", "prefill_seconds"):
        v = getattr(s, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{f}: expected a number > 0, got {v!r}")
    if not isinstance(s.mechanism_options, dict) or not all(isinstance(o, dict) for o in s.mechanism_options.values()):
        raise TypeError(f"mechanism_options: expected {{mechanism: {{option: value}}}}, got {s.mechanism_options!r}")
    if not isinstance(s.deterministic, bool):
        raise TypeError(f"deterministic: expected True or False, got {s.deterministic!r}")
    if s.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {s.dtype!r}")
    check_training_memory(s)


# --- sizes no machine holds, refused before torch loads --------------------------------------------------------

#: The most memory a bench setting may be estimated to need: 1 TiB. No single GPU holds that (an H200 has 141 GB,
#: an H100 80 GB), so a setting estimated past it would only fail later with an out-of-memory, after torch loaded
#: (or, for --measure-contexts, after the models trained). The estimates are lower bounds; sizes under the bound
#: that still do not fit stop at the out-of-memory error (``longctx.cli``).
MAX_BYTES = 2 ** 40
MAX_CONTEXT = 2 ** 30                    # --measure-contexts: a longer prefill would run for hours, whatever its state
VOCAB_SIZE, MLP_RATIO = 256, 4           # the bench's models: GPTConfig's defaults (byte tokens, a 4x MLP)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Mechanisms whose decoding state grows with the context, and what it holds: a KV cache (full attention, and ring
#: attention, which is full attention on one GPU) or the token ids (RayTention: int32, one copy for all layers).
GROWING_STATES = {"full": "kv", "ring": "kv", "raytention": "ids"}


def _bytes(n: int) -> str:
    return f"{n:.2e} bytes ({n / 2 ** 40:.3g} TiB)"


def _too_much(options: str, what: str, need: int, lower: str) -> ValueError:
    return ValueError(f"{options}: {what} at least {_bytes(need)}, more than the bench's bound of 2**40 bytes (1 TiB, "
                      f"more than any one GPU holds); lower {lower}")


def min_params(s: BenchSettings) -> int:
    """A lower bound on the parameters of a bench model of any mechanism: its MLPs' ``2 * MLP_RATIO * n_layer *
    n_embd**2`` and its (tied) embedding's ``VOCAB_SIZE * n_embd``; the attention layers come on top."""
    return 2 * MLP_RATIO * s.n_layer * s.n_embd ** 2 + VOCAB_SIZE * s.n_embd


def decode_state_bytes(s: BenchSettings, mechanism: str, context: int) -> int | None:
    """The decoding state of ``mechanism`` after ``context`` tokens at batch 1 (its ``state_bytes`` formula) for
    the mechanisms whose state grows with the context (``GROWING_STATES``); None for the others."""
    kind = GROWING_STATES.get(mechanism)
    if kind == "kv":
        return 2 * s.n_layer * s.n_kv_head * (s.n_embd // s.n_head) * context * DTYPE_BYTES[s.dtype]
    return 4 * context if kind == "ids" else None


def check_training_memory(s: BenchSettings) -> None:
    """Refuse settings whose training could not fit any one GPU: the weights with their gradients and AdamW's two
    moments (``min_params``, four copies in ``s.dtype``), or one step's activations (at least each block's input
    and the logits, ``batch * block * (n_layer * n_embd + VOCAB_SIZE)`` values, and 16 bytes of int64 ids and
    targets a token)."""
    size = DTYPE_BYTES[s.dtype]
    params = min_params(s)
    if 4 * params * size > MAX_BYTES:
        raise _too_much(f"--n-layer {s.n_layer}, --n-embd {s.n_embd}",
                        f"training holds {params:.2e} parameters ({s.dtype}) 4 times (weights, gradients, AdamW's "
                        "moments):", 4 * params * size, "--n-embd or --n-layer")
    tokens = s.batch_size * s.block_size
    activations = tokens * ((s.n_layer * s.n_embd + VOCAB_SIZE) * size + 16)
    if activations > MAX_BYTES:
        raise _too_much(f"--batch-size {s.batch_size} x --block-size {s.block_size}",
                        f"one training step of {tokens:.2e} tokens holds activations and ids of",
                        activations, "--batch-size or --block-size")


def check_decode_memory(s: BenchSettings, mechanisms: list[str] | None = None) -> None:
    """Refuse a ``--measure-contexts`` value at which the decoding state of one of ``mechanisms`` (None: every
    mechanism but ``s.exclude``) could not fit any one GPU (only states that grow with the context count,
    ``decode_state_bytes``; the others have a fixed size), or above ``MAX_CONTEXT`` tokens."""
    context = max(s.measure_contexts)
    for name in [m for m in GROWING_STATES if m not in s.exclude] if mechanisms is None else mechanisms:
        need = decode_state_bytes(s, name, context)
        if need is not None and need > MAX_BYTES:
            what = (f"RayTention's token ids at {context} tokens take" if GROWING_STATES[name] == "ids"
                    else f"{name} attention's KV cache at {context} tokens takes")
            raise _too_much(f"--measure-contexts {context}", what, need,
                            f"--measure-contexts (or leave {name} out of --mechanisms)")
    if context > MAX_CONTEXT:   # fixed-size states fit, but the prefill would not end
        raise ValueError(f"--measure-contexts: at most 2**30 = {MAX_CONTEXT} tokens (the decode measurement prefills "
                         f"them: 2**30 tokens take ~18 min at 1M tokens/s), got {context}")
