"""Decode-time measurements: state bytes actually held, peak device memory, decode speed."""
from __future__ import annotations

import platform
import time

import torch

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
def measure_decode(model: GPT, context: int, decode_steps: int, batch: int = 1, prefill_chunk: int = 1024,
                   seed: int = 0) -> dict:
    """Prefill ``context`` random tokens through the step form (in chunks), then decode ``decode_steps``.

    Returns the bytes the decoding state really holds (``state_bytes_measured``) next to the mechanisms'
    formula (``state_bytes_formula``), decode tokens/s, and on CUDA the peak allocated bytes while decoding.
    """
    model.eval()
    p = next(model.parameters())
    device = p.device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    state = model.init_state(batch)
    for chunk in prompt.split(prefill_chunk, dim=1):
        logits, state = model.step(chunk, state)
    tok = logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up: kernel selection for the one-token shapes stays out of the timing
        logits, state = model.step(tok, state)
        tok = logits[:, -1:].argmax(-1)
    context += 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(decode_steps):
        logits, state = model.step(tok, state)
        tok = logits[:, -1:].argmax(-1)
    sync(device)
    seconds = time.perf_counter() - start
    out = {
        "context": context + decode_steps,
        "batch": batch,
        "state_bytes_measured": tensor_bytes(state.layers),
        "state_bytes_formula": model.state_bytes(context + decode_steps, batch, p.dtype),
        "decode_tokens_per_s": batch * decode_steps / seconds,
        "decode_ms_per_token": 1000 * seconds / decode_steps,
    }
    if device.type == "cuda":
        out["peak_allocated_bytes_decoding"] = torch.cuda.max_memory_allocated(device)
        out["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.parameters())
    return out
