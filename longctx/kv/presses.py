"""Optional comparison with NVIDIA kvpress: its presses on the same inputs, when the package imports.

kvpress compresses inside the prefill's forward (hooks on the attention layers), so each press and budget
needs its own prefill; it compresses the prefill only (the cache grows again while decoding). Not a
dependency of longctx; a press that fails at run time is recorded with its error instead of stopping the run.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import DynamicCache

#: method name in the report → kvpress class.
PRESSES = {"kvpress-snapkv": "SnapKVPress", "kvpress-streamingllm": "StreamingLLMPress",
           "kvpress-knorm": "KnormPress", "kvpress-expected_attention": "ExpectedAttentionPress"}


def kvpress_status() -> tuple[bool, str]:
    """(importable, version or the import error)."""
    try:
        import kvpress
    except Exception as e:  # noqa: BLE001 — any import failure means "not available", reported as such
        return False, f"{type(e).__name__}: {e}"
    from importlib.metadata import version

    return True, version("kvpress")


@torch.no_grad()
def press_prefill(model, name: str, context_ids: Tensor, budget_tokens: int) -> tuple[DynamicCache, Tensor, float]:
    """Prefill ``context_ids [1, T]`` under kvpress's press ``name`` keeping ``budget_tokens`` per layer
    (``compression_ratio = 1 − budget/T``). Returns (cache, next_logits [1, V], seconds)."""
    import kvpress

    ratio = max(0.0, 1.0 - budget_tokens / context_ids.shape[1])
    press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)
    cache = DynamicCache()
    start = time.perf_counter()
    with press(model):
        out = model(context_ids.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float(), time.perf_counter() - start
