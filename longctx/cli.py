"""The ``longctx`` command."""
from __future__ import annotations

import argparse
import sys

from .bench.presets import PRESETS, check_decode_memory, settings_for


def numbers(text: str, option: str, kind=float) -> list:
    """``"1,2,3"`` as a list of ``kind`` (int or float); a clear error naming ``option`` otherwise."""
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{option}: expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise ValueError(f"{option}: no value given")
    return values


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is torch running out of memory: CUDA's message, or the CPU allocator's."""
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _defaults(field: str) -> str:
    """``"default: cpu 120, gpu 1000"``: a bench setting's value in each preset, read from ``PRESETS`` so that
    ``--help`` follows them (presets parted by ``;`` where a value is a comma-separated list)."""
    values = {name: getattr(s, field) for name, s in PRESETS.items()}
    lists = any(isinstance(v, (list, tuple)) for v in values.values())
    return "default: " + ("; " if lists else ", ").join(
        f"{name} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for name, v in values.items())


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="train a small GPT per mechanism on one corpus and compare them",
                       description="Train one small GPT per attention mechanism on the same tokens and report "
                                   "quality, recall, decode memory and speed (results.json, report.md, PNGs).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="sizes and budgets (default: cpu)")
    p.add_argument("--mechanisms", help="comma-separated names (default: every registered mechanism; the gpu "
                                        "preset leaves out ring, which is full attention on one GPU)")
    p.add_argument("--steps", type=int, help=f"text-model training steps ({_defaults('steps')})")
    p.add_argument("--recall-steps", type=int, help=f"recall-model training steps ({_defaults('recall_steps')})")
    p.add_argument("--n-layer", type=int, help=f"transformer blocks ({_defaults('n_layer')})")
    p.add_argument("--n-embd", type=int, help=f"model width, a multiple of --n-head ({_defaults('n_embd')})")
    p.add_argument("--n-head", type=int, help=f"attention (query) heads, a multiple of --n-kv-head "
                                              f"({_defaults('n_head')})")
    p.add_argument("--n-kv-head", type=int, help=f"key/value heads, a divisor of --n-head ({_defaults('n_kv_head')})")
    p.add_argument("--block-size", type=int, help=f"training context in tokens, text and recall "
                                                  f"({_defaults('block_size')})")
    p.add_argument("--batch-size", type=int, help=f"sequences per training step, text and recall "
                                                  f"({_defaults('batch_size')})")
    p.add_argument("--measure-contexts", help=f"comma-separated contexts at which decoding is measured "
                                              f"({_defaults('measure_contexts')})")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--seeds", help=f"comma-separated seeds; each model is trained once per seed "
                                   f"({_defaults('seeds')})")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--data", help="a UTF-8 text file to train on instead of the built-in corpus")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms for the whole run: on a GPU full attention and "
                        "RayTention then train bit for bit the same run to run (RayTention ~1.6x slower)")
    p.add_argument("--stop-after", type=float, help="start no new unit (a model's training, recall or decode "
                   "measurement) after this many seconds; exit 3; the same command again continues")
    p.set_defaults(func=_bench)


def _bench(args) -> None:
    lists = {k: numbers(v, f"--{k.replace('_', '-')}", int) for k, v in
             (("measure_contexts", args.measure_contexts), ("seeds", args.seeds)) if v is not None}
    if args.stop_after is not None and not args.stop_after > 0:   # before torch loads, as every number
        raise ValueError(f"--stop-after must be > 0 seconds, got {args.stop_after}")
    s = settings_for(args.preset, steps=args.steps, recall_steps=args.recall_steps, n_layer=args.n_layer,
                     n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                     block_size=args.block_size, batch_size=args.batch_size, deterministic=args.deterministic,
                     **lists)
    mechs = None
    if args.mechanisms is not None:
        mechs = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
        if not mechs:
            raise ValueError(f"--mechanisms: no mechanism named in {args.mechanisms!r}")
    check_decode_memory(s, mechs)   # sizes no GPU holds: refused now, not by an out-of-memory after training
    from .bench.run import run_bench

    if run_bench(s, mechs, args.device, args.out, args.data, args.preset, not args.no_progress,
                 args.stop_after) is None:
        raise SystemExit(3)


def _add_throughput(sub) -> None:
    from .bench.throughput_presets import FILLS, PATHS, PRESETS as TP_PRESETS
    p = sub.add_parser("throughput", help="decode tokens/s per mechanism x batch x context, eager and graph paths",
                       description="Decode throughput of a random-weight GPT per mechanism: tokens/s summed over the "
                                   "batch, the bandwidth bound, peak memory and the largest batch that fits "
                                   "(throughput.json, throughput.png).")
    p.add_argument("--preset", choices=sorted(TP_PRESETS), default="cpu",
                   help="model and sizes: cpu (tiny), gpu (the bench's GPU model), w512, gpt2 (default: cpu)")
    p.add_argument("--mechanisms", help="comma-separated names (default: full, sliding_window, power, power4, "
                                        "tensor_cache, raytention)")
    p.add_argument("--contexts", help="comma-separated context lengths in tokens")
    p.add_argument("--batches", help="comma-separated batch sizes; 'max' adds the largest that fits (GPU)")
    p.add_argument("--paths", help=f"comma-separated among {', '.join(PATHS)} (graph needs CUDA)")
    p.add_argument("--steps", type=int, help="timed decode steps per row")
    p.add_argument("--fill", choices=FILLS, help="prefill every context token, or a real prefix then a jump")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", default="throughput_out", help="output folder (default: throughput_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    hf = p.add_argument_group("a transformers Llama with each KV cache (longctx.kv.throughput)")
    hf.add_argument("--hf", choices=["tiny", "smollm2", "llama1b"],
                    help="random-weight Llama of this shape instead of a longctx GPT: tiny (CPU), smollm2 "
                         "(SmolLM2-135M), llama1b (16 layers, width 2048, 32/8 heads)")
    hf.add_argument("--caches", help="comma-separated among dynamic, static-hf, static, triattention, streamingllm, "
                                     "keynorm (default: dynamic, static-hf, static, triattention; at 'max': dynamic, "
                                     "static, triattention)")
    hf.add_argument("--budgets", help="comma-separated fractions of the context a compressed cache keeps "
                                      "(default 0.1,0.25,0.5; 0.5 with tiny)")
    p.set_defaults(func=_throughput)


def batch_options(text: str) -> dict:
    """``--batches`` of the throughput command: ``{"batches": [...], "max_batch": bool}`` ("max": the largest batch
    that fits)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    rest = [b for b in names if b != "max"]
    return {"max_batch": "max" in names, "batches": numbers(",".join(rest), "--batches", int) if rest else []}


def _throughput(args) -> None:
    if args.hf:
        return _kv_throughput(args)
    if args.caches or args.budgets:
        raise ValueError("--caches and --budgets go with --hf (a transformers model)")
    from .bench.throughput_presets import settings_for

    over = {"steps": args.steps, "fill": args.fill}
    if args.mechanisms:
        over["mechanisms"] = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    if args.contexts:
        over["contexts"] = numbers(args.contexts, "--contexts", int)
    if args.paths:
        over["paths"] = [p.strip() for p in args.paths.split(",") if p.strip()]
    if args.batches:
        over.update(batch_options(args.batches))
    s = settings_for(args.preset, **over)
    from .bench.throughput import run_throughput, summary
    print(summary(run_throughput(s, args.device, args.out, not args.no_progress)))


def _kv_throughput(args) -> None:
    from .kv.throughput_presets import settings_for

    for flag in ("mechanisms", "paths", "fill"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} is for longctx's own GPT; with --hf use --caches and --budgets")
    if args.preset != "cpu":
        raise ValueError("--preset is for longctx's own GPT; --hf names the model")
    over = {"steps": args.steps}
    if args.caches:   # the same caches at the fixed batches and, with 'max', at their largest batch
        over["caches"] = over["max_batch_caches"] = [c.strip() for c in args.caches.split(",") if c.strip()]
    if args.budgets:
        over["budgets"] = numbers(args.budgets, "--budgets", float)
    if args.contexts:
        over["contexts"] = numbers(args.contexts, "--contexts", int)
    if args.batches:
        over.update(batch_options(args.batches))
    s = settings_for(args.hf, **over)
    from .kv.throughput import run_kv_throughput, summary
    print(summary(run_kv_throughput(s, args.device, args.out, not args.no_progress)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description="Attention over long contexts.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_throughput(sub)
    _add_kv(sub)
    return parser


def _add_kv(sub) -> None:
    """``calibrate`` and ``kv-eval`` (their parser needs only argparse; running them needs the ``kv`` extra)."""
    from .kv.cli import add_commands
    add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted: finished results are kept in the output folder", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as e:   # OSError: a file named by an option cannot be read or written
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        print(f"longctx: error: out of memory ({str(e).splitlines()[0][:200]}): the sizes asked for do not fit this "
              "machine; lower them (--batch-size, --n-embd, --n-layer, --block-size, --measure-contexts, --contexts, "
              "--batches); finished results are kept in the output folder", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"longctx: error: {args.command} needs the package {e.name!r} (calibrate and kv-eval: pip install 'longctx[kv]')",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
