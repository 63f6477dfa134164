"""Graph-captured decoding of a transformers causal LM from a KV cache of fixed slots.

transformers' decode step is eager: every layer launches its kernels from Python and a growing cache reallocates,
so a small model decodes far below what the GPU's memory bandwidth allows. Here a step reads and writes only
buffers allocated before it, so ``longctx.decoding.StepGraphs`` can capture it once and replay it:

- the cache is either transformers' ``StaticCache`` (the full cache: ``context + new tokens`` slots, its own
  device-side counter) or a fixed-budget ``CompressedCache(fixed=True)``, whose layers write each new token into
  the slot that a device tensor names (``FixedBudgetLayer.bind``) and are pruned back to the budget, outside the
  graph, whenever their ``budget + slack`` slots are full (every ``slack`` steps, decided by the host's count);
- attention runs as ``SLOT_ATTENTION``, registered with transformers' ``AttentionInterface``: one query token over
  the slots, of which the first ``slot_length`` (a device tensor passed through the model's keyword arguments)
  are valid (``longctx.decode_attention``: a split-K Triton kernel on CUDA, a PyTorch reference
  elsewhere). transformers builds no mask for an attention it does not know, so no mask is built at all.

The model's own modules run unchanged (embedding, norms, MLPs, rotary from explicit ``position_ids``). Greedy
tokens equal those of the eager cache on the same prompt (the tests check it on CPU, where the step runs without
a graph).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import AttentionInterface, StaticCache

from ..decode_attention import decode_attention
from ..decoding import StepGraphs
from ..model import check_sampling, sample
from .cache import CompressedCache

SLOT_ATTENTION = "longctx_slots"


def slot_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float | None = None,
                   dropout: float = 0.0, slot_length: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: ``query [B, H, 1, D]`` over ``key, value [B, Hkv, N, D]`` slots, the first
    ``slot_length [1]`` valid; returns ``([B, 1, H, D], None)``. ``attention_mask`` is ignored (it is None: no
    mask function is registered for this attention)."""
    if slot_length is None:
        raise ValueError(f"attention {SLOT_ATTENTION!r} needs slot_length= (decode with longctx.kv.graphs.SlotDecoder)")
    if query.shape[2] != 1:
        raise ValueError(f"attention {SLOT_ATTENTION!r} takes one query token, got {query.shape[2]}")
    return decode_attention(query, key, value, slot_length, scaling).transpose(1, 2), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)


@contextmanager
def attention_implementation(model, name: str):
    """Run ``model`` with attention ``name`` (``config._attn_implementation``) inside the block."""
    before = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


class SlotDecoder:
    """One-token steps of ``model`` from ``cache`` after ``seen`` prefilled tokens, each replayed from a CUDA graph
    where ``graphs`` (CUDA only); ``tok [B, 1]`` is the next input and is overwritten with each new token, drawn by
    ``longctx.model.sample`` (greedy with ``temperature=0``, the default). With ``out [B, N]`` every new token is
    also written into the next column of ``out``, from ``out_start`` on (inside the step: nothing per token on the
    host).

    ``cache``: transformers ``StaticCache`` (room for every token) or ``CompressedCache(fixed=True)`` with any
    scorer (SnapKV after a prompt of at least its ``observation`` tokens). ``run(n)`` takes ``n`` steps;
    ``close()`` hands the cache back to ordinary (eager) updates, its host counts brought up to date.
    """

    def __init__(self, model, cache, seen: int, tok: Tensor, graphs: bool = True, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None, out: Tensor | None = None,
                 out_start: int = 0):
        device = tok.device
        if tok.dim() != 2 or tok.shape[1] != 1 or tok.dtype != torch.long:
            raise ValueError(f"tok must be int64 [batch, 1], got {tok.dtype} {tuple(tok.shape)}")
        if graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs a CUDA device, tok is on {device}")
        check_sampling(temperature, top_k)
        if out is not None and (out.dim() != 2 or out.shape[0] != tok.shape[0] or out.dtype != torch.long
                                or out.device != device or not 0 <= out_start <= out.shape[1]):
            raise ValueError(f"out must be int64 [batch={tok.shape[0]}, N] on {device} with 0 <= out_start <= N, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}, out_start={out_start}")
        self.model, self.cache, self.tok = model, cache, tok
        self.temperature, self.top_k, self.generator = temperature, top_k, generator
        self.out, self.written = out, out_start
        self.column = torch.tensor([out_start], dtype=torch.long, device=device) if out is not None else None
        if not isinstance(cache, (CompressedCache, StaticCache)):
            raise ValueError("SlotDecoder takes a StaticCache or CompressedCache(fixed=True), got "
                             f"{type(cache).__name__}")
        if isinstance(cache, CompressedCache) and not cache.fixed:
            raise ValueError("SlotDecoder needs CompressedCache(fixed=True): a growing cache changes shape")
        if not cache.layers or not cache.layers[0].is_initialized:
            raise ValueError("prefill the cache before decoding from it (its slots are allocated by the first forward)")
        batch = tok.shape[0]
        self.position_ids = torch.full((batch, 1), seen, dtype=torch.long, device=device)
        if isinstance(cache, CompressedCache):
            layer = cache.layers[0]
            self.capacity, self.budget, self.fill = layer.capacity, layer.budget, layer.fill
            self.slot = torch.tensor([self.fill], dtype=torch.long, device=device)
            for layer in cache.layers:
                layer.bind(self.slot, self.position_ids[0])
            self.pending = 0                             # steps the layers' host counts have not seen yet
        else:
            self.capacity, self.fill, self.slot = cache.layers[0].max_cache_len, seen, None
        if self.fill >= self.capacity:
            raise ValueError(f"the cache's {self.capacity} slots are full ({self.fill} stored)")
        self.length = torch.tensor([self.fill + 1], dtype=torch.long, device=device)   # valid slots during a step
        self.step = StepGraphs(self._step, generator) if graphs else self._step

    def _step(self, _variant=None) -> None:
        logits = self.model(self.tok, position_ids=self.position_ids, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1, slot_length=self.length).logits
        self.tok.copy_(sample(logits[:, -1], self.temperature, self.top_k, self.generator))
        if self.out is not None:
            self.out.index_copy_(1, self.column, self.tok)
            self.column.add_(1)
        self.position_ids.add_(1)
        self.length.add_(1)
        if self.slot is not None:
            self.slot.add_(1)

    @torch.no_grad()
    def run(self, n: int) -> None:
        """``n`` steps; a compressed cache is pruned after the step that fills its slots."""
        compressed = self.slot is not None
        if not compressed and self.fill + n > self.capacity:
            raise ValueError(f"{n} steps after {self.fill} tokens overflow the StaticCache's {self.capacity} slots")
        if self.out is not None and self.written + n > self.out.shape[1]:
            raise ValueError(f"{n} steps would write past out's {self.out.shape[1]} columns (next: {self.written})")
        self.written += n
        with attention_implementation(self.model, SLOT_ATTENTION):
            for _ in range(n):
                self.step(None)
                self.fill += 1
                if compressed:
                    self.pending += 1
                    if self.fill == self.capacity:
                        self._prune()

    def _prune(self) -> None:
        for layer in self.cache.layers:
            layer.advance(self.pending)
            layer.prune()
        self.pending = 0
        self.fill = self.budget
        self.slot.fill_(self.budget)
        self.length.fill_(self.budget + 1)

    def close(self) -> None:
        """Bring the layers' host counts up to date and unbind them (a compressed cache); the cache can then be
        used eagerly again."""
        if self.slot is not None:
            for layer in self.cache.layers:
                layer.advance(self.pending)
                layer.bind(None)
            self.pending = 0


@torch.no_grad()
def generate_slots(model, ids: Tensor, max_new_tokens: int, cache, graphs: bool | None = None,
                   temperature: float = 0.0, top_k: int | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """``[B, T + max_new_tokens]``: prefill ``ids [B, T]`` eagerly into ``cache`` (an empty ``StaticCache`` or
    ``CompressedCache(fixed=True)``), then one-token steps from a :class:`SlotDecoder` (CUDA graphs by default on
    CUDA), greedy unless ``temperature > 0`` (``longctx.model.sample``)."""
    if max_new_tokens < 1:
        return ids
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    logits = model(ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tok = sample(logits[:, -1], temperature, top_k, generator)
    out = torch.empty(ids.shape[0], max_new_tokens, dtype=torch.long, device=ids.device)
    out[:, :1] = tok
    decoder = SlotDecoder(model, cache, ids.shape[1], tok, ids.is_cuda if graphs is None else graphs, temperature,
                          top_k, generator, out=out, out_start=1)
    decoder.run(max_new_tokens - 1)
    decoder.close()
    return torch.cat([ids, out], dim=1)
