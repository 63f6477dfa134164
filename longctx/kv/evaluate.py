"""The measurements of ``longctx kv-eval``: one prefill, then every method × budget on the same cache contents.

Protocol (question-agnostic, as in kvpress): the context is prefilled and compressed; the question (needle
task) or the continuation (perplexity) is then fed through the compressed cache, which keeps pruning itself
(``budget + slack`` rule of :class:`~longctx.kv.cache.CompressedCache`).

One prefill serves every method and budget: a ``CompressedCache`` returns the full states from ``update`` for
the forward that adds them and prunes only afterwards, so the prefill's forward is the same whatever the cache.
The prefill's keys and values (and its queries, for SnapKV and H2O) are therefore recorded once from a plain
``DynamicCache`` and replayed through each compressed cache's ``update`` — the same calls a real prefill makes,
pruning included (``tests/test_kv_eval.py`` checks the replay against a real prefill).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from ..bench.measure import sync
from ..mechanisms import tensor_bytes
from .cache import CompressedCache, QueryTap
from .calibration import QueryStats
from .scorers import SCORERS, Scorer

#: ``full`` (no compression) and the scorers of :mod:`longctx.kv.scorers`, in report order.
METHODS = ("full", "triattention", "streamingllm", "h2o", "snapkv", "keynorm")
assert set(METHODS[1:]) == set(SCORERS)


# --- memory ---------------------------------------------------------------------------------------------------

def kv_bytes(cache) -> int:
    """Bytes of the key and value tensors a cache holds, summed over layers (measured from the tensors; for a
    fixed-budget layer its slot buffers, allocated whole, not the view of the slots in use)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            keys, values = getattr(layer, "key_slots", layer.keys), getattr(layer, "value_slots", layer.values)
            total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
    return total


def bookkeeping_bytes(cache) -> int:
    """Bytes a compressed cache holds besides keys and values: original positions and scorer state."""
    return sum(tensor_bytes([layer.positions, layer.scorer_state]) for layer in cache.layers
               if getattr(layer, "is_initialized", False) and hasattr(layer, "positions"))


def full_kv_bytes(config, seq: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of an uncompressed KV cache: ``seq · layers · 2 · Hkv · head_dim · element size`` (× batch)."""
    from .rope import head_dim_of

    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return batch * seq * config.num_hidden_layers * 2 * n_kv * head_dim_of(config) * dtype.itemsize


# --- building caches ------------------------------------------------------------------------------------------

def needs_queries(method: str) -> bool:
    """Whether ``method``'s scorer looks at the queries (SnapKV, H2O): its cache then hooks the model."""
    return method in SCORERS and SCORERS[method].needs_queries


def cache_extras(method: str, model, stats: QueryStats | None) -> dict:
    """What ``CompressedCache(method, ...)`` needs besides the budget: TriAttention's stats, or the model."""
    return {"stats": stats} if method == "triattention" else {"model": model} if needs_queries(method) else {}


# --- prefill and replay ---------------------------------------------------------------------------------------

@dataclass
class Prefill:
    """A context prefilled once: per layer ``keys, values [B, Hkv, T, D]`` (rotated, as cached), optionally the
    pre-RoPE ``queries [B, H, T, D]``, and ``next_logits [B, V]`` (the prediction after the context)."""

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor] | None
    next_logits: Tensor
    seconds: float

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    def full_cache(self) -> DynamicCache:
        """A plain cache holding the whole prefill (the ``full`` method)."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, i)
        return cache


@torch.no_grad()
def prefill(model, ids: Tensor, capture_queries: bool = False) -> Prefill:
    """One forward of ``ids [B, T]`` with a plain cache; records its keys, values and (optionally) queries."""
    tap = QueryTap(model) if capture_queries else None
    cache = DynamicCache()
    start = time.perf_counter()
    try:
        out = model(ids.to(model.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        if tap is not None:
            tap.remove()
    seconds = time.perf_counter() - start
    queries = [tap.pending[i] for i in range(len(cache.layers))] if tap is not None else None
    return Prefill([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], queries,
                   out.logits[:, -1].float(), seconds)


class _ObserveOnce(Scorer):
    """Wraps a query scorer (H2O, SnapKV) shared by the caches of several budgets during a replay: the
    observation of a prefill layer is computed by the first cache and copied into the others (the same
    calculation on the same inputs; H2O's costs a full attention matrix per layer)."""

    def __init__(self, inner: Scorer):
        self.inner, self.name, self.needs_queries = inner, inner.name, inner.needs_queries
        self.recording = False
        self.memo: dict | None = None

    def observe(self, state, queries, query_positions, keys, positions, scaling):
        if self.recording and self.memo is not None:
            state.update(copy.deepcopy(self.memo))
            return
        self.inner.observe(state, queries, query_positions, keys, positions, scaling)
        if self.recording:
            self.memo = copy.deepcopy(state)

    def score(self, keys, values, positions, t, layer_idx, state=None):
        return self.inner.score(keys, values, positions, t, layer_idx, state)


@torch.no_grad()
def compressed_caches(prefilled: Prefill, model, method: str, budgets: list[int], stats: QueryStats | None = None,
                      **cache_options) -> dict[int, CompressedCache]:
    """A :class:`CompressedCache` per budget (tokens) holding what a real prefill of the context would have left
    in it, pruning included. Call ``detach()`` on each when done (SnapKV and H2O hook the model)."""
    caches = {b: CompressedCache(method, budget=b, **cache_extras(method, model, stats), **cache_options)
              for b in budgets}
    shared = None
    if caches and next(iter(caches.values())).scorer.needs_queries:
        if prefilled.queries is None:
            raise ValueError(f"method {method!r} needs the prefill's queries: prefill(..., capture_queries=True)")
        shared = _ObserveOnce(next(iter(caches.values())).scorer)
        for cache in caches.values():
            cache.scorer = shared                  # before any layer exists: layers take the cache's scorer
    try:
        if shared is not None:
            shared.recording = True
        for i, (k, v) in enumerate(zip(prefilled.keys, prefilled.values)):
            if shared is not None:
                shared.memo = None
            for cache in caches.values():
                if shared is not None:
                    cache.query_tap.pending[i] = prefilled.queries[i]
                cache.update(k, v, i)
    finally:
        if shared is not None:
            shared.recording, shared.memo = False, None
    return caches


# --- decoding -------------------------------------------------------------------------------------------------

@torch.no_grad()
def forward_with(model, cache, ids: Tensor, seen: int, logits_to_keep: int = 0) -> Tensor:
    """Logits ``[B, T', V]`` of ``ids [B, T]`` fed after ``seen`` tokens through ``cache`` (positions explicit)."""
    ids = ids.to(model.device)
    positions = torch.arange(seen, seen + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return model(ids, past_key_values=cache, position_ids=positions, use_cache=True,
                 logits_to_keep=logits_to_keep).logits


@torch.no_grad()
def greedy_steps(model, cache, ids: Tensor, n: int) -> Tensor:
    """``[B, T + n]``: ``ids [B, T]`` then ``n`` greedy tokens, one forward a token through ``cache`` with the
    model's own attention (the eager reference that graph-captured decoding is compared with)."""
    tok = forward_with(model, cache, ids, 0, 1)[:, -1:].argmax(-1)
    out, seen = [tok], ids.shape[1]
    for _ in range(n - 1):
        tok = forward_with(model, cache, tok, seen, 1)[:, -1:].argmax(-1)
        out.append(tok)
        seen += 1
    return torch.cat([ids.to(tok.device), *out], 1)


@torch.no_grad()
def greedy_answer(model, cache, question_ids: Tensor, seen: int, max_new_tokens: int,
                  eos_token_id: int | None = None) -> dict:
    """Feed ``question_ids [1, Q]`` after ``seen`` context tokens, then decode greedily one token at a time.

    Returns ``tokens`` (list of ids), ``decode_tokens`` and ``decode_seconds`` (the one-token steps only).
    """
    logits = forward_with(model, cache, question_ids, seen, logits_to_keep=1)
    seen += question_ids.shape[1]
    tokens = [int(logits[0, -1].argmax())]
    steps, seconds = 0, 0.0
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        sync(model.device)
        start = time.perf_counter()
        logits = forward_with(model, cache, torch.tensor([[tokens[-1]]]), seen, logits_to_keep=1)
        tok = int(logits[0, -1].argmax())
        sync(model.device)
        seconds += time.perf_counter() - start
        tokens.append(tok)
        seen += 1
        steps += 1
    return {"tokens": tokens, "decode_tokens": steps, "decode_seconds": seconds}


@torch.no_grad()
def continuation_nll(model, cache, next_logits: Tensor, continuation: Tensor, seen: int, chunk: int = 16) -> dict:
    """Negative log-likelihood (nats, summed) of ``continuation [1, C]`` after ``seen`` context tokens.

    The first token is scored with ``next_logits [1, V]`` (the context's last prediction); the rest are fed
    ``chunk`` tokens at a time through ``cache`` (which prunes between pieces). Returns ``nll_sum``,
    ``n_tokens``, ``seconds`` (feeding the pieces) and ``tokens_per_s``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    continuation = continuation.to(model.device)
    nll = torch.nn.functional.cross_entropy(next_logits.float(), continuation[:, 0], reduction="sum").double()
    fed = 0
    sync(model.device)
    start = time.perf_counter()
    while fed < continuation.shape[1] - 1:
        piece = continuation[:, fed:fed + chunk][:, :continuation.shape[1] - 1 - fed]
        logits = forward_with(model, cache, piece, seen + fed).float()
        targets = continuation[:, fed + 1:fed + 1 + piece.shape[1]]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
        fed += piece.shape[1]
    sync(model.device)
    seconds = time.perf_counter() - start
    return {"nll_sum": float(nll), "n_tokens": int(continuation.shape[1]), "seconds": seconds,
            "tokens_per_s": fed / seconds if seconds > 0 else float("nan")}
