"""``longctx throughput --hf MODEL``: decode speed of a transformers Llama with each KV cache, as a server sees it.

Caches, for every context x batch (a random-weight model built from a config: speed and memory depend on the
shapes, not on the weights):

- ``dynamic``: transformers' ``DynamicCache`` stepped eagerly, transformers' SDPA attention: what ``generate``
  does by default (the cache grows by concatenation, so each step copies it);
- ``static-hf``: transformers' ``StaticCache`` stepped eagerly with its SDPA attention and masks;
- ``static``: the same ``StaticCache`` decoded by ``longctx.kv.graphs.SlotDecoder`` (a CUDA graph per step on
  CUDA, the slot attention): the full cache at the speed the graphs allow, the baseline a compressed cache must beat;
- ``triattention``, ``streamingllm``, ``keynorm``: ``CompressedCache(fixed=True)`` at each budget (a fraction of
  the context), decoded by ``SlotDecoder``; the prunes every ``slack`` steps are inside the timed steps, and the
  first prune is also timed on its own (``prune_ms``: every layer, scoring included).

With ``max`` among the batches, the largest batch whose cache fits in the GPU's free memory is estimated from
the cache's bytes per sequence (lowered on out-of-memory) for ``max_batch_caches``: compression exists to serve
more sequences at once, so the comparison that matters is tokens/s at each cache's own largest batch.

Filling: one real token goes through each layer's ``update`` (so transformers allocates the cache as it would),
then the slots up to the context get random keys and values and the counts move to the context; a compressed
cache's slots are all filled, as just before a prune. A step's cost depends on the shapes and the position, not
on the values, and a real prefill of hundreds of 32K-token sequences would take longer than the measurement.

TriAttention's statistics come from a calibration forward of random token ids (the weights are random anyway).
Results: ``kv_throughput.json`` in ``out`` (rewritten atomically after every row).
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..bench.measure import DTYPES, device_name, resolve_device, timed
from ..bench.throughput import is_oom
from .cache import CompressedCache
from .budgets import budget_tokens
from .evaluate import forward_with, full_kv_bytes, kv_bytes
from .model import random_llama
from .rope import head_dim_of
from .throughput_presets import COMPRESSED, MODELS, KVThroughputSettings, check_settings, variants

EAGER = ("dynamic", "static-hf")
WARM = 3                  # untimed steps first: an eager one, the capture, a replay


def slots_for(cache: str, context: int, budget: int | None, s: KVThroughputSettings) -> int:
    """Token slots one sequence holds while decoding (the growing cache: twice its length, old and new copy of
    one layer aside, is what ``cat`` needs at its peak; counted once here)."""
    if cache in COMPRESSED:
        return budget + s.slack
    return context + WARM + max(s.steps, s.eager_steps) + 1


def build_cache(model, name: str, batch: int, context: int, budget: int | None, s: KVThroughputSettings, stats):
    """An empty cache of kind ``name`` (see the module docstring) for ``batch`` sequences of ``context`` tokens."""
    from transformers import DynamicCache, StaticCache

    if name == "dynamic":
        return DynamicCache()
    if name in ("static-hf", "static"):
        return StaticCache(config=model.config, max_cache_len=slots_for(name, context, None, s))
    return CompressedCache(name, budget=budget, slack=s.slack, fixed=True,
                           **({"stats": stats} if name == "triattention" else {}))


@torch.no_grad()
def fill_cache(model, cache, batch: int, context: int) -> None:
    """One real token through every layer's ``update``, then random keys and values up to ``context`` tokens (a
    compressed cache: every slot, as just before a prune)."""
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    head_dim = head_dim_of(cfg)
    one = torch.zeros(batch, cfg.num_key_value_heads, 1, head_dim, device=model.device, dtype=model.dtype)
    for i in range(cfg.num_hidden_layers):
        if isinstance(cache, DynamicCache):
            kv = torch.randn(batch, cfg.num_key_value_heads, context, head_dim, device=model.device, dtype=model.dtype)
            cache.update(kv, torch.randn_like(kv), i)
            continue
        cache.update(one, one, i)
        layer = cache.layers[i]
        if isinstance(cache, StaticCache):
            layer.keys[:, :, :context].normal_()
            layer.values[:, :, :context].normal_()
            layer.cumulative_length.fill_(context)
        else:
            layer.fill_random(context)


def time_steps(model, cache, name: str, batch: int, context: int, s: KVThroughputSettings) -> dict:
    """Greedy one-token steps after ``WARM`` untimed ones: tok/s over the batch, ms a step, peak memory."""
    from .graphs import SlotDecoder

    device = model.device
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if name in EAGER:
        seen = context

        def run(n: int) -> None:
            nonlocal seen
            for _ in range(n):
                tok.copy_(forward_with(model, cache, tok, seen, logits_to_keep=1)[:, -1:].argmax(-1))
                seen += 1
        steps, graphs = s.eager_steps, False
    else:
        graphs = device.type == "cuda"
        decoder = SlotDecoder(model, cache, context, tok, graphs=graphs)
        run, steps = decoder.run, s.steps
    with torch.no_grad():
        run(WARM)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(device, lambda: run(steps))
    row = {"path": "graph" if graphs else "eager", "steps": steps, "ms_per_step": 1000 * seconds / steps,
           "tokens_per_s": batch * steps / seconds}
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def measure(model, name: str, fraction: float | None, context: int, batch: int, s: KVThroughputSettings,
            stats) -> dict:
    """One row: fill the cache, time a first prune (compressed caches), time the steps."""
    budget = budget_tokens(fraction, context) if fraction is not None else None
    row = {"cache": name, "budget_fraction": fraction, "budget_tokens": budget, "context": context, "batch": batch}
    cache = build_cache(model, name, batch, context, budget, s, stats)
    fill_cache(model, cache, batch, context)
    if name in COMPRESSED:
        row["prune_ms"] = 1000 * timed(model.device, lambda: [layer.prune() for layer in cache.layers])
    row["kv_bytes"] = kv_bytes(cache)
    row.update(time_steps(model, cache, name, batch, context, s))
    return row


def release_memory() -> None:
    """Free the last row's cache and graphs before the next row is sized: the decoder and its graphs hold each
    other in reference cycles, which only the collector frees (measured on an H100: without this, a row's
    free-memory estimate missed up to 47 GB that the row before still held)."""
    gc.collect()
    torch.cuda.empty_cache()


def largest_batch(model, name: str, context: int, budget: int | None, s: KVThroughputSettings) -> int:
    """The batch whose cache fills ``memory_fraction`` of the free memory (lowered on out-of-memory)."""
    release_memory()
    free, _ = torch.cuda.mem_get_info()
    per_seq = full_kv_bytes(model.config, slots_for(name, context, budget, s), 1, model.dtype)
    per_seq *= 1.15 if name == "dynamic" else 1.05     # the growing cache copies a layer while it appends
    return max(1, min(s.max_batch_cap, int(s.memory_fraction * free / per_seq)))


def run_kv_throughput(s: KVThroughputSettings, device: str | None, out: str | Path, progress: bool = True) -> dict:
    """Measure every row, writing ``out/kv_throughput.json`` after each; returns the results."""
    from tqdm.auto import tqdm

    from .calibration import calibrate

    check_settings(s)
    dev = resolve_device(device)
    if s.max_batch and dev.type != "cuda":
        raise ValueError("the max-batch search needs a GPU's memory; leave 'max' out of --batches on the CPU")
    dtype = DTYPES[s.dtype]
    model = random_llama(MODELS[s.model], dev, dtype)
    stats = None
    if "triattention" in [*s.caches, *s.max_batch_caches]:
        ids = torch.randint(0, model.config.vocab_size, (1, 4096 if dev.type == "cuda" else 256),
                            generator=torch.Generator().manual_seed(2)).to(dev)
        stats = calibrate(model, ids, f"random-weight {s.model}")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {"settings": asdict(s), "model_config": MODELS[s.model], "device": device_name(dev),
               "torch": torch.__version__, "weights_bytes": weights,
               "kv_bytes_per_token": full_kv_bytes(model.config, 1, 1, dtype), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "rows": []}
    import transformers
    results["transformers"] = transformers.__version__
    path = Path(out) / "kv_throughput.json"
    work = [(c, label, name, frac) for c in s.contexts for label in [*s.batches, *(["max"] if s.max_batch else [])]
            for name, frac in variants(s, label)]
    for context, label, name, frac in tqdm(work, desc="kv throughput", disable=not progress):
        budget = budget_tokens(frac, context) if frac is not None else None
        batch = label if label != "max" else largest_batch(model, name, context, budget, s)
        for attempt in range(4):
            try:
                row = measure(model, name, frac, context, batch, s, stats)
                break
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                row = {"cache": name, "budget_fraction": frac, "context": context, "batch": batch,
                       "error": "out of memory"}
            if label != "max":
                break
            batch = max(1, int(batch * 0.8))          # after the except block: the failed attempt's tensors are free
            release_memory()
        row["batch_label"] = label
        results["rows"].append(row)
        atomic_write_json(path, results)
        if dev.type == "cuda":
            release_memory()
    add_ratios(results["rows"])
    atomic_write_json(path, results)
    return results


def add_ratios(rows: list[dict]) -> None:
    """``vs_static``: tok/s over the ``static`` row's at the same context and batch label (at ``max``: each at its
    own largest batch)."""
    base = {(r["context"], r["batch_label"]): r["tokens_per_s"] for r in rows
            if r["cache"] == "static" and "tokens_per_s" in r}
    for r in rows:
        ref = base.get((r["context"], r["batch_label"]))
        if ref and "tokens_per_s" in r:
            r["vs_static"] = r["tokens_per_s"] / ref


def summary(results: dict) -> str:
    """A markdown table of the rows."""
    lines = ["| context | batch | cache | budget | tok/s | ms/step | vs static | prune ms | KV GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['batch']} | {r['cache']} | {r.get('budget_fraction') or ''} | "
                         f"{r['error']} | | | | |")
            continue
        lines.append(f"| {r['context']} | {r['batch']}{' (max)' if r['batch_label'] == 'max' else ''} | {r['cache']} | "
                     f"{r['budget_fraction'] or ''} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                     f"{r.get('vs_static', float('nan')):.2f} | {r.get('prune_ms', float('nan')):.1f} | "
                     f"{r['kv_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)
