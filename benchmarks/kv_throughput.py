"""Decode throughput and measured KV bytes: full cache vs TriAttention (and StreamingLLM) on a pretrained model.

GPU run (the lead's; a random-weight model shaped like SmolLM2-135M-Instruct, since the weights can't be carried
to the GPU machine; bf16, 25% budget; every batch × context combination):

    PYTHONPATH=. python benchmarks/kv_throughput.py --device cuda --config benchmarks/configs/smollm2-135m.json \
        --batch 16,64 --context 4096,8192 --decode-steps 256 --out benchmarks/results --out-name kv_throughput_gpu.json

CPU smoke test (tiny random Llama, seconds): ``python benchmarks/kv_throughput.py --device cpu --tiny``.

With the pretrained model (default, or ``--model``) each row of the batch is a different window of the corpus's
perplexity region (TriAttention is calibrated on the calibration region, or ``--stats``). With random weights
(``--config``, ``--tiny``) the prompts and TriAttention's calibration text are random token ids: speed and memory
are meaningful, output quality is not. Per method: one prefill of ``batch × context`` tokens (the compressed
caches prune right after it), then ``--decode-steps`` greedy one-token steps, timed (CUDA-synchronised).
The caches prune again every 128 tokens while decoding, so the timing includes that cost. A combination that
runs out of CUDA memory gets a row with ``"error": "out of memory"``. Results go to ``<out>/<out-name>``
(default ``kv_throughput.json``, ``kv_throughput_tiny.json`` with ``--tiny``), written atomically.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

from longctx.atomic import atomic_write_json
from longctx.attention import GROWING_KEYS_BACKENDS
from longctx.bench.measure import DTYPES, device_name, sync
from longctx.cli import numbers
from longctx.data import load_text
from longctx.kv import CompressedCache, calibrate, load_stats
from longctx.kv.evaluate import bookkeeping_bytes, budget_tokens, cache_extras, forward_with, full_kv_bytes, kv_bytes
from longctx.kv.needle import corpus_region, take_tokens

TINY_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 4096}


def random_llama(config: dict, device, dtype):
    """``LlamaForCausalLM`` with random weights (seed 0) from a transformers config dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.get("model_type", "llama") != "llama":
        raise SystemExit(f"--config: model_type must be 'llama', got {config['model_type']!r}")
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def run_method(model, method: str, prompts: torch.Tensor, budget: int, stats, decode_steps: int) -> dict:
    """One timed prefill + decode with a fresh cache; a compressed cache's hooks are removed even on failure.
    Every method runs on the same SDPA backends, without cuDNN: a full cache grows by a token each step and cuDNN
    builds a plan for every new key length (47-68 ms each on an H100), which made the full cache look 2-4x
    slower than the fixed-size compressed caches in this benchmark's first GPU run."""
    with sdpa_kernel(GROWING_KEYS_BACKENDS):
        return _run_method(model, method, prompts, budget, stats, decode_steps)


def _run_method(model, method: str, prompts: torch.Tensor, budget: int, stats, decode_steps: int) -> dict:
    if method == "full":
        from transformers import DynamicCache
        return timed_decode(model, method, DynamicCache(), prompts, budget, decode_steps)
    cache = CompressedCache(method, budget=budget, **cache_extras(method, model, stats))
    try:
        return timed_decode(model, method, cache, prompts, budget, decode_steps)
    finally:
        cache.detach()


def timed_decode(model, method: str, cache, prompts: torch.Tensor, budget: int, decode_steps: int) -> dict:
    device = model.device
    batch, context = prompts.shape
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    logits = forward_with(model, cache, prompts, 0, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - start
    tok = logits[:, -1:].argmax(-1)
    seen = context
    for _ in range(2):                   # warm-up steps, not timed
        tok = forward_with(model, cache, tok, seen, logits_to_keep=1)[:, -1:].argmax(-1)
        seen += 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(decode_steps):
        tok = forward_with(model, cache, tok, seen, logits_to_keep=1)[:, -1:].argmax(-1)
        seen += 1
    sync(device)
    seconds = time.perf_counter() - start
    out = {"method": method, "budget_tokens": None if method == "full" else budget, "batch": batch,
           "context": context, "tokens_seen": seen, "prefill_seconds": prefill_s,
           "decode_steps": decode_steps, "decode_seconds": seconds,
           "decode_tokens_per_s": batch * decode_steps / seconds, "ms_per_step": 1000 * seconds / decode_steps,
           "kv_bytes": kv_bytes(cache), "full_kv_bytes_formula": full_kv_bytes(model.config, seen, batch, model.dtype),
           "stored_tokens": int(cache.layers[0].keys.shape[-2])}
    if method != "full":
        out["bookkeeping_bytes"] = bookkeeping_bytes(cache)
        out["n_pruned"] = cache.layers[0].n_pruned
    if device.type == "cuda":
        out["peak_allocated_bytes_decoding"] = torch.cuda.max_memory_allocated(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="tiny random Llama and small sizes (smoke test)")
    which.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct)")
    which.add_argument("--config", help="transformers Llama config JSON: random weights, random token prompts")
    p.add_argument("--stats", help="TriAttention stats file (default: calibrate on the calibration region)")
    p.add_argument("--methods", default="full,triattention,streamingllm")
    p.add_argument("--batch", help="comma list, e.g. 16,64 (default 16; 4 with --tiny)")
    p.add_argument("--context", help="comma list, e.g. 4096,8192 (default 4096; 512 with --tiny)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the context kept (default 0.25)")
    p.add_argument("--decode-steps", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--out-name", help="file name in --out (default kv_throughput.json, kv_throughput_tiny.json "
                                      "with --tiny)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu --tiny for the smoke test)")
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget must be a fraction in (0, 1], got {args.budget}")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    try:
        batches = numbers(args.batch, "--batch", int) if args.batch else [4 if args.tiny else 16]
        contexts = numbers(args.context, "--context", int) if args.context else [512 if args.tiny else 4096]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if min(batches + contexts) < 1:
        raise SystemExit("--batch and --context must be >= 1")
    steps = args.decode_steps or (160 if args.tiny else 512)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    random_weights = args.tiny or args.config is not None
    if random_weights:
        model = random_llama(TINY_CONFIG if args.tiny else json.loads(Path(args.config).read_text()), device, dtype)
        name = "tiny random Llama" if args.tiny else f"random-weight Llama ({Path(args.config).name})"
        vocab = model.config.vocab_size

        def prompts_for(batch: int, context: int) -> torch.Tensor:
            return torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1))

        calib = torch.randint(0, vocab, (1, 512 if args.tiny else 4096), generator=torch.Generator().manual_seed(2))
    else:
        from longctx.kv.model import DEFAULT_MODEL_NAME, load_model

        model, tokenizer = load_model(args.model, device=str(device), dtype=dtype)
        name = args.model or DEFAULT_MODEL_NAME
        text = load_text()
        lines = corpus_region(text, "perplexity")

        def prompts_for(batch: int, context: int) -> torch.Tensor:
            return torch.stack([take_tokens(tokenizer, lines, i * len(lines) // batch, context) for i in range(batch)])

        calib = None if args.stats else take_tokens(tokenizer, corpus_region(text, "calibration"), 0, 4096)[None]
    stats = None
    if "triattention" in methods:
        stats = load_stats(args.stats, model.config) if args.stats else calibrate(model, calib, name)
    rows = []
    for batch in batches:
        for context in contexts:
            prompts = prompts_for(batch, context).to(device)
            budget = budget_tokens(args.budget, context)
            group = []
            for method in methods:
                try:
                    r = run_method(model, method, prompts, budget, stats, steps)
                except torch.cuda.OutOfMemoryError:
                    r = {"method": method, "batch": batch, "context": context, "error": "out of memory"}
                free_memory(device)
                group.append(r)
                if "error" in r:
                    print(f"{method:>13}: out of memory (batch {batch}, context {context})", flush=True)
                    continue
                print(f"{method:>13}: {r['decode_tokens_per_s']:10.1f} tok/s  ({r['ms_per_step']:.2f} ms/step, "
                      f"batch {batch}, context {context}), KV {r['kv_bytes'] / 2**20:9.1f} MiB held (full would be "
                      f"{r['full_kv_bytes_formula'] / 2**20:.1f} MiB), prefill {r['prefill_seconds']:.2f}s",
                      flush=True)
            full = next((r for r in group if r["method"] == "full" and "error" not in r), None)
            if full is not None:
                for r in group:
                    if "error" not in r:
                        r["speedup_vs_full"] = r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                        r["kv_ratio_vs_full"] = r["kv_bytes"] / full["kv_bytes"]
            rows += group
    result = {"meta": {"command": " ".join(sys.argv), "model": name, "config": args.config,
                       "weights": ("random (torch.manual_seed(0)): speed and memory are meaningful, quality is not"
                                   if random_weights else "pretrained"),
                       "dtype": str(dtype).removeprefix("torch."), "device": device_name(device),
                       "torch": torch.__version__, "budget_fraction": args.budget,
                       "sdpa_backends": [b.name for b in GROWING_KEYS_BACKENDS],
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "rows": rows}
    out_name = args.out_name or ("kv_throughput_tiny.json" if args.tiny else "kv_throughput.json")
    path = atomic_write_json(Path(args.out) / out_name, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
