"""A small GPT whose attention mechanism is chosen by name (nanoGPT's shape, with RoPE, RMSNorm and GQA).

Tokens flow as ``[batch, seq]`` ids -> ``[batch, seq, n_embd]`` activations; inside attention the layout is
``[batch, heads, seq, head_dim]``. ``generate`` decodes with each mechanism's step form and explicit state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mechanisms import build_mechanism, lookup
from .mechanisms.base import check_capacity, check_dtype, check_int, check_state_bytes_args
from .rope import rope_table, rotate


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
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio"):
            check_int(name, getattr(self, name))
        if not (isinstance(self.rope_base, (int, float)) and 1 < self.rope_base < math.inf):
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base!r}")
        if not isinstance(self.mechanism_options, dict):
            raise ValueError(f"mechanism_options must be a dict, got {type(self.mechanism_options).__name__}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head dim n_embd / n_head = {self.n_embd // self.n_head} must be even (rotary "
                             "embedding pairs its dimensions)")
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
    _rope: dict = field(default_factory=dict, repr=False)

    def rope(self, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The ``rope_table`` of ``positions``, computed once for all layers of a forward pass or step."""
        key = (head_dim, base, dtype)
        if key not in self._rope:
            self._rope[key] = rope_table(self.positions, head_dim, base, dtype)
        return self._rope[key]


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
        cos, sin = ctx.rope(q.shape[-1], self.rope_base, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

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

    # the static decoding state (Mechanism's docstring); ``shared`` holds buffers all layers of one state share
    @property
    def capturable(self) -> bool:
        return self.mechanism.capturable

    def init_static_state(self, batch: int, capacity: int, device, dtype, shared: dict) -> Any:
        return self.mechanism.init_static_state(batch, capacity, device=device, dtype=dtype)

    def static_variant(self, pos: int) -> Any:
        return self.mechanism.static_variant(pos)

    def eager_state(self, state: Any, seen: int) -> Any:
        return self.mechanism.eager_state(state, seen)

    def prefill_static(self, x: Tensor, ctx: LayerContext, state: Any, start: int) -> Tensor:
        return self._out(self.mechanism.prefill_static(*self._qkv(x, ctx), state, start))

    def step_static(self, x: Tensor, ctx: LayerContext, state: Any, variant: Any) -> Tensor:
        return self._out(self.mechanism.step_static(*self._qkv(x, ctx), state, ctx.positions, variant))

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

    def prefill_static(self, x: Tensor, ctx: LayerContext, state: Any, start: int) -> Tensor:
        x = x + self.attn.prefill_static(self.norm1(x), ctx, state, start)
        return x + self.mlp(self.norm2(x))

    def step_static(self, x: Tensor, ctx: LayerContext, state: Any, variant: Any) -> Tensor:
        x = x + self.attn.step_static(self.norm1(x), ctx, state, variant)
        return x + self.mlp(self.norm2(x))


@dataclass
class DecodeState:
    """Per-layer mechanism states and the number of tokens already consumed."""
    layers: list
    seen: int = 0


@dataclass
class StaticDecodeState:
    """Per-layer static states (allocated once for ``batch`` and ``capacity`` tokens) and the tokens consumed,
    twice: ``pos [1]`` int64 on the device (what a captured step reads and advances) and ``seen`` on the host
    (what picks the step's variant and checks the capacity, with no sync)."""
    layers: list
    pos: Tensor
    batch: int
    capacity: int
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

    def _check_ids(self, idx: Tensor, targets: Tensor | None = None) -> None:
        """``idx`` is ``[batch, seq]`` integer ids of at least one token, each in ``[0, vocab_size)``, and ``targets``
        (if given) integer ids of the same shape in ``[0, vocab_size)`` or ``-1`` (ignored). One host sync for both:
        the captured decode step, whose ids come from sampling, skips this."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be [batch, seq] integer token ids, got "
                             f"{f'{tuple(idx.shape)} {idx.dtype}' if isinstance(idx, Tensor) else type(idx).__name__}")
        if idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"idx must hold at least one sequence of at least one token, got {tuple(idx.shape)}")
        ranges = [torch.stack(torch.aminmax(idx))]
        if targets is not None:
            if (not isinstance(targets, Tensor) or targets.shape != idx.shape
                    or targets.dtype not in (torch.int64, torch.int32)):
                got = (f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, Tensor)
                       else type(targets).__name__)
                raise ValueError(f"targets must be integer token ids of idx's shape {tuple(idx.shape)}, got {got}")
            ranges.append(torch.stack(torch.aminmax(targets)).to(idx.device, torch.int64))
        (lo, hi), *rest = torch.stack([r.to(torch.int64) for r in ranges]).tolist()
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}), got ids from {lo} "
                             f"to {hi}")
        if rest and (rest[0][0] < -1 or rest[0][1] >= self.config.vocab_size):
            raise ValueError(f"targets must lie in [0, vocab_size={self.config.vocab_size}) or be -1 (ignored), got "
                             f"targets from {rest[0][0]} to {rest[0][1]}")

    def forward(self, idx: Tensor, targets: Tensor | None = None, positions: Tensor | None = None):
        """``idx [B, T]`` -> ``(logits [B, T, V], loss or None)``. ``positions [T]`` default ``0..T-1``
        (ring attention passes each rank's global positions)."""
        self._check_ids(idx, targets)
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        elif not isinstance(positions, Tensor) or tuple(positions.shape) != (idx.shape[1],):
            raise ValueError(f"positions must be a tensor [seq] = [{idx.shape[1]}], got "
                             f"{tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__}")
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
        check_int("batch", batch)
        p = next(self.parameters())
        device, dtype = device or p.device, check_dtype(dtype or p.dtype)
        return DecodeState([b.attn.init_state(batch, device, dtype) for b in self.blocks])

    @property
    def state_is_token_ids(self) -> bool:
        """Whether every layer's decoding state is the token ids alone (RayTention): ``state_from_ids`` builds it."""
        return all(hasattr(b.attn, "state_from_ids") for b in self.blocks)

    def state_from_ids(self, idx: Tensor) -> DecodeState | None:
        """The decoding state after ``idx [B, T]``, built without running the model, where every layer's state
        is a function of the token ids alone (a layer with a ``state_from_ids`` method: RayTention keeps only
        the ids); None where any layer's state needs the forward pass."""
        self._check_ids(idx)
        if not self.state_is_token_ids:
            return None
        makers = [b.attn.state_from_ids for b in self.blocks]
        ids = idx.to(torch.int32)
        return DecodeState([make(ids) for make in makers], idx.shape[1])

    @torch.no_grad()
    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Consume ``idx [B, T_new]`` after the ``state.seen`` tokens of ``state``: ``(logits [B, T_new, V], state)``."""
        self._check_ids(idx)
        if not isinstance(state, DecodeState):
            raise TypeError(f"state must be a DecodeState (init_state), got {type(state).__name__}")
        self._check_layers(state)
        positions = torch.arange(state.seen, state.seen + idx.shape[1], device=idx.device)
        ctx = self._context(idx, positions)
        x, layers = self.wte(idx), []
        for block, s in zip(self.blocks, state.layers):
            x, s = block.step(x, ctx, s)
            layers.append(s)
        return self.lm_head(self.norm(x)), DecodeState(layers, state.seen + idx.shape[1])

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, mode: str | None = None) -> Tensor:
        """Prefill ``idx [B, T]`` once, then decode token by token from the mechanism states (no prefix
        recomputation). ``temperature=0`` is greedy. Returns ``[B, T + max_new_tokens]``.

        ``mode``: ``"graph"`` (static states, each step replayed from a CUDA graph: ``longctx.decoding``),
        ``"static"`` (static states, eager steps) or ``"eager"`` (the growing step states: the reference).
        Default: ``"graph"`` on CUDA where every layer can be captured, ``"static"`` on CUDA otherwise
        (RayTention), ``"eager"`` on the CPU."""
        from .decoding import MODES, generate_static

        self._check_ids(idx)
        check_int("max_new_tokens", max_new_tokens, 0)
        check_sampling(temperature, top_k)
        if mode is None:
            mode = ("graph" if self.capturable else "static") if idx.is_cuda else "eager"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and not (idx.is_cuda and self.capturable):
            raise ValueError(f"mode='graph' needs CUDA and a capturable mechanism; got {idx.device}, "
                             f"mechanism {self.config.mechanism!r} (capturable: {self.capturable})")
        if mode != "eager":
            return generate_static(self, idx, max_new_tokens, temperature, top_k, generator, mode == "graph")
        logits, state = self.step(idx, self.init_state(idx.shape[0]))
        out = [idx]
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, generator).to(idx.dtype)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, state = self.step(nxt, state)
        return torch.cat(out, dim=1)

    # --- static decoding: buffers allocated once, one-token steps that a CUDA graph can capture ---------------

    def init_static_state(self, batch: int, capacity: int, device=None, dtype=None) -> StaticDecodeState:
        """Static states for ``batch`` sequences of up to ``capacity`` tokens (prompt + generated)."""
        check_int("batch", batch)
        check_int("capacity", capacity)
        p = next(self.parameters())
        device, dtype, shared = device or p.device, check_dtype(dtype or p.dtype), {}
        layers = [b.attn.init_static_state(batch, capacity, device, dtype, shared) for b in self.blocks]
        return StaticDecodeState(layers, torch.zeros(1, dtype=torch.long, device=device), batch, capacity)

    @property
    def capturable(self) -> bool:
        """Whether every layer's static step can be captured in a CUDA graph (RayTention's cannot)."""
        return all(b.attn.capturable for b in self.blocks)

    def static_variant(self, pos: int) -> tuple:
        """The key of what the one-token step at position ``pos`` runs in every layer (``Mechanism.static_variant``)."""
        return tuple(b.attn.static_variant(pos) for b in self.blocks)

    def eager_state(self, state: StaticDecodeState) -> DecodeState:
        """The ``step`` state holding what ``state`` holds (views of its buffers where it can): the eager
        reference from the same point."""
        return DecodeState([b.attn.eager_state(s, state.seen) for b, s in zip(self.blocks, state.layers)],
                           state.seen)

    def _check_layers(self, state: DecodeState | StaticDecodeState) -> None:
        """A state of one layer per block (one made by a model of another depth would leave blocks out)."""
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"the state holds {len(state.layers)} layers, this model has n_layer={len(self.blocks)}: "
                             "a state made by another model")

    def _check_static(self, idx: Tensor, state: StaticDecodeState) -> None:
        self._check_ids(idx)
        if not isinstance(state, StaticDecodeState):
            raise TypeError(f"state must be a StaticDecodeState (init_static_state), got {type(state).__name__}")
        self._check_layers(state)
        if idx.shape[0] != state.batch:
            raise ValueError(f"idx has batch {idx.shape[0]}, the static state was made for batch {state.batch}")
        check_capacity(state.seen, idx.shape[1], state.capacity)

    @torch.no_grad()
    def prefill_static(self, idx: Tensor, state: StaticDecodeState) -> Tensor:
        """Consume ``idx [B, T]`` into the static state (eager; any ``T``): ``logits [B, T, V]``."""
        self._check_static(idx, state)
        start, n = state.seen, idx.shape[1]
        ctx = self._context(idx, torch.arange(start, start + n, device=idx.device))
        x = self.wte(idx)
        for block, s in zip(self.blocks, state.layers):
            x = block.prefill_static(x, ctx, s, start)
        state.seen += n
        state.pos.fill_(state.seen)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def step_static(self, idx: Tensor, state: StaticDecodeState) -> Tensor:
        """One token ``idx [B, 1]`` at the state's position, updating it in place: ``logits [B, 1, V]``."""
        self._check_static(idx, state)
        if idx.shape[1] != 1:
            raise ValueError(f"step_static takes one token per sequence, got idx {tuple(idx.shape)}")
        logits = self.decode_step(idx, state, self.static_variant(state.seen))
        state.seen += 1
        return logits

    def decode_step(self, idx: Tensor, state: StaticDecodeState, variant: tuple) -> Tensor:
        """The capturable core of ``step_static``: reads the position from ``state.pos`` and advances it on the
        device, leaves ``state.seen`` to the caller. ``variant`` must be ``static_variant(state.seen)``."""
        ctx = self._context(idx, state.pos)
        x = self.wte(idx)
        for block, s, var in zip(self.blocks, state.layers, variant):
            x = block.step_static(x, ctx, s, var)
        state.pos.add_(1)
        return self.lm_head(self.norm(x))

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        """Decoding state of all layers after ``context_len`` tokens (the mechanisms' formulas)."""
        check_state_bytes_args(context_len, batch)
        return sum(b.attn.state_bytes(context_len, batch, dtype) for b in self.blocks)


def check_sampling(temperature: float, top_k: int | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, V]`` -> next ids ``[B, 1]``. Draws by the exponential race, ``argmax p / E`` with ``E ~ Exp(1)``:
    the distribution of ``torch.multinomial``, with no host sync, so that a CUDA graph can capture it."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    race = torch.empty_like(logits).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    return (F.softmax(logits, dim=-1) / race).argmax(-1, keepdim=True)
