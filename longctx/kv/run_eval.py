"""``longctx kv-eval``: needle retrieval, perplexity, KV memory and decode speed per method × budget.

Work is split into cells — one needle prompt (length, depth, trial) or one perplexity window (length, sample) —
each evaluated for every method and budget on one prefill. ``results.json`` is rewritten (atomically) after
every cell; a rerun with the same settings skips the cells already there, so more lengths, depths, trials or
samples can be added later; a rerun with other settings on the same folder is refused (it would throw them away).
"""
from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..bench.measure import DTYPES, device_name
from ..data import load_text
from .calibration import QueryStats, calibrate, load_stats, save_stats
from .budgets import budget_label, budget_tokens, check_eval_numbers
from .evaluate import (METHODS, needs_queries, bookkeeping_bytes, compressed_caches, continuation_nll, greedy_answer,
                       kv_bytes, prefill)
from .needle import answer_correct, corpus_region, make_needle_sample, take_tokens
from .presses import PRESSES, kvpress_status, press_prefill

STATS_FILE = "triattention_stats.safetensors"
#: When the cache is compressed: after the context (the question comes later) or after the question too.
PROTOCOLS = {
    "question-agnostic": "the context (haystack) is prefilled and compressed; the question is fed afterwards",
    "question-aware": "the context and the question, all but its last token, are prefilled and compressed; the "
                      "last token and the answer go through the compressed cache",
}


def _check_settings(methods, budgets, lengths, depths, trials, ppl_samples, ppl_tokens, ppl_chunk, answer_tokens,
                    max_positions: int | None) -> None:
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
    if not methods:
        raise ValueError("--methods: no method given")
    check_eval_numbers(budgets, lengths, depths, trials, ppl_samples, ppl_tokens, ppl_chunk, answer_tokens,
                       max_positions)


def stats_id(stats: QueryStats) -> str:
    """Short hash of the statistics' values (results computed with other stats are not resumed)."""
    h = hashlib.sha256()
    for t in (torch.view_as_real(stats.mu), stats.abs_mean):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def get_stats(model, tokenizer, stats_path: str | Path | None, out_dir: Path, calib_tokens: int, text: str,
              model_name: str, log=print) -> QueryStats:
    """``--stats FILE`` (checked against the model), else the cached ``out_dir/triattention_stats.safetensors``,
    else a calibration on the corpus's calibration region (disjoint from every eval text), saved there."""
    if stats_path is not None:
        path = Path(stats_path)
        if not path.is_file():
            raise FileNotFoundError(f"--stats file not found: {path}")
        return load_stats(path, model.config)
    path = out_dir / STATS_FILE
    if path.is_file():
        try:
            return load_stats(path, model.config)
        except ValueError as e:
            log(f"kv-eval: recalibrating ({e})")
    if calib_tokens < 1:
        raise ValueError(f"--calib-tokens must be >= 1, got {calib_tokens}")
    ids = take_tokens(tokenizer, corpus_region(text, "calibration"), 0, calib_tokens)[None]
    start = time.perf_counter()
    stats = calibrate(model, ids, model_name=model_name)
    save_stats(stats, path)
    log(f"kv-eval: calibrated TriAttention on {calib_tokens} tokens of the calibration region in "
        f"{time.perf_counter() - start:.0f}s -> {path}")
    return stats


def _entry(method, budget, length) -> dict:
    if budget is None:
        return {"method": method, "budget": "full", "budget_tokens": None}
    return {"method": method, "budget": budget_label(budget), "budget_tokens": budget_tokens(budget, length)}


def _cache_stats(cache) -> dict:
    layer = cache.layers[0]
    return {"kv_bytes": kv_bytes(cache), "bookkeeping_bytes": bookkeeping_bytes(cache),
            "stored_tokens": int(layer.keys.shape[-2]), "n_pruned": int(getattr(layer, "n_pruned", 0))}


def _each_cache(model, pre, context_ids, methods, budgets, length, stats, kvpress_on):
    """Yield (entry, cache, next_logits) for every configuration, compressed caches replayed from ``pre``."""
    for method in methods:
        if method == "full":
            yield _entry(method, None, length), pre.full_cache(), pre.next_logits
            continue
        tokens = sorted({budget_tokens(b, length) for b in budgets})
        caches = compressed_caches(pre, model, method, tokens, stats)
        try:
            for b in budgets:
                yield _entry(method, b, length), caches[budget_tokens(b, length)], pre.next_logits
        finally:
            for c in caches.values():
                c.detach()
    if kvpress_on:
        for name in PRESSES:
            for b in budgets:
                entry = _entry(name, b, length)
                try:
                    cache, logits, seconds = press_prefill(model, name, context_ids, entry["budget_tokens"])
                except Exception as e:  # noqa: BLE001 — an optional third-party press failing is a result
                    yield {**entry, "error": f"{type(e).__name__}: {e}"}, None, None
                    continue
                yield {**entry, "prefill_seconds": seconds}, cache, logits


def needle_cell(model, tokenizer, lines, length, depth, trial, seed, methods, budgets, stats, answer_tokens,
                kvpress_on, protocol: str = "question-agnostic") -> dict:
    rng = random.Random(f"{seed}/needle/{length}/{depth}/{trial}")
    sample = make_needle_sample(tokenizer, lines, length, depth, rng)
    if protocol == "question-aware":      # every answer token is still predicted through the compressed cache
        sample.context_ids = torch.cat([sample.context_ids, sample.question_ids[:, :-1]], dim=1)
        sample.question_ids = sample.question_ids[:, -1:]
    pre = prefill(model, sample.context_ids, capture_queries=any(map(needs_queries, methods)))
    cell = {"task": "needle", "length": length, "depth": depth, "trial": trial, "key": sample.key,
            "answer": sample.answer, "prompt_tokens": sample.length, "needle_depth": sample.needle_depth,
            "prefill_seconds": pre.seconds, "results": {}}
    eos = tokenizer.eos_token_id
    for entry, cache, _ in _each_cache(model, pre, sample.context_ids, methods, budgets, length, stats, kvpress_on):
        if cache is not None:
            out = greedy_answer(model, cache, sample.question_ids, pre.length, answer_tokens, eos)
            text = tokenizer.decode(out.pop("tokens"), skip_special_tokens=True)
            entry.update(output=text, correct=answer_correct(text, sample.answer), **out, **_cache_stats(cache))
        cell["results"][_key(entry)] = entry
    return cell


def ppl_cell(model, tokenizer, lines, length, sample_idx, seed, methods, budgets, stats, ppl_tokens, chunk,
             kvpress_on) -> dict:
    rng = random.Random(f"{seed}/ppl/{length}/{sample_idx}")
    ids = take_tokens(tokenizer, lines, rng.randrange(len(lines)), length)[None]
    context, continuation = ids[:, :length - ppl_tokens], ids[:, length - ppl_tokens:]
    pre = prefill(model, context, capture_queries=any(map(needs_queries, methods)))
    cell = {"task": "ppl", "length": length, "sample": sample_idx, "context_tokens": context.shape[1],
            "continuation_tokens": ppl_tokens, "prefill_seconds": pre.seconds, "results": {}}
    for entry, cache, logits in _each_cache(model, pre, context, methods, budgets, length, stats, kvpress_on):
        if cache is not None:
            entry.update(**continuation_nll(model, cache, logits, continuation, pre.length, chunk),
                         **_cache_stats(cache))
        cell["results"][_key(entry)] = entry
    return cell


def _key(entry: dict) -> str:
    return entry["method"] if entry["budget"] == "full" else f"{entry['method']}@{entry['budget']}"


def run_kv_eval(model_dir: str | None = None, stats_path: str | None = None, methods=METHODS,
                budgets=(0.1, 0.25, 0.5), lengths=(4096,), depths=(0.1, 0.3, 0.5, 0.7, 0.9), trials: int = 2,
                ppl_samples: int = 2, ppl_tokens: int = 256, ppl_chunk: int = 16, answer_tokens: int = 10,
                calib_tokens: int = 4096, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                out_dir: str | Path = "kv_out", kvpress: str = "auto", protocol: str = "question-agnostic",
                progress: bool = True, model=None,
                tokenizer=None, model_name: str | None = None) -> dict:
    """Run the evaluation; write ``results.json``, ``report.md``, ``needle_heatmap.png``,
    ``accuracy_vs_budget.png`` into ``out_dir``. ``model, tokenizer`` may be passed instead of ``model_dir``."""
    from .report import write_report

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    methods, budgets = list(methods), list(budgets)
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if kvpress not in ("auto", "off"):
        raise ValueError(f"--kvpress must be 'auto' or 'off', got {kvpress!r}")
    _check_settings(methods, budgets, lengths, depths, trials, ppl_samples, ppl_tokens, ppl_chunk, answer_tokens,
                    None)
    if stats_path is not None and not Path(stats_path).is_file():
        raise FileNotFoundError(f"--stats file not found: {stats_path}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device")
    if model is None:
        from .model import DEFAULT_MODEL_NAME, load_model

        model, tokenizer = load_model(model_dir, device=device, dtype=DTYPES[dtype])
        model_name = model_name or (str(model_dir) if model_dir else DEFAULT_MODEL_NAME)
    elif tokenizer is None:
        raise ValueError("a model passed in needs its tokenizer")
    model_name = model_name or str(getattr(model.config, "_name_or_path", "") or "model")
    _check_settings(methods, budgets, lengths, depths, trials, ppl_samples, ppl_tokens, ppl_chunk, answer_tokens,
                    getattr(model.config, "max_position_embeddings", None))
    out = Path(out_dir)
    text = load_text()
    stats = get_stats(model, tokenizer, stats_path, out, calib_tokens, text, model_name, log) \
        if "triattention" in methods else None
    kv_ok, kv_version = kvpress_status()
    kvpress_on = kv_ok and kvpress == "auto"
    settings = {"model": model_name, "dtype": dtype, "methods": methods, "budgets": [budget_label(b) for b in budgets],
                "seed": seed, "answer_tokens": answer_tokens, "ppl_tokens": ppl_tokens, "ppl_chunk": ppl_chunk,
                "stats": stats_id(stats) if stats is not None else None, "kvpress": kv_version if kvpress_on else None,
                "protocol": protocol}
    results = {
        "meta": {"command": " ".join(["longctx"] + sys.argv[1:]) if sys.argv[0].endswith("longctx")
                 else " ".join(sys.argv), "device": str(model.device), "device_name": device_name(model.device),
                 "torch": torch.__version__, "python": platform.python_version(),
                 "transformers": __import__("transformers").__version__,
                 "kvpress": kv_version if kv_ok else f"not available ({kv_version})",
                 "stats_source": str(stats_path) if stats_path else (str(out / STATS_FILE) if stats else None),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0},
        "settings": settings,
        "plan": {"lengths": lengths, "depths": depths, "trials": trials, "ppl_samples": ppl_samples},
        "cells": {},
    }
    previous = out / "results.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("settings") == settings:
            results["cells"] = old.get("cells", {})
            results["meta"]["seconds"] = old["meta"].get("seconds", 0.0)
            results["meta"]["started"] = old["meta"].get("started", results["meta"]["started"])
            if results["cells"]:
                log(f"kv-eval: resuming, {len(results['cells'])} cells already done in {previous}")
        else:   # continuing would throw the earlier cells away
            differ = sorted(k for k in settings.keys() | old.get("settings", {}).keys()
                            if settings.get(k) != old.get("settings", {}).get(k))
            said = "; ".join(f"{k} {old.get('settings', {}).get(k)!r} there, {settings.get(k)!r} now"
                             for k in differ[:4])
            raise ValueError(f"{previous} holds a run with other settings ({said}): run with the same settings to "
                             "continue it, or choose another --out")

    needle_lines = corpus_region(text, "needle")
    ppl_lines = corpus_region(text, "perplexity")
    todo = [(f"needle/L={n}/depth={d:g}/trial={t}", ("needle", n, d, t)) for n in lengths for d in depths
            for t in range(trials)]
    todo += [(f"ppl/L={n}/sample={s}", ("ppl", n, s)) for n in lengths for s in range(ppl_samples)]
    for key, spec in todo:
        if key in results["cells"]:
            continue
        start = time.perf_counter()
        if spec[0] == "needle":
            cell = needle_cell(model, tokenizer, needle_lines, spec[1], spec[2], spec[3], seed, methods, budgets,
                               stats, answer_tokens, kvpress_on, protocol)
            summary = " ".join(f"{k}:{'+' if e.get('correct') else '-'}" for k, e in cell["results"].items())
        else:
            cell = ppl_cell(model, tokenizer, ppl_lines, spec[1], spec[2], seed, methods, budgets, stats, ppl_tokens,
                            ppl_chunk, kvpress_on)
            summary = " ".join(f"{k}:{e['nll_sum'] / e['n_tokens']:.3f}" for k, e in cell["results"].items()
                               if "nll_sum" in e)
        cell["seconds"] = time.perf_counter() - start
        results["cells"][key] = cell
        results["meta"]["seconds"] += cell["seconds"]
        atomic_write_json(previous, results)
        log(f"kv-eval: {key} ({cell['seconds']:.0f}s, prefill {cell['prefill_seconds']:.0f}s) {summary}")
    write_report(results, out)
    return results
