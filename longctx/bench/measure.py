"""Decode-time measurements: state bytes actually held, peak device memory, decode speed."""
from __future__ import annotations

import math
import platform
import time

import torch
from torch import Tensor

from ..mechanisms import tensor_bytes
from ..model import GPT

#: dtype names accepted by the bench and the KV evaluation.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings read a host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses (recorded with every result)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def _decode(model: GPT, state, tok: Tensor, steps: int) -> tuple[float, Tensor, object]:
    """``steps`` greedy one-token steps from ``state``: (seconds, last logits, state)."""
    device = tok.device
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = model.step(tok, state)
        tok = logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start, logits, state


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
    """Fill the decoding state with random tokens through the step form (``prefill_chunk`` tokens a call) up to
    each of ``contexts`` in turn, and at each one decode ``2 + decode_steps`` tokens (the first two untimed); they
    stay in the state and the next context is filled on from there. A model whose state is the token ids alone
    (``GPT.state_from_ids``: RayTention) gets its state built from ``n`` random ids instead, running nothing
    (``state_filled`` says which).

    One row per context: the bytes the state really holds (``state_bytes_measured``) next to the mechanism's
    formula, decode tokens/s, and on CUDA the peak allocated bytes while decoding (weights + state +
    transients) with the bytes live before it. A context whose prefill would take longer than
    ``prefill_seconds`` (``project_prefill``) gets ``{"skipped": reason, "projected_seconds": ...}``, and so
    do all longer ones.
    """
    model.eval()
    p = next(model.parameters())
    device = p.device
    g = torch.Generator().manual_seed(seed)
    state, seen, rows, skip, segments = model.init_state(batch), 0, [], None, []
    direct = model.state_from_ids(torch.zeros(batch, 0, dtype=torch.long, device=device)) is not None
    for n in sorted(contexts):
        projected = project_prefill(segments, seen, n)
        if skip is None and projected > prefill_seconds:
            skip = {"skipped": f"prefill to {n} tokens projected at {projected:.0f} s > {prefill_seconds:.0f} s",
                    "projected_seconds": projected}
        if skip is not None:
            rows.append({"context": n, "batch": batch, **skip})
            continue
        sync(device)
        start, first = time.perf_counter(), seen
        if direct:   # the state is the token ids alone: draw all n and run nothing
            ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=g).to(device)
            state, seen, tok = model.state_from_ids(ids), n, ids[:, -1:]
        while seen < n:
            chunk = torch.randint(0, model.config.vocab_size, (batch, min(prefill_chunk, n - seen)), generator=g)
            logits, state = model.step(chunk.to(device), state)
            seen += chunk.shape[1]
            tok = logits[:, -1:].argmax(-1)
        sync(device)
        segments.append((first, seen, time.perf_counter() - start))
        _, logits, state = _decode(model, state, tok, 2)   # kernel selection for one-token shapes stays untimed
        tok = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            live = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds, logits, state = _decode(model, state, tok, decode_steps)
        seen = state.seen
        row = {"context": n, "batch": batch, "state_filled": "from ids" if direct else "prefill",
               "prefill_seconds_total": sum(t for *_, t in segments),
               "state_bytes_measured": tensor_bytes(state.layers),
               "state_bytes_formula": model.state_bytes(seen, batch, p.dtype), "tokens_in_state": seen,
               "decode_tokens_per_s": batch * decode_steps / seconds, "decode_ms_per_token": 1000 * seconds / decode_steps}
        if device.type == "cuda":
            row["peak_allocated_bytes_decoding"] = torch.cuda.max_memory_allocated(device)
            row["live_bytes_before_decoding"] = live
            row["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.parameters())
        rows.append(row)
    return rows
