"""Fast generation: decode a GPT from static states, one CUDA graph per step variant.

Eager decoding launches a few hundred small kernels per token and the GPU idles between them. Here every
buffer is allocated once (``GPT.init_static_state``), a decode step of the whole model plus sampling reads and
writes only those buffers, and ``StepGraphs`` captures it in a CUDA graph and replays it. A step may differ
between positions only by its *variant* (power retention folds every ``chunk_size`` tokens, Tensor Cache starts
evicting once its window is full): the host knows the position without asking the device, so it picks the
variant's graph itself, and no step syncs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .mechanisms.base import check_capacity

MODES = ("eager", "static", "graph")


class StepGraphs:
    """Runs ``fn(key)``, a function that reads and writes only tensors allocated before it (static buffers), as
    one CUDA graph per ``key``. A key's first call runs eagerly on a side stream (Triton compiles, cuBLAS picks
    its kernels), its second captures the graph and replays it, later ones replay. All graphs share one memory
    pool. A ``generator`` the function draws from is registered with every graph (the default CUDA generator
    needs nothing)."""

    def __init__(self, fn: Callable[[Any], None], generator: torch.Generator | None = None):
        self.fn, self.generator = fn, generator
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self.warm: set = set()
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, key: Any) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.warm:
                self._eager(key)
                self.warm.add(key)
                return
            graph = self._capture(key)
        graph.replay()

    def _eager(self, key: Any) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(key)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, key: Any) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            register = getattr(graph, "register_generator_state", None)
            if register is None:
                raise RuntimeError("this torch cannot capture a custom generator in a CUDA graph; pass generator=None "
                                   "or mode='static'")
            register(self.generator)
        with torch.cuda.graph(graph, pool=self.pool):
            self.fn(key)
        self.graphs[key] = graph
        return graph


def decoder(model, state, body: Callable[[tuple], None], graphs: bool,
            generator: torch.Generator | None = None) -> Callable[[int], None]:
    """``run(n)``: ``n`` one-token steps ``body(variant)`` from the static ``state`` (``body`` calls
    ``model.decode_step``), each replayed from a CUDA graph where ``graphs``; the host's count picks the variant
    and advances; running past the state's capacity is refused."""
    step = StepGraphs(body, generator) if graphs else body

    def run(n: int) -> None:
        check_capacity(state.seen, n, state.capacity)
        for _ in range(n):
            step(model.static_variant(state.seen))
            state.seen += 1
    return run


def greedy_decoder(model, state, tok: Tensor, graphs: bool) -> Callable[[int], None]:
    """``decoder`` of greedy steps, ``tok [B, 1]`` (the next input) updated in place."""
    def body(variant: tuple) -> None:
        tok.copy_(model.decode_step(tok, state, variant)[:, -1:].argmax(-1))
    return decoder(model, state, body, graphs)


def warm_steps(model, start: int) -> int:
    """One-token steps from ``start`` until every step variant met in them has run twice (eager, then captured),
    at least 3: what the graph path needs before its steps are all replays (2 for a model not captured)."""
    if not model.capturable:
        return 2
    counts: dict = {}
    n = 0
    while n < 3 or min(counts.values()) < 2:
        key = model.static_variant(start + n)
        counts[key] = counts.get(key, 0) + 1
        n += 1
        if n > 4096:
            raise ValueError("step variants do not repeat within 4096 tokens")
    return n


@torch.no_grad()
def generate_static(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    generator: torch.Generator | None = None, graphs: bool = True) -> Tensor:
    """``GPT.generate`` from static states: prefill ``idx [B, T]`` eagerly, then ``max_new_tokens - 1`` one-token
    steps, each replayed from a CUDA graph where ``graphs`` (CUDA, every layer capturable). Returns ``[B, T +
    max_new_tokens]``; greedy tokens equal the eager path's."""
    from .model import sample

    B, T = idx.shape
    if max_new_tokens == 0:
        return idx
    state = model.init_static_state(B, T + max_new_tokens, device=idx.device)
    tok = sample(model.prefill_static(idx, state)[:, -1], temperature, top_k, generator).to(idx.dtype)
    out = torch.empty(B, max_new_tokens, dtype=idx.dtype, device=idx.device)
    out[:, :1] = tok
    slot = torch.ones(1, dtype=torch.long, device=idx.device)      # the column of ``out`` the next token goes to

    def step(variant: tuple) -> None:
        logits = model.decode_step(tok, state, variant)
        nxt = sample(logits[:, -1], temperature, top_k, generator).to(idx.dtype)
        tok.copy_(nxt)
        out.index_copy_(1, slot, nxt)
        slot.add_(1)

    decoder(model, state, step, graphs, generator)(max_new_tokens - 1)
    return torch.cat([idx, out], 1)
