"""Decode-time measurements: state bytes actually held, peak device memory, decode speed."""
from __future__ import annotations

import math
import platform
import time
from functools import partial

import torch

from ..decoding import greedy_decoder, warm_steps
from ..mechanisms import tensor_bytes
from ..model import GPT
from .presets import DTYPE_NAMES

#: dtype names accepted by the bench and the KV evaluation.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings read a host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    """Seconds ``fn()`` takes, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def resolve_device(device: str | None) -> torch.device:
    """``--device`` of every command as a torch device: ``cpu``, ``cuda`` or ``cuda:N`` that torch can use (None: cuda
    when present); a ValueError naming the option otherwise, before any work."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses (recorded with every result)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def fill_static(model: GPT, state, context: int, real: int, chunk: int, gen: torch.Generator) -> float:
    """Bring the static ``state`` to ``context`` tokens: a prefill of ``real`` random tokens, ``chunk`` a call, then
    random content for the growing buffers up to ``context`` (a KV cache's slots, RayTention's ids: a decode step's
    cost depends on their length, not their values) and the position moved there. Returns the prefill's seconds."""
    device, vocab = state.pos.device, model.config.vocab_size

    def prefill() -> None:
        while state.seen < real:
            n = min(chunk, real - state.seen)
            model.prefill_static(torch.randint(0, vocab, (state.batch, n), generator=gen).to(device), state)
    seconds = timed(device, prefill)
    if context > state.seen:
        for layer in state.layers:
            if hasattr(layer, "fill_random"):
                layer.fill_random(state.seen, context, vocab)
        state.seen = context
        state.pos.fill_(context)
    return seconds


def project_prefill(segments: list[tuple[int, int, float]], seen: int, n: int) -> float:
    """Seconds to prefill from ``seen`` to ``n`` tokens, from the timed ``(start, end, seconds)`` segments so far.

    The cost per token is taken to grow as ``context ** a``: ``a`` fitted to the last two segments and kept in
    [0, 1] (1 = attention over every past token), ``a = 1`` after a single segment; 0 before any.
    """
    if not segments or n <= seen:
        return 0.0
    mid = [(a + b) / 2 for a, b, _ in segments[-2:]]
    rate = [t / max(b - a, 1) for a, b, t in segments[-2:]]
    a = 1.0
    if len(segments) > 1 and rate[0] > 0:
        a = min(1.0, max(0.0, math.log(rate[1] / rate[0]) / math.log(mid[1] / mid[0])))
    return rate[-1] * ((seen + n) / 2 / mid[-1]) ** a * (n - seen)


@torch.no_grad()
def measure_decode(model: GPT, contexts: list[int], decode_steps: int, batch: int = 1, prefill_chunk: int = 1024,
                   prefill_seconds: float = float("inf"), seed: int = 0) -> list[dict]:
    """At each of ``contexts``: a static decoding state (``GPT.init_static_state``) filled with random tokens
    through the prefill (``prefill_chunk`` tokens a call), then ``decode_steps`` greedy tokens timed on the fast
    path (each step replayed from a CUDA graph on a GPU where the model can be captured, static eager steps
    otherwise), after untimed warm-up steps (compilation, capture). A model whose state is the token ids alone
    (``GPT.state_from_ids``: RayTention) gets its ids drawn instead, running nothing (``state_filled`` says which).

    One row per context: the bytes the state really holds after the context (``state_bytes_measured``: its
    ``eager_state`` view, without the spare capacity) next to the mechanism's formula, decode tokens/s, and on
    CUDA the peak allocated bytes while decoding (weights + the static buffers + transients) with the bytes live
    before it. A context whose prefill would take longer than ``prefill_seconds`` (``project_prefill``) gets
    ``{"skipped": reason, "projected_seconds": ...}``, and so do all longer ones.
    """
    model.eval()
    p = next(model.parameters())
    device = p.device
    g = torch.Generator().manual_seed(seed)
    rows, skip, segments = [], None, []
    direct = model.state_is_token_ids
    graphs = device.type == "cuda" and model.capturable
    vocab = model.config.vocab_size
    for n in sorted(contexts):
        projected = project_prefill(segments, 0, n)
        if skip is None and projected > prefill_seconds:
            skip = {"skipped": f"prefill to {n} tokens projected at {projected:.0f} s > {prefill_seconds:.0f} s",
                    "projected_seconds": projected}
        if skip is not None:
            rows.append({"context": n, "batch": batch, **skip})
            continue
        warm = warm_steps(model, n)
        state = model.init_static_state(batch, n + warm + decode_steps)
        sync(device)
        start = time.perf_counter()
        fill_static(model, state, n, 0 if direct else n, prefill_chunk, g)   # ids alone: drawn, nothing run
        sync(device)
        segments.append((0, n, time.perf_counter() - start))
        held = tensor_bytes(model.eager_state(state).layers)
        decode = greedy_decoder(model, state, torch.randint(0, vocab, (batch, 1), generator=g).to(device), graphs)
        decode(warm)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            live = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(device, partial(decode, decode_steps))
        row = {"context": n, "batch": batch, "state_filled": "from ids" if direct else "prefill",
               "decode_path": "graph" if graphs else "static", "prefill_seconds": segments[-1][2],
               "state_bytes_measured": held, "state_bytes_formula": model.state_bytes(n, batch, p.dtype),
               "tokens_in_state": state.seen, "decode_tokens_per_s": batch * decode_steps / seconds,
               "decode_ms_per_token": 1000 * seconds / decode_steps}
        if device.type == "cuda":
            row["peak_allocated_bytes_decoding"] = torch.cuda.max_memory_allocated(device)
            row["live_bytes_before_decoding"] = live
            row["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.parameters())
        rows.append(row)
        del decode, state
    return rows
