"""Per-token importance scores for KV-cache pruning (kvpress-style: one small class per method).

Every scorer maps the stored keys of one layer to a score per token; the cache keeps the highest scores.
Shapes: ``keys, values [B, Hkv, S, D]`` (keys as cached, i.e. rotated), ``positions [B, Hkv, S]`` (each token's
original position), ``t`` the position of the newest token. Returns ``scores [B, Hkv, S]`` (higher = keep).

Scorers that look at queries (SnapKV, H2O: ``needs_queries = True``) get the rotated queries of every forward
through ``observe`` (the cache collects them with hooks, see ``CompressedCache(model=...)``) and keep what they
need in the layer's ``scorer_state`` dict; a ``[B, Hkv, S]`` tensor under ``"per_token"`` follows the pruning.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .calibration import QueryStats
from .rope import to_complex

#: Future offsets δ at which TriAttention predicts attention: 1, 2, 4, …, 2^16.
FUTURE_OFFSETS = tuple(2 ** i for i in range(17))


class Scorer:
    """Base class: ``score(keys, values, positions, t, layer_idx, state) -> [B, Hkv, S]``."""

    name = ""
    needs_queries = False

    def observe(self, state: dict, queries: Tensor, query_positions: Tensor, keys: Tensor, positions: Tensor,
                scaling: float) -> None:
        """See the rotated ``queries [B, H, T, D]`` at ``query_positions [T]`` after ``keys [B, Hkv, S, D]``
        (new ones included, at ``positions [B, Hkv, S]``) were stored."""

    def score(self, keys: Tensor, values: Tensor, positions: Tensor, t: int, layer_idx: int,
              state: dict | None = None) -> Tensor:
        raise NotImplementedError

    # Static steps (``FixedBudgetLayer.bind``): the state in buffers of fixed shape, updated in place.
    def bind_static(self, state: dict, capacity: int, fill: int) -> None:
        """Move ``state`` into fixed buffers for a layer of ``capacity`` slots, ``fill`` of them stored."""

    def observe_static(self, state: dict, query: Tensor, position: Tensor, key_slots: Tensor, slot: Tensor,
                       scaling: float) -> None:
        """See one rotated ``query [B, H, 1, D]`` at ``position [1]`` (device) after its key was written into
        ``key_slots [B, Hkv, C, D]`` at ``slot [1]``; slots after ``slot`` hold no token. Shapes never change."""

    def fill_static(self, state: dict, fill: int) -> None:
        """The layer's host count caught up: ``fill`` slots are stored (before a prune, and when it stops)."""

    def after_prune_static(self, state: dict, kept: int) -> None:
        """The layer was pruned to its first ``kept`` slots (``state`` as ``select`` left it)."""

    def unbind_static(self, state: dict, fill: int) -> None:
        """Back to the eager form, ``fill`` slots stored."""


def attention_weights(queries: Tensor, query_positions: Tensor, keys: Tensor, positions: Tensor,
                      scaling: float) -> Tensor:
    """Causal softmax weights ``[B, Hkv, G, T, S]`` of ``queries [B, H, T, D]`` over ``keys [B, Hkv, S, D]``."""
    b, h, n, d = queries.shape
    n_kv = keys.shape[1]
    q = queries.to(torch.float32).view(b, n_kv, h // n_kv, n, d)
    logits = torch.einsum("bkgtd,bksd->bkgts", q, keys.to(torch.float32)) * scaling
    future = positions[:, :, None, None, :] > query_positions.to(positions.device)[:, None]      # [B,Hkv,1,T,S]
    return logits.masked_fill(future, float("-inf")).softmax(-1)


class StreamingLLMScorer(Scorer):
    """Attention sinks + recency: the first ``n_sink`` positions always, then the most recent tokens."""

    name = "streamingllm"

    def __init__(self, n_sink: int = 4):
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        self.n_sink = n_sink

    def score(self, keys, values, positions, t, layer_idx, state=None):
        scores = positions.to(torch.float64)
        return scores.masked_fill(positions < self.n_sink, float("inf"))


class KeyNormScorer(Scorer):
    """Keys with a low L2 norm are kept (they tend to draw more attention; Devoto et al. 2024)."""

    name = "keynorm"

    def score(self, keys, values, positions, t, layer_idx, state=None):
        return -keys.to(torch.float64).norm(dim=-1)


def expected_logits(mu: Tensor, abs_mean: Tensor, keys_unrot: Tensor, distance: Tensor, inv_freq: Tensor,
                    attention_scaling: float, offsets=FUTURE_OFFSETS) -> Tensor:
    """TriAttention's estimate of the logit a future query will give each key, averaged over ``offsets``, as the
    paper writes it, in the un-rotated frame (:class:`TriAttentionScorer` computes the same in the rotated one).

    ``mu [Hkv, G, F]`` complex query centres and ``abs_mean [Hkv, G, F]`` = E|q_f| of the G query heads sharing
    each KV head; ``keys_unrot [B, Hkv, S, D]`` un-rotated keys; ``distance [B, Hkv, S]`` = t − p.
    Returns ``[B, Hkv, G, S]`` float64 (no 1/√D factor):
      mean_δ Σ_f s² |μ_f||k_f| cos((t−p+δ)ω_f + φ_f) + Σ_f s² (a_f − |μ_f|)|k_f|,  φ_f = arg(μ_f·conj(k_f)).
    """
    k = to_complex(keys_unrot.to(torch.float64))[:, :, None]                     # [B, Hkv, 1, S, F]
    omega = inv_freq.to(torch.float64).to(k.device)
    delta = torch.tensor(offsets, dtype=torch.float64, device=k.device)
    mean_phase = torch.polar(torch.ones_like(omega), delta[:, None] * omega).mean(0)   # mean_δ e^{iδω}  [F]
    angle = distance.to(torch.float64)[:, :, None, :, None] * omega               # [B, Hkv, 1, S, F]
    # |μ||k| cos(Δω + δω + φ) = Re(μ·conj(k)·e^{iΔω}·e^{iδω}); the mean over δ moves inside Re.
    rotating = (mu[None, :, :, None] * k.conj() * torch.polar(torch.ones_like(angle), angle) * mean_phase).real
    constant = (abs_mean - mu.abs())[None, :, :, None] * k.abs()
    return attention_scaling ** 2 * (rotating + constant).sum(-1)


def znorm(x: Tensor, dim: int = -1) -> Tensor:
    """Standardise along ``dim`` (zero mean, unit standard deviation; constant rows become 0)."""
    centred = x - x.mean(dim, keepdim=True)
    return centred / x.std(dim, keepdim=True, unbiased=False).clamp_min(1e-12)


class TriAttentionScorer(Scorer):
    """Predicted future attention from calibrated query centres (TriAttention, arXiv 2604.04921).

    Scores are z-normalised per query head over the stored tokens; each KV head takes the maximum over the
    query heads that read it (grouped-query attention).

    Computed in the keys' rotated frame, where it is two matrix products. A key cached at position ``p`` is
    ``k = s·e^{ipω}·u`` (``u`` un-rotated), so in :func:`expected_logits` ``conj(u_f)·e^{i(t−p)ω_f} =
    conj(k_f)·e^{itω_f} / s`` and ``|u_f| = |k_f| / s``: the position cancels, and for each query head

        logit = s · (Σ_f Re(c_f · conj(k_f)) + Σ_f w_f |k_f|),  c_f = μ_f · mean_δ e^{iδω_f} · e^{itω_f},  w_f = a_f − |μ_f|

    where ``Re(c·conj(k)) = c.re·k.re + c.im·k.im`` is a dot product with the cached key vector itself
    (rotate-half pairing). Same value as :func:`expected_logits` on the un-rotated keys (the tests check both
    against a pure-Python reference), without a ``[B, Hkv, G, S, D/2]`` complex temporary: float64 in batch slices
    of at most ``SLICE_BYTES`` of keys, so pruning a large batch needs little memory.
    """

    name = "triattention"
    SLICE_BYTES = 256 * 2 ** 20

    def __init__(self, stats: QueryStats, offsets=FUTURE_OFFSETS):
        if not isinstance(stats, QueryStats):
            raise ValueError("method 'triattention' needs stats=QueryStats (from longctx.kv.calibrate / load_stats), "
                             f"got {type(stats).__name__}")
        self.stats = stats
        self.offsets = tuple(offsets)
        self._on_device: dict = {}

    def _query_side(self, layer_idx: int, n_kv: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu·mean_δ e^{iδω} [Hkv, G, F] complex128, w [Hkv, G, F] float64, ω [F] float64)`` on ``device``,
        copied there once per layer (no host-to-device copy per call)."""
        key = (layer_idx, n_kv, device)
        if key not in self._on_device:
            stats = self.stats
            omega = stats.rope.inv_freq.to(torch.float64)
            delta = torch.tensor(self.offsets, dtype=torch.float64)
            mean_phase = torch.polar(torch.ones_like(omega), delta[:, None] * omega).mean(0)            # [F]
            mu = stats.mu[layer_idx].view(n_kv, stats.n_heads // n_kv, -1)
            w = stats.abs_mean[layer_idx].view_as(mu.real) - mu.abs()
            self._on_device[key] = (mu * mean_phase).to(device), w.to(device), omega.to(device)
        return self._on_device[key]

    def score(self, keys, values, positions, t, layer_idx, state=None):
        stats = self.stats
        b, n_kv, s, d = keys.shape
        if layer_idx >= stats.n_layers or stats.n_heads % n_kv or d != stats.rope.head_dim:
            raise ValueError(f"stats ({stats.n_layers} layers, {stats.n_heads} query heads, head_dim "
                             f"{stats.rope.head_dim}) do not match the cache (layer {layer_idx}, {n_kv} KV heads, "
                             f"head_dim {d}); calibrate on this model")
        centre, w, omega = self._query_side(layer_idx, n_kv, keys.device)
        c = centre * torch.polar(torch.ones_like(omega), t * omega)                                 # [Hkv, G, F]
        rotating = torch.cat([c.real, c.imag], dim=-1).transpose(-1, -2)                           # [Hkv, D, G]
        magnitude = w.transpose(-1, -2)                                                            # [Hkv, F, G]
        rows = max(1, self.SLICE_BYTES // max(1, n_kv * s * d * 8))
        out = []
        for i in range(0, b, rows):
            k = keys[i:i + rows].to(torch.float64)                                                 # [b', Hkv, S, D]
            k_abs = torch.linalg.vector_norm(torch.stack(k.chunk(2, dim=-1)), dim=0)               # [b', Hkv, S, F]
            logits = stats.rope.attention_scaling * (k @ rotating + k_abs @ magnitude)             # [b', Hkv, S, G]
            out.append(znorm(logits, dim=-2).amax(dim=-1))
        return torch.cat(out) if len(out) > 1 else out[0]


class SnapKVScorer(Scorer):
    """Attention that the last ``observation`` queries give each key, averaged over those queries, summed over
    the query heads of a KV head and max-pooled over ``kernel`` neighbouring tokens (SnapKV, Li et al. 2024)."""

    name = "snapkv"
    needs_queries = True

    def __init__(self, observation: int = 32, kernel: int = 7):
        if observation < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"observation must be >= 1 and kernel odd >= 1, got {observation}, {kernel}")
        self.observation, self.kernel = observation, kernel

    def observe(self, state, queries, query_positions, keys, positions, scaling):
        if "queries" in state:
            queries = torch.cat([state["queries"], queries], dim=2)
            query_positions = torch.cat([state["query_positions"], query_positions])
        state["queries"] = queries[:, :, -self.observation:]
        state["query_positions"] = query_positions[-self.observation:]
        state["scaling"] = scaling

    def bind_static(self, state, capacity, fill):
        """The last ``observation`` queries in a ring buffer: position ``p`` in entry ``p % observation``."""
        n = state["queries"].shape[2] if "queries" in state else 0
        if n < self.observation:
            raise ValueError(f"method 'snapkv' takes static steps after at least observation={self.observation} "
                             f"tokens; the prompt gave {n}")
        entry = state["query_positions"] % self.observation
        state["queries"] = state["queries"].index_copy(2, entry, state["queries"])
        state["query_positions"] = state["query_positions"].index_copy(0, entry, state["query_positions"])

    def observe_static(self, state, query, position, key_slots, slot, scaling):
        entry = position % self.observation
        state["queries"].index_copy_(2, entry, query)
        state["query_positions"].index_copy_(0, entry, position)

    def unbind_static(self, state, fill):
        order = state["query_positions"].argsort()
        state["queries"], state["query_positions"] = state["queries"][:, :, order], state["query_positions"][order]

    def score(self, keys, values, positions, t, layer_idx, state=None):
        if not state or "queries" not in state:
            raise ValueError("method 'snapkv' needs the queries: build the cache with CompressedCache(..., model=model)")
        w = attention_weights(state["queries"], state["query_positions"], keys, positions, state["scaling"])
        scores = w.mean(3).sum(2)                                                               # [B, Hkv, S]
        return torch.nn.functional.max_pool1d(scores.flatten(0, 1)[:, None], self.kernel, 1, self.kernel // 2
                                              ).view_as(scores)


class H2OScorer(Scorer):
    """Heavy hitters: attention each key has received from every query so far, summed over the query heads of
    its KV head (H2O, Zhang et al. 2023)."""

    name = "h2o"
    needs_queries = True
    chunk = 256

    def observe(self, state, queries, query_positions, keys, positions, scaling):
        acc = state.get("per_token")
        new = keys.shape[2] - (0 if acc is None else acc.shape[-1])
        acc = positions.new_zeros(positions.shape, dtype=torch.float32) if acc is None else \
            torch.cat([acc, acc.new_zeros(*acc.shape[:2], new)], dim=-1)
        for i in range(0, queries.shape[2], self.chunk):    # bounded memory on long prefills
            w = attention_weights(queries[:, :, i:i + self.chunk], query_positions[i:i + self.chunk], keys, positions,
                                  scaling)
            acc += w.sum((2, 3))
        state["per_token"] = acc

    def bind_static(self, state, capacity, fill):
        """The accumulated attention in a buffer of one entry per slot (``"slots"``); ``"per_token"`` is the
        view of the stored slots."""
        acc = state["per_token"]
        state["slots"] = acc.new_zeros(*acc.shape[:2], capacity)
        state["slots"][:, :, :fill] = acc
        self.fill_static(state, fill)

    def observe_static(self, state, query, position, key_slots, slot, scaling):
        acc = state["slots"]
        acc.index_fill_(2, slot, 0.0)                             # a new token: nothing received yet
        b, h, _, d = query.shape
        n_kv, capacity = key_slots.shape[1], key_slots.shape[2]
        q = query.to(torch.float32).view(b, n_kv, h // n_kv, 1, d)
        logits = torch.einsum("bkgtd,bksd->bkgts", q, key_slots.to(torch.float32)) * scaling
        empty = torch.arange(capacity, device=slot.device) > slot                    # slots past the new token
        acc += logits.masked_fill(empty, float("-inf")).softmax(-1).sum((2, 3))

    def fill_static(self, state, fill):
        state["per_token"] = state["slots"][:, :, :fill]

    def after_prune_static(self, state, kept):
        state["slots"][:, :, :kept] = state["per_token"]
        self.fill_static(state, kept)

    def unbind_static(self, state, fill):
        state["per_token"] = state.pop("slots")[:, :, :fill]

    def score(self, keys, values, positions, t, layer_idx, state=None):
        if not state or "per_token" not in state:
            raise ValueError("method 'h2o' needs the queries: build the cache with CompressedCache(..., model=model)")
        return state["per_token"].to(torch.float64)


SCORERS = {cls.name: cls for cls in (TriAttentionScorer, StreamingLLMScorer, KeyNormScorer, SnapKVScorer, H2OScorer)}


def build_scorer(method: str, stats: QueryStats | None = None, **options) -> Scorer:
    """The scorer registered as ``method`` (``triattention`` needs ``stats``)."""
    if method not in SCORERS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(sorted(SCORERS))}")
    if method == "triattention":
        return TriAttentionScorer(stats, **options)
    if stats is not None:
        raise ValueError(f"method {method!r} takes no stats")
    return SCORERS[method](**options)
