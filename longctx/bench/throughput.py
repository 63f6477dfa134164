"""``longctx throughput``: generation speed of each mechanism, as a server sees it.

For every mechanism x context x batch size: decode tokens/s summed over the batch through each *path* —
``eager`` (``GPT.step`` on the growing states, the reference), ``static`` (static states, eager launches) and
``graph`` (static states, each step replayed from a CUDA graph: ``longctx.decoding``) — with the step's time
next to its *bandwidth bound*: the bytes a step must read (weights + the decoding state, ``state_bytes``) over
the copy bandwidth measured in the same run. With ``max`` among the batches, the largest batch whose state fits
in the GPU's memory at each context is found (an estimate from ``state_bytes``, lowered on out-of-memory) and
measured through the graph path: the throughput a fixed-state mechanism exists for.

Filling the state: ``prefill`` runs every context token through the model (timed); ``synthetic`` runs a real
prefill of ``prefix`` tokens and then moves the position to the context, the growing buffers (the KV cache,
RayTention's ids) getting random content in between. A decode step's cost depends on the state's shapes and the
position, not on its values, and a real prefill of thousands of 128K-token sequences would take longer than the
measurement it serves.

Results: ``throughput.json`` (rewritten atomically after every row; a finished row is not measured again when
the same command runs again), ``throughput.png`` (tok/s against context, log-log, one line per mechanism).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import atomic_write, atomic_write_json, not_a_result, read_json_result
from ..decoding import greedy_decoder, warm_steps
from ..model import GPT, GPTConfig
from ..cli import out_of_memory
from .measure import DTYPES, device_name, fill_static, resolve_device, sync, timed
from .throughput_presets import PATHS, ThroughputSettings, check_settings

def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, bytes read plus written (the bound's denominator)."""
    n = (256 << 20) if device.type == "cuda" else (32 << 20)
    src, dst = torch.randn(n // 4, device=device), torch.empty(n // 4, device=device)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def build_model(s: ThroughputSettings, mechanism: str, device: torch.device) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_kv_head=s.n_kv_head,
                    mechanism=mechanism, mechanism_options=dict(s.mechanism_options.get(mechanism, {})))
    return GPT(cfg).to(device=device, dtype=DTYPES[s.dtype]).eval()


@torch.no_grad()
def fill_state(model: GPT, state, context: int, s: ThroughputSettings, gen: torch.Generator) -> float:
    """Bring ``state`` to ``context`` tokens (``s.fill``); returns the seconds of the real prefill."""
    real = context if s.fill == "prefill" else min(context, s.prefix, max(1, s.prefix_tokens // state.batch))
    chunk = min(s.prefill_chunk, max(1, s.call_tokens // state.batch))
    return fill_static(model, state, context, real, chunk, gen)


@torch.no_grad()
def time_path(model: GPT, state, path: str, steps: int) -> dict:
    """Decode ``steps`` greedy tokens after warming up, through ``path``; the state advances."""
    device = state.pos.device
    tok = torch.zeros(state.batch, 1, dtype=torch.long, device=device)
    if path == "eager":
        eager = model.eager_state(state)

        def run(n: int) -> None:
            nonlocal eager
            for _ in range(n):
                logits, eager = model.step(tok, eager)
                tok.copy_(logits[:, -1:].argmax(-1))
        warm = 2
    else:
        run, warm = greedy_decoder(model, state, tok, path == "graph"), warm_steps(model, state.seen)
    run(warm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(device, lambda: run(steps))
    row = {"ms_per_step": 1000 * seconds / steps, "tokens_per_s": state.batch * steps / seconds}
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or out_of_memory(err)


def measure_row(model: GPT, s: ThroughputSettings, context: int, batch: int, paths: list, bandwidth: float,
                gen: torch.Generator, raise_oom: bool = False) -> dict:
    """One context x batch: every path from one filled state; a path out of memory is recorded as such (raised
    with ``raise_oom``)."""
    dtype = DTYPES[s.dtype]
    capacity = context + len(paths) * (warm_steps(model, context) + s.steps) + 8
    state = model.init_static_state(batch, capacity)
    row = {"context": context, "batch": batch, "fill": s.fill}
    row["prefill_seconds"] = fill_state(model, state, context, s, gen)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = model.state_bytes(context, batch, dtype)
    row.update(weights_bytes=weights, state_bytes=state_bytes,
               bound_ms=1000 * (weights + state_bytes) / bandwidth)
    for path in paths:
        try:
            r = time_path(model, state, path, s.steps)
            r["bound_ratio"] = r["ms_per_step"] / row["bound_ms"]
        except RuntimeError as err:
            if raise_oom or not is_oom(err):
                raise
            r = {"error": "out of memory"}
        row[path] = r
        if state.pos.is_cuda:
            torch.cuda.empty_cache()
    return row


def largest_batch(model: GPT, s: ThroughputSettings, context: int) -> int:
    """The batch whose decoding state (``state_bytes``, 1.25x for what a step adds) fills ``memory_fraction`` of
    the GPU's free memory."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    per_seq = 1.25 * model.state_bytes(context + 1024, 1, DTYPES[s.dtype]) + 64 * model.config.n_embd * 4
    return max(1, min(s.max_batch_cap, int(s.memory_fraction * free / per_seq)))


def run_throughput(s: ThroughputSettings, device: str | None, out: str | Path, progress: bool = True) -> dict:
    """Measure every row (resuming from ``out/throughput.json``), write the JSON and the plot; returns the
    results."""
    from tqdm.auto import tqdm

    check_settings(s)
    dev = resolve_device(device)
    if "graph" in s.paths and dev.type != "cuda":
        raise ValueError("the graph path needs CUDA; on the CPU use --paths eager,static")
    if s.max_batch and dev.type != "cuda":
        raise ValueError("the max-batch search needs a GPU's memory; leave 'max' out of --batches on the CPU")
    out = Path(out)
    path = out / "throughput.json"
    what = "a `longctx throughput` result"
    results = read_json_result(path, what)
    results = {} if results is None else results
    if not isinstance(results, dict) or not isinstance(results.get("rows", []), list) or not all(
            isinstance(r, dict) and {"mechanism", "context", "batch_label"} <= set(r) for r in results.get("rows", [])):
        raise not_a_result(path, what, "no settings and rows of mechanism, context and batch")
    if results.get("settings") not in (None, asdict(s)):
        raise ValueError(f"{path} holds a run with other settings; choose another --out")
    results.update(settings=asdict(s), device=device_name(dev), torch=torch.__version__)
    results.setdefault("copy_bandwidth_bytes_per_s", copy_bandwidth(dev))
    rows = results.setdefault("rows", [])
    done = {(r["mechanism"], r["context"], r["batch_label"]) for r in rows}
    gen = torch.Generator().manual_seed(0)
    work = [(m, c, b) for m in s.mechanisms for c in s.contexts for b in [*s.batches, *(["max"] if s.max_batch else [])]]
    for mech, context, label in tqdm(work, desc="throughput", disable=not progress):
        if (mech, context, label) in done:
            continue
        model = build_model(s, mech, dev)
        row = {"mechanism": mech, "batch_label": label}
        limit = s.history_limit.get(mech)
        if limit is not None and (label == "max" or label * context > limit):
            row.update(context=context, skipped=f"{mech} reads its whole history every step: batch x context above "
                                                f"{limit} tokens is not measured")
            rows.append(row)
            continue
        batch = label if label != "max" else largest_batch(model, s, context)
        paths = [p for p in s.paths if p != "eager" or batch <= s.eager_max_batch]
        if label == "max":
            paths = ["graph"] if "graph" in s.paths else paths[-1:]
        for attempt in range(4):
            try:
                row.update(measure_row(model, s, context, batch, paths, results["copy_bandwidth_bytes_per_s"], gen,
                                       raise_oom=label == "max"))
                break
            except RuntimeError as err:
                oom = is_oom(err)
                if not oom or label != "max" or attempt == 3:
                    row.update(context=context, batch=batch, error="out of memory" if oom else str(err))
                    break
            batch = max(1, int(batch * 0.8))         # after the except block: the failed attempt's tensors are free
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        atomic_write_json(path, results)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    plot_throughput(results, out / "throughput.png")
    return results


def summary(results: dict) -> str:
    """A markdown table of the rows: tok/s of every path, the step against its bandwidth bound."""
    paths = [p for p in PATHS if any(p in r for r in results["rows"])]
    lines = ["| mechanism | context | batch | " + " | ".join(f"{p} tok/s (ms, x bound)" for p in paths) + " |",
             "|---|---|---|" + "---|" * len(paths)]
    for r in results["rows"]:
        cells = []
        for p in paths:
            x = r.get(p, {})
            cells.append(f"{x['tokens_per_s']:,.0f} ({x['ms_per_step']:.2f}, {x['bound_ratio']:.1f}x)"
                         if "tokens_per_s" in x else x.get("error", ""))
        note = r.get("skipped") or r.get("error") or ""
        lines.append(f"| {r['mechanism']} | {r['context']} | {r.get('batch', r['batch_label'])} | "
                     + " | ".join(cells) + " |" + (f" {note}" if note else ""))
    return "\n".join(lines)


def plot_throughput(results: dict, path: Path) -> None:
    """tok/s against context, log-log, one line per mechanism: batch 1 (graph path where measured, else the
    last path) and the largest batch that fits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("batch 1", lambda r: r["batch_label"] == 1), ("largest batch that fits", lambda r: r["batch_label"] == "max")]
    panels = [(t, f) for t, f in panels if any(f(r) for r in results["rows"])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, pick) in zip(axes[0], panels):
        for mech in dict.fromkeys(r["mechanism"] for r in results["rows"]):
            pts = []
            for r in results["rows"]:
                if r["mechanism"] == mech and pick(r):
                    best = next((r[p] for p in ("graph", "static", "eager") if "tokens_per_s" in r.get(p, {})), None)
                    if best is not None:
                        pts.append((r["context"], best["tokens_per_s"]))
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=mech)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (whole batch)",
               title=f"{title} — {results['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
