"""The registered ``"raytention"`` layer: per-head queries scored against the token embeddings of the history,
the blocked signals, and a small feed-forward network (AttnFFN) in place of the weighted sum of values.

Decisions (also in ``docs/raytention.md``):

* keys are ``ctx.embed(ctx.tokens)``, the model's (tied) embedding table, **not detached**: the loss may
  shape the embedding geometry through the retrieval path as well as through the input and the LM head;
* ``tau`` (per head, ``exp`` of a parameter, initially ``sqrt(D)``) and ``gamma`` (per head, ``sigmoid`` of a
  parameter, initially 0.7) are learned;
* before the AttnFFN the five key-space vectors are RMS-normalised each (embeddings are small, the scalars
  are not), spread enters as ``log1p(spread)``, entropy as is;
* decoding state: the past token ids only (int32, 4 bytes a token), one tensor shared by every layer's state
  (``tensor_bytes`` counts it once); the first RayTention layer built from a config reports those bytes in
  ``state_bytes`` and the others report 0, so ``GPT.state_bytes`` equals the bytes really held. The
  embedding table is a model weight and is not counted as state.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Mechanism, check_int, check_state_bytes_args, lookup, register
from .blocked import raytention_signals, raytention_signals_lookup
from .naive import signal_width

#: Key block of the decoding step (one query row): see ``RayTentionLayer.step``.
DECODE_KEY_BLOCK = 65536


@dataclass
class TokenHistory:
    """A layer's decoding state: the ids of every token consumed so far, ``ids [B, n]`` int32."""
    ids: Tensor


@dataclass
class StaticTokenHistory:
    """The static decoding state: ``ids [B, capacity]`` int32, position ``t``'s id in column ``t``; one buffer
    shared by every layer of a model (the first layer writes it)."""
    ids: Tensor

    def fill_random(self, start: int, stop: int, vocab_size: int) -> None:
        """Random ids in columns ``[start, stop)`` (benchmarks: decode cost depends on the length only)."""
        self.ids[:, start:stop].random_(0, vocab_size)


_last_extension: tuple = ()


def extend_history(ids: Tensor, new: Tensor) -> Tensor:
    """``ids [B, n]`` + ``new [B, m]`` -> ``[B, n + m]`` int32.

    Every layer of one model step calls this with the same ``ids`` (or an empty history of the same batch)
    and the same ``new`` object; they all get back the same tensor, so the history is held once. The memo
    keeps weak references only and compares objects by identity, so it never changes a result.
    """
    global _last_extension
    if _last_extension:
        old_ref, new_ref, out_ref = _last_extension
        old, out = old_ref(), out_ref()
        same_old = old is ids or (old is not None and old.numel() == 0 and ids.numel() == 0
                                  and old.shape == ids.shape and old.device == ids.device)
        if out is not None and new_ref() is new and same_old:
            return out
    out = torch.cat([ids, new.to(torch.int32)], 1)
    _last_extension = (weakref.ref(ids), weakref.ref(new), weakref.ref(out))
    return out


_layers_built: dict[int, int] = {}


def _next_layer_index(config) -> int:
    """Index of this layer among the ``config.n_layer`` RayTention layers built from ``config`` (0, 1, ..)."""
    key = id(config)
    if key not in _layers_built:
        _layers_built[key] = 0
        weakref.finalize(config, _layers_built.pop, key, None)
    index = _layers_built[key] % config.n_layer
    _layers_built[key] += 1
    return index


class AttnFFN(nn.Module):
    """Signals ``[B, H, T, 5D+2]`` -> layer output ``[B, T, n_out]``: a shared per-head up-projection, GELU,
    and one down-projection over the concatenated heads."""

    def __init__(self, d: int, n_head: int, hidden: int, n_out: int):
        super().__init__()
        self.d = d
        self.up = nn.Linear(signal_width(d), hidden)
        self.down = nn.Linear(n_head * hidden, n_out, bias=False)

    def forward(self, signals: Tensor) -> Tensor:
        B, H, T, _ = signals.shape
        vecs = signals[..., :5 * self.d].unflatten(-1, (5, self.d))
        vecs = F.rms_norm(vecs, (self.d,), eps=1e-6).flatten(-2)
        spread, entropy = signals[..., -2:-1], signals[..., -1:]
        h = F.gelu(self.up(torch.cat([vecs, torch.log1p(spread.clamp_min(0)), entropy], -1)))
        return self.down(h.transpose(1, 2).reshape(B, T, -1))


class RayTentionLayer(nn.Module):
    """``x [B, T, C]`` -> ``[B, T, C]``; keys are the token embeddings ``[B, T, C]`` from ``ctx`` (D = C)."""

    def __init__(self, n_embd: int, n_head: int, ffn_hidden: int, tau_init: float, gamma_init: float,
                 block_size: int, layer_index: int):
        super().__init__()
        for name, value in (("gamma_init", gamma_init), ("tau_init", tau_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < gamma_init < 1.0:
            raise ValueError(f"gamma_init must be in (0, 1), got {gamma_init}")
        if tau_init <= 0:
            raise ValueError(f"tau_init must be > 0, got {tau_init}")
        for name, value in (("block_size", block_size), ("heads", n_head), ("ffn_hidden", ffn_hidden)):
            check_int(name, value)
        self.n_embd, self.n_head, self.block_size, self.layer_index = n_embd, n_head, block_size, layer_index
        self.q_proj = nn.Linear(n_embd, n_head * n_embd, bias=False)
        self.log_tau = nn.Parameter(torch.full((n_head,), math.log(tau_init)))
        self.gamma_logit = nn.Parameter(torch.full((n_head,), math.log(gamma_init / (1.0 - gamma_init))))
        self.ffn = AttnFFN(n_embd, n_head, ffn_hidden, n_embd)

    @property
    def holds_history(self) -> bool:
        """Whether this layer's ``state_bytes`` counts the shared token history (the first layer only)."""
        return self.layer_index == 0

    def _query(self, x: Tensor) -> Tensor:
        """``x [B, T, C]`` -> per-head queries ``[B, H, T, C]``."""
        B, T, _ = x.shape
        return self.q_proj(x).view(B, T, self.n_head, self.n_embd).transpose(1, 2)

    def _signals(self, x: Tensor, keys: Tensor, q_offset: int, block_k: int) -> Tensor:
        q = self._query(x)
        return raytention_signals(q, keys.to(q.dtype), self.log_tau.exp(), F.logsigmoid(self.gamma_logit),
                                  q_offset, self.block_size, block_k)

    def forward(self, x: Tensor, ctx) -> Tensor:
        return self.ffn(self._signals(x, ctx.embed(ctx.tokens), 0, self.block_size))

    def init_state(self, batch: int, device, dtype) -> TokenHistory:
        return TokenHistory(torch.zeros(batch, 0, dtype=torch.int32, device=device))

    def step(self, x: Tensor, ctx, state: TokenHistory) -> tuple[Tensor, TokenHistory]:
        """``x [B, T_new, C]`` for tokens ``ctx.tokens [B, T_new]`` after ``state``: every new query is scored
        against all past and new keys (the signals depend on the query, so nothing else can be kept)."""
        if not isinstance(state, TokenHistory):
            raise TypeError(f"RayTention needs a TokenHistory (its init_state), got {type(state).__name__}")
        if ctx.tokens.shape[:2] != x.shape[:2] or state.ids.shape[0] != x.shape[0]:
            raise ValueError(f"x {tuple(x.shape)}, ctx.tokens {tuple(ctx.tokens.shape)} and the state's ids "
                             f"{tuple(state.ids.shape)} must agree on batch (and new length)")
        ids = extend_history(state.ids, ctx.tokens)
        return self._read_history(x, ctx, ids, state.ids.shape[1]), TokenHistory(ids)

    def _read_history(self, x: Tensor, ctx, ids: Tensor, start: int) -> Tensor:
        """Outputs of ``x [B, T_new, C]``, the tokens at positions ``start..`` whose ids close ``ids [B, start +
        T_new]``."""
        # a decoding query is one row: key blocks as long as DECODE_KEY_BLOCK cost one small tile, and each block
        # is several launches (H100: 2.4 ms a step at 16K with 65536-key blocks, 356 ms with 64)
        block_k = max(self.block_size, DECODE_KEY_BLOCK)
        if torch.is_grad_enabled() and (x.requires_grad or ctx.embed.weight.requires_grad):
            return self.ffn(self._signals(x, ctx.embed(ids), start, block_k))
        # without gradients the keys are looked up block by block: the history's embeddings are never all alive
        q = self._query(x)
        return self.ffn(raytention_signals_lookup(q, ids, ctx.embed.weight.to(q.dtype), self.log_tau.exp(),
                                                  F.logsigmoid(self.gamma_logit), start, self.block_size, block_k))

    # static decoding: the ids go to a preallocated buffer; the work per step grows with the history, so the
    # step is not captured in a CUDA graph (its variant is the position itself)
    capturable = False

    def init_static_state(self, batch: int, capacity: int, device, dtype, shared: dict) -> StaticTokenHistory:
        if "token_ids" not in shared:
            shared["token_ids"] = StaticTokenHistory(torch.zeros(batch, capacity, dtype=torch.int32, device=device))
        return shared["token_ids"]

    def static_variant(self, pos: int) -> int:
        return pos

    def eager_state(self, state: StaticTokenHistory, seen: int) -> TokenHistory:
        return TokenHistory(state.ids[:, :seen])

    def prefill_static(self, x: Tensor, ctx, state: StaticTokenHistory, start: int) -> Tensor:
        if not isinstance(state, StaticTokenHistory):
            raise TypeError(f"RayTention needs a StaticTokenHistory (its init_static_state), got {type(state).__name__}")
        end = start + x.shape[1]
        if ctx.tokens.shape[:2] != x.shape[:2] or state.ids.shape[0] != x.shape[0] or end > state.ids.shape[1]:
            raise ValueError(f"x {tuple(x.shape)} and ctx.tokens {tuple(ctx.tokens.shape)} at position {start} do "
                             f"not fit the static ids {tuple(state.ids.shape)}")
        if self.holds_history:
            state.ids[:, start:end] = ctx.tokens
        return self._read_history(x, ctx, state.ids[:, :end], start)

    def step_static(self, x: Tensor, ctx, state: StaticTokenHistory, variant: int) -> Tensor:
        return self.prefill_static(x, ctx, state, variant)

    def state_from_ids(self, ids: Tensor) -> TokenHistory:
        """The state after ``ids [B, T]`` int32: the ids themselves (what ``step`` would have kept); every layer
        gets the same tensor."""
        return TokenHistory(ids)

    def state_bytes(self, context_len: int, batch: int = 1, dtype=torch.bfloat16) -> int:
        """The shared int32 token ids (``dtype`` does not apply) in the first layer, 0 in the others."""
        check_state_bytes_args(context_len, batch)
        return 4 * batch * context_len if self.holds_history else 0


@register("raytention", heads=None, ffn_hidden=None, tau_init=None, gamma_init=0.7, block_size=1024)
class RayTention(Mechanism):
    """Registry entry: RayTention replaces the whole attention layer (it reads token ids and embeddings, not
    q/k/v), so it is built only through ``make_layer``. Options: ``heads`` (default ``config.n_head``),
    ``ffn_hidden`` (default ``n_embd``), ``tau_init`` (default ``sqrt(n_embd)``), ``gamma_init``,
    ``block_size`` (query and key block of the blocked pass; every block costs a few launches, so large blocks
    are much faster on a GPU: 20 ms vs 4.3 s forward at 4K tokens on an H100 for 1024 vs 64)."""

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, **options):
        raise TypeError("raytention replaces the whole attention layer and has no q/k/v form; build it with "
                        "GPT(GPTConfig(mechanism='raytention')) or RayTention.make_layer(config)")

    @classmethod
    def make_layer(cls, config) -> RayTentionLayer:
        _, options = lookup(config.mechanism)
        unknown = set(config.mechanism_options) - set(options)
        if unknown:
            raise ValueError(f"unknown raytention options {sorted(unknown)}; known: {sorted(options)}")
        options.update(config.mechanism_options)
        def given(name, default):   # None means the default; 0 is refused, not replaced
            return default if options[name] is None else options[name]
        return RayTentionLayer(
            n_embd=config.n_embd,
            n_head=given("heads", config.n_head),
            ffn_hidden=given("ffn_hidden", config.n_embd),
            tau_init=given("tau_init", math.sqrt(config.n_embd)),
            gamma_init=options["gamma_init"],
            block_size=options["block_size"],
            layer_index=_next_layer_index(config),
        )
