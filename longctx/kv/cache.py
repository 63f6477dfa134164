"""A transformers ``Cache`` that prunes itself: keeps ``budget`` tokens per layer, chosen by a scorer.

Modelled on transformers' ``DynamicSlidingWindowLayer``: the layer stores fewer tokens than it has seen, counts
the tokens seen (``get_seq_length``, so generation gives new tokens their true positions), returns the full
states from ``update`` for the current forward and reports mask sizes consistent with what it stores
(stored tokens all lie before the new ones, so every stored token is visible to every new query).

Assumes unpadded batches: token ``i`` of the stream has rotary position ``i`` in every batch row.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from .calibration import QueryStats
from .rope import rope_spec, rotate
from .scorers import Scorer, build_scorer

#: Tokens a layer may grow past ``budget`` before it is pruned back (amortises the scoring cost).
PRUNE_SLACK = 128
#: Most recent tokens always kept (when not given: this, or half the budget if smaller).
DEFAULT_WINDOW = 64


class CompressedLayer(DynamicLayer):
    """One layer's pruned KV cache: ``keys, values [B, Hkv, S, D]`` and ``positions [B, Hkv, S]`` (original)."""

    is_croppable = False

    def __init__(self, layer_idx: int, scorer: Scorer, budget: int, window: int, keep_prompt: bool,
                 slack: int = PRUNE_SLACK, queries: "QueryTap | None" = None):
        super().__init__()
        self.queries = queries
        self.scorer_state: dict = {}
        self.layer_idx, self.scorer, self.budget, self.window = layer_idx, scorer, budget, window
        self.keep_prompt, self.slack = keep_prompt, slack
        self.cumulative_length = 0
        self.prompt_length = 0
        self.positions: Tensor | None = None
        self.n_pruned = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=torch.long, device=key_states.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``key_states, value_states [B, Hkv, T, D]``; return the full states for this forward, then
        prune the stored ones back to ``budget`` if they reached ``budget + slack``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.prompt_length = key_states.shape[-2]
        b, h, n = key_states.shape[:3]
        new_positions = torch.arange(self.cumulative_length, self.cumulative_length + n, device=self.positions.device)
        self.cumulative_length += n
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions.expand(b, h, n)], dim=-1)
        full_keys, full_values = self.keys, self.values
        if self.scorer.needs_queries:
            q, scaling = self.queries.take(self.layer_idx, new_positions)
            self.scorer.observe(self.scorer_state, q, new_positions, self.keys, self.positions, scaling)
        if self.keys.shape[-2] >= self.budget + self.slack:
            self.prune()
        return full_keys, full_values

    def protected(self, positions: Tensor | None = None) -> Tensor:
        """``[B, Hkv, S]`` bool: which of ``positions`` (default: the stored ones) are never pruned (recent
        window, and the prompt with keep_prompt)."""
        positions = self.positions if positions is None else positions
        keep = positions >= self.cumulative_length - self.window
        if self.keep_prompt:
            keep |= positions < self.prompt_length
        return keep

    def protected_count(self) -> int:
        """How many tokens :meth:`protected` marks in every batch row and KV head, counted on the host (no device
        sync): of the positions ``[0, seen)`` only ``[first, seen − window)`` are unprotected (``first`` = the
        prompt length with keep_prompt, else 0), and every protected token is stored (each prune keeps them all)."""
        seen = self.cumulative_length
        first = self.prompt_length if self.keep_prompt else 0
        return seen - max(0, seen - self.window - first)

    def select(self, keys: Tensor, values: Tensor, positions: Tensor) -> Tensor:
        """Indices ``[B, Hkv, budget]`` into ``keys, values [B, Hkv, S, D]`` at ``positions [B, Hkv, S]`` of the
        tokens to keep: per batch row and KV head the ``budget`` best scored (protected ones first), sorted (so
        the kept tokens stay in position order). Raises if the protected tokens alone exceed the budget."""
        n_protected = self.protected_count()
        if n_protected > self.budget:
            raise ValueError(f"budget={self.budget} is smaller than the protected tokens ({n_protected}: window="
                             f"{self.window}" + (f", prompt={self.prompt_length} with keep_prompt" if self.keep_prompt
                                                 else "") + "); raise budget")
        scores = self.scorer.score(keys, values, positions, self.cumulative_length - 1, self.layer_idx,
                                   self.scorer_state)
        scores = scores.to(torch.float64).masked_fill(self.protected(positions), float("inf"))
        idx = scores.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        if "per_token" in self.scorer_state:
            self.scorer_state["per_token"] = self.scorer_state["per_token"].gather(-1, idx)
        return idx

    @torch.no_grad()
    def prune(self) -> None:
        """Keep the ``budget`` best-scored tokens per batch row and KV head (protected ones first), in order."""
        idx = self.select(self.keys, self.values, self.positions)                         # [B, Hkv, budget]
        self.positions = self.positions.gather(-1, idx)
        self.keys = self.keys.gather(-2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(-2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.n_pruned += 1

    def get_mask_sizes(self, query: int | Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset): the stored tokens are presented as the ones just before the new queries."""
        query_length = query if isinstance(query, int) else int(query.shape[0])
        stored = self.keys.shape[-2] if self.is_initialized else 0
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): the position the next token gets."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def stored_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def reset(self) -> None:
        """Forget every stored token. (Not left to transformers: in 5.17 its ``reset`` zeroes the keys in place
        and keeps them, which would leave zero keys of the old length to attend to.)"""
        super().reset()
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.positions = None
        self.scorer_state = {}
        self.prompt_length = 0
        self.n_pruned = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a CompressedCache cannot be cropped (pruned tokens are gone)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.is_initialized:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self.positions = self.positions[indices, ...]


class FixedBudgetLayer(CompressedLayer):
    """:class:`CompressedLayer` in buffers allocated once: ``key_slots, value_slots [B, Hkv, budget + slack, D]``
    and ``position_slots [B, Hkv, budget + slack]``, of which the first ``fill`` slots are stored tokens (in
    position order); ``keys, values, positions`` are views of those slots, so every reader of a
    ``CompressedLayer`` (mask sizes, ``stored_length``, the tests) sees the same stored tokens.

    A forward of ``n`` tokens either

    - fits without reaching the prune (``fill + n < budget + slack``): the new tokens are copied into the next
      free slots (slice assignment at the host's ``fill``) and the forward attends to the view of the first
      ``fill + n`` slots: the stored tokens are neither copied nor moved, and nothing cache-sized is allocated; or
    - reaches it (``fill + n >= budget + slack``: every ``slack``-th decode step, the prompt, and any chunk longer
      than the free slots, so the buffer can never overflow): the forward attends to a temporary of the stored
      and new tokens, which the scorer scores, and the kept ones are gathered from it into the front of the
      slots. The temporary is needed because ``update`` runs before attention: gathering in place would
      overwrite the keys this forward is about to read.

    The kept tokens, and so the logits, are those of a :class:`CompressedLayer` fed the same tokens: same
    scores on the same tensors in the same order, same selection (:meth:`CompressedLayer.select`).

    Host syncs: none in the cache (counts are host ints, the protected count included; TriAttention copies its
    statistics to the device once).

    *Static steps* (:meth:`bind`, used by ``longctx.kv.graphs.SlotDecoder``): a one-token ``update`` writes its
    key, value and position into the slot whose index lives in device memory and returns every slot, so the
    step has the same shapes and launches at every position and can be replayed from a CUDA graph; the
    attention reads the valid slots only (its length is passed beside the slots). The host's counts then lag
    behind: the decoder brings them up with :meth:`advance` before a prune and when it stops. Scorers that look
    at the queries keep their state in fixed buffers meanwhile (``Scorer.bind_static``: SnapKV a ring of its last
    queries, H2O one accumulated attention per slot, updated from the new query over every valid slot).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity = self.budget + self.slack
        self.fill = 0
        self.key_slots: Tensor | None = None
        self.value_slots: Tensor | None = None
        self.position_slots: Tensor | None = None
        self.bound: tuple[Tensor, Tensor] | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the slots (or reuse those of before a ``reset`` if batch, heads, head size, dtype and device
        are the same)."""
        b, h = key_states.shape[:2]
        want = ((b, h, self.capacity, key_states.shape[-1]), (b, h, self.capacity, value_states.shape[-1]),
                key_states.dtype, value_states.dtype, key_states.device)
        if self.key_slots is None or want != (self.key_slots.shape, self.value_slots.shape, self.key_slots.dtype,
                                              self.value_slots.dtype, self.key_slots.device):
            self.key_slots = key_states.new_zeros(want[0])
            self.value_slots = value_states.new_zeros(want[1])
            self.position_slots = torch.zeros(b, h, self.capacity, dtype=torch.long, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True
        self._set_fill(0)

    def _set_fill(self, fill: int) -> None:
        self.fill = fill
        self.keys = self.key_slots[:, :, :fill]
        self.values = self.value_slots[:, :, :fill]
        self.positions = self.position_slots[:, :, :fill]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Store ``key_states, value_states [B, Hkv, T, D]``; return the stored and new states for this forward
        (a view of the slots, or on a pruning step a temporary), pruning back to ``budget`` at ``budget + slack``."""
        if self.bound is not None:
            return self._write_bound(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.prompt_length = key_states.shape[-2]
        b, h, n = key_states.shape[:3]
        if (b, h) != tuple(self.key_slots.shape[:2]):
            raise ValueError(f"layer {self.layer_idx}: key_states have batch {b} and {h} KV heads, the cache holds "
                             f"{tuple(self.key_slots.shape[:2])}; call reset() before a new batch")
        new_positions = torch.arange(self.cumulative_length, self.cumulative_length + n, device=self.device)
        self.cumulative_length += n
        fill = self.fill
        pruning = fill + n >= self.capacity
        if not pruning:
            self.key_slots[:, :, fill:fill + n] = key_states
            self.value_slots[:, :, fill:fill + n] = value_states
            self.position_slots[:, :, fill:fill + n] = new_positions
            self._set_fill(fill + n)
            keys, values, positions = self.keys, self.values, self.positions
        else:
            keys = torch.cat([self.keys, key_states], dim=-2) if fill else key_states
            values = torch.cat([self.values, value_states], dim=-2) if fill else value_states
            positions = torch.cat([self.positions, new_positions.expand(b, h, n)], dim=-1)
        if self.scorer.needs_queries:
            q, scaling = self.queries.take(self.layer_idx, new_positions)
            self.scorer.observe(self.scorer_state, q, new_positions, keys, positions, scaling)
        if pruning:
            self._prune_into_slots(keys, values, positions)
        return keys, values

    def bind(self, slot: Tensor | None, position: Tensor | None = None) -> None:
        """Static steps: from now on ``update`` takes one token and writes it into slot ``slot`` at position
        ``position`` (int64 ``[1]`` tensors on the cache's device, advanced by the caller) and returns all slots;
        host counts are not touched (:meth:`advance`). ``bind(None)`` goes back to ordinary updates."""
        if slot is None:
            if self.bound is not None:
                self.scorer.unbind_static(self.scorer_state, self.fill)
            self.bound = None
            return
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx}: prefill the cache before static steps")
        for name, t in (("slot", slot), ("position", position)):
            if not isinstance(t, Tensor) or t.shape != (1,) or t.dtype != torch.long or t.device != self.device:
                raise ValueError(f"{name} must be an int64 tensor of shape [1] on {self.device}, got "
                                 f"{t.dtype if isinstance(t, Tensor) else type(t).__name__} "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else ''} on "
                                 f"{t.device if isinstance(t, Tensor) else '-'}")
        if self.bound is None:
            self.scorer.bind_static(self.scorer_state, self.capacity, self.fill)
        self.bound = (slot, position)

    def _write_bound(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        b, h, n = key_states.shape[:3]
        if n != 1 or (b, h) != tuple(self.key_slots.shape[:2]):
            raise ValueError(f"layer {self.layer_idx}: a static step takes one token of batch "
                             f"{self.key_slots.shape[0]} and {self.key_slots.shape[1]} KV heads, got key_states of "
                             f"shape {tuple(key_states.shape)}")
        slot, position = self.bound
        self.key_slots.index_copy_(2, slot, key_states)
        self.value_slots.index_copy_(2, slot, value_states)
        self.position_slots.index_copy_(2, slot, position.expand(b, h, 1))
        if self.scorer.needs_queries:
            q, scaling = self.queries.take(self.layer_idx, position)
            self.scorer.observe_static(self.scorer_state, q, position, self.key_slots, slot, scaling)
        return self.key_slots, self.value_slots

    def advance(self, n: int) -> None:
        """Count ``n`` static steps on the host: ``n`` more tokens seen and stored."""
        if self.fill + n > self.capacity:
            raise ValueError(f"layer {self.layer_idx}: {n} static steps from fill {self.fill} overflow the "
                             f"{self.capacity} slots")
        self.cumulative_length += n
        self._set_fill(self.fill + n)
        if self.bound is not None:
            self.scorer.fill_static(self.scorer_state, self.fill)

    @torch.no_grad()
    def fill_random(self, seen: int) -> None:
        """Benchmarks: every slot gets random keys and values (standard normal) and the latest ``capacity``
        positions before ``seen``, as if ``seen`` tokens had gone through and the next step were to prune."""
        if not self.is_initialized or seen < self.capacity:
            raise ValueError(f"fill_random needs an initialised layer and seen >= {self.capacity} slots, got {seen}")
        self.key_slots.normal_()
        self.value_slots.normal_()
        self.position_slots.copy_(torch.arange(seen - self.capacity, seen, device=self.device))
        self.cumulative_length = seen
        self._set_fill(self.capacity)

    @torch.no_grad()
    def _prune_into_slots(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Gather the tokens :meth:`select` keeps out of ``keys, values [B, Hkv, S, D]`` at ``positions [B, Hkv, S]``
        (S >= budget) into the first ``budget`` slots."""
        idx = self.select(keys, values, positions)                                          # [B, Hkv, budget]
        k = self.budget
        self.position_slots[:, :, :k] = positions.gather(-1, idx)
        self.key_slots[:, :, :k] = keys.gather(-2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        self.value_slots[:, :, :k] = values.gather(-2, idx[..., None].expand(-1, -1, -1, values.shape[-1]))
        self._set_fill(k)
        self.n_pruned += 1
        if self.bound is not None:
            self.scorer.after_prune_static(self.scorer_state, k)

    def prune(self) -> None:
        """Prune the stored tokens back to ``budget`` now (``update`` does it on its own at ``budget + slack``)."""
        self._prune_into_slots(self.keys, self.values, self.positions)   # each gather is read before it is written

    def reset(self) -> None:
        """Forget the stored tokens; the slots stay allocated for the next sequence."""
        super().reset()
        self.fill = 0
        self.bound = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            for slots in (self.key_slots, self.value_slots, self.position_slots):
                slots.copy_(slots.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Changes the batch size, so the slots are allocated anew."""
        if self.is_initialized:
            self.key_slots, self.value_slots, self.position_slots = (
                s.repeat_interleave(repeats, dim=0) for s in (self.key_slots, self.value_slots, self.position_slots))
            self._set_fill(self.fill)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Changes the batch size, so the slots are allocated anew."""
        if self.is_initialized:
            self.key_slots, self.value_slots, self.position_slots = (
                s[indices, ...] for s in (self.key_slots, self.value_slots, self.position_slots))
            self._set_fill(self.fill)


class QueryTap:
    """Forward hooks on each attention's query projection of ``model``: hands a layer its new queries, rotated
    at their positions (``[B, H, T, D]``), for scorers that need them (SnapKV, H2O)."""

    def __init__(self, model):
        from .calibration import _query_modules

        self.spec = rope_spec(model.config)
        self.pending: dict[int, Tensor] = {}
        modules = _query_modules(model)
        attn = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
        attn.sort(key=lambda m: m.layer_idx)
        self.scaling = [float(getattr(a, "scaling", self.spec.head_dim ** -0.5)) for a in attn]
        self.handles = [m.register_forward_hook(self._hook(i, h)) for i, (m, h) in enumerate(modules)]

    def _hook(self, layer_idx: int, n_heads: int):
        def hook(_module, _inputs, out):
            b, t = out.shape[:2]
            self.pending[layer_idx] = out.detach().reshape(b, t, n_heads, self.spec.head_dim).transpose(1, 2)
        return hook

    def take(self, layer_idx: int, positions: Tensor) -> tuple[Tensor, float]:
        """The queries of ``layer_idx``'s last forward rotated at ``positions [T]`` (device; the rotary
        frequencies are copied to the device once, so a static step copies nothing from the host)."""
        q = self.pending.pop(layer_idx, None)
        if q is None or q.shape[2] != positions.shape[0]:
            raise RuntimeError(f"no queries captured for layer {layer_idx}: was the cache built with this model?")
        if self.spec.inv_freq.device != q.device:
            self.spec = replace(self.spec, inv_freq=self.spec.inv_freq.to(q.device))
        return rotate(q, positions, self.spec), self.scaling[layer_idx]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class CompressedCache(Cache):
    """KV cache for ``model.generate(..., past_key_values=CompressedCache(...))`` that keeps ``budget`` tokens.

    ``method``: ``triattention`` (needs ``stats``), ``streamingllm``, ``keynorm``, ``snapkv``, ``h2o``. Whenever a
    layer stores ``budget + slack`` tokens it is pruned back to ``budget``: per batch row and KV head its own
    selection (same count), always keeping the ``window`` most recent tokens (default ``min(64, budget // 2)``;
    and the prompt with ``keep_prompt``).
    ``snapkv`` and ``h2o`` look at the queries: pass ``model=`` (forward hooks are added to it; ``detach()``
    removes them).
    ``fixed=True``: each layer keeps its tokens in buffers of ``budget + slack`` slots allocated once
    (:class:`FixedBudgetLayer`) instead of growing by concatenation; same kept tokens, same outputs.
    """

    def __init__(self, method: str = "triattention", budget: int = 1024, stats: QueryStats | None = None,
                 window: int | None = None, keep_prompt: bool = False, slack: int = PRUNE_SLACK, model=None,
                 fixed: bool = False, **scorer_options):
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int (tokens kept per layer), got {budget!r}")
        if window is None:
            window = min(DEFAULT_WINDOW, budget // 2)
        if not isinstance(window, int) or not 0 <= window <= budget:
            raise ValueError(f"window must be an int in [0, budget={budget}], got {window!r}")
        if not isinstance(slack, int) or slack < 1:
            raise ValueError(f"slack must be a positive int, got {slack!r}")
        self.method, self.budget, self.window, self.keep_prompt, self.slack = method, budget, window, keep_prompt, slack
        self.fixed = bool(fixed)
        self.scorer = build_scorer(method, stats=stats, **scorer_options)
        if self.scorer.needs_queries and model is None:
            raise ValueError(f"method {method!r} looks at the queries: pass model=the model that will use the cache")
        self.query_tap = QueryTap(model) if self.scorer.needs_queries else None
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> CompressedLayer:
        layer_class = FixedBudgetLayer if self.fixed else CompressedLayer
        return layer_class(len(self.layers), self.scorer, self.budget, self.window, self.keep_prompt, self.slack,
                           self.query_tap)

    def detach(self) -> None:
        """Remove the query hooks this cache added to the model (snapkv, h2o)."""
        if self.query_tap is not None:
            self.query_tap.remove()

    def stored_length(self, layer_idx: int = 0) -> int:
        """Tokens currently stored by ``layer_idx`` (≤ budget + slack − 1 between forwards)."""
        return self.layers[layer_idx].stored_length() if layer_idx < len(self.layers) else 0
