"""A small GPT whose attention mechanism is chosen by name (nanoGPT's shape, with RoPE, RMSNorm and GQA).

Tokens flow as ``[batch, seq]`` ids -> ``[batch, seq, n_embd]`` activations; inside attention the layout is
``[batch, heads, seq, head_dim]``. ``generate`` decodes with each mechanism's step form and explicit state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mechanisms import build_mechanism, lookup
from .rope import apply_rope


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256            # training context
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 128
    mechanism: str = "full"
    mechanism_options: dict = field(default_factory=dict)
    rope_base: float = 10000.0
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        lookup(self.mechanism)  # unknown names fail here, not deep inside the model

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class LayerContext:
    """What a layer may read besides its input: global ``positions [T]`` of the tokens, their ids
    ``tokens [B, T]`` and the model's ``embed`` (ids -> ``[B, T, n_embd]``), which RayTention uses as keys."""
    positions: Tensor
    tokens: Tensor
    embed: Callable[[Tensor], Tensor]


class CausalSelfAttention(nn.Module):
    """Projections and RoPE around a mechanism; the mechanism does the token mixing."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hd = config.head_dim
        self.n_head, self.n_kv_head, self.rope_base = config.n_head, config.n_kv_head, config.rope_base
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hd, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * config.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(config.n_head * hd, config.n_embd, bias=False)
        self.mechanism = build_mechanism(config.mechanism, config.n_head, config.n_kv_head, hd,
                                         **config.mechanism_options)

    def _qkv(self, x: Tensor, ctx: LayerContext) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, -1).permute(2, 0, 3, 1, 4)
        return apply_rope(q, ctx.positions, self.rope_base), apply_rope(k, ctx.positions, self.rope_base), v

    def _out(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, ctx: LayerContext) -> Tensor:
        return self._out(self.mechanism(*self._qkv(x, ctx)))

    def init_state(self, batch: int, device, dtype) -> Any:
        return self.mechanism.init_state(batch, device=device, dtype=dtype)

    def step(self, x: Tensor, ctx: LayerContext, state: Any) -> tuple[Tensor, Any]:
        y, state = self.mechanism.step(*self._qkv(x, ctx), state)
        return self._out(y), state

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        return self.mechanism.state_bytes(context_len, batch, dtype)


def make_attention_layer(config: GPTConfig) -> nn.Module:
    """The layer for ``config.mechanism``: its own ``make_layer`` if it has one, else projections + mechanism."""
    cls, _ = lookup(config.mechanism)
    make_layer = getattr(cls, "make_layer", None)
    return make_layer(config) if make_layer is not None else CausalSelfAttention(config)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.down = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(config.n_embd), nn.RMSNorm(config.n_embd)
        self.attn = make_attention_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, ctx: LayerContext) -> Tensor:
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, ctx: LayerContext, state: Any) -> tuple[Tensor, Any]:
        a, state = self.attn.step(self.norm1(x), ctx, state)
        x = x + a
        return x + self.mlp(self.norm2(x)), state


@dataclass
class DecodeState:
    """Per-layer mechanism states and the number of tokens already consumed."""
    layers: list
    seen: int = 0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _context(self, idx: Tensor, positions: Tensor) -> LayerContext:
        return LayerContext(positions=positions, tokens=idx, embed=self.wte)

    def _check_ids(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be [batch, seq] integer token ids, got {tuple(idx.shape)} {idx.dtype}")

    def forward(self, idx: Tensor, targets: Tensor | None = None, positions: Tensor | None = None):
        """``idx [B, T]`` -> ``(logits [B, T, V], loss or None)``. ``positions [T]`` default ``0..T-1``
        (ring attention passes each rank's global positions)."""
        self._check_ids(idx)
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        ctx = self._context(idx, positions)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, ctx)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def init_state(self, batch: int, device=None, dtype=None) -> DecodeState:
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        return DecodeState([b.attn.init_state(batch, device, dtype) for b in self.blocks])

    def state_from_ids(self, idx: Tensor) -> DecodeState | None:
        """The decoding state after ``idx [B, T]``, built without running the model, where every layer's state
        is a function of the token ids alone (a layer with a ``state_from_ids`` method: RayTention keeps only
        the ids); None where any layer's state needs the forward pass."""
        self._check_ids(idx)
        makers = [getattr(b.attn, "state_from_ids", None) for b in self.blocks]
        if any(make is None for make in makers):
            return None
        ids = idx.to(torch.int32)
        return DecodeState([make(ids) for make in makers], idx.shape[1])

    @torch.no_grad()
    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Consume ``idx [B, T_new]`` after the ``state.seen`` tokens of ``state``: ``(logits [B, T_new, V], state)``."""
        self._check_ids(idx)
        positions = torch.arange(state.seen, state.seen + idx.shape[1], device=idx.device)
        ctx = self._context(idx, positions)
        x, layers = self.wte(idx), []
        for block, s in zip(self.blocks, state.layers):
            x, s = block.step(x, ctx, s)
            layers.append(s)
        return self.lm_head(self.norm(x)), DecodeState(layers, state.seen + idx.shape[1])

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Prefill ``idx [B, T]`` once, then decode token by token from the mechanism states (no prefix
        recomputation). ``temperature=0`` is greedy. Returns ``[B, T + max_new_tokens]``."""
        logits, state = self.step(idx, self.init_state(idx.shape[0]))
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, generator)
            out.append(nxt)
            logits, state = self.step(nxt, state)
        return torch.cat(out, dim=1)

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        """Decoding state of all layers after ``context_len`` tokens (the mechanisms' formulas)."""
        return sum(b.attn.state_bytes(context_len, batch, dtype) for b in self.blocks)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, V]`` -> next ids ``[B, 1]``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)
