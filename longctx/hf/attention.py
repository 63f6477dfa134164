"""longctx's exact attention as transformers attention functions (``AttentionInterface``).

Two names, registered when ``longctx.hf`` is imported:

- ``"longctx"``: exact causal attention on this device (``longctx.attention.attention``: PyTorch's fused kernels);
  with ``document_ids`` (packed rows) attention stays inside each document.
- ``"longctx_ring"``: exact causal attention with the sequence split over a process group
  (``longctx.distributed.ring_attention``); each rank runs the model on its shard, and the call must carry
  ``ring=RingGroup(...)`` (``SequenceParallel.shard`` builds the inputs) so that a full, unsharded sequence is
  never mistaken for a shard.

Both follow transformers' signature ``fn(module, query [B, Hq, T, D], key [B, Hkv, S, D], value, attention_mask,
scaling=..., dropout=..., **kwargs) -> (out [B, T, Hq, D], None)``. Causality and documents are this module's
business: the mask function registered beside them (``no_mask``) builds nothing and refuses a padding mask (an
all-ones one, as ``generate`` passes, is fine), and position ids that restart inside a row (packed documents)
without ``document_ids`` are refused rather than attended across. Non-causal modules, sliding-window layers and
attention dropout are refused too. Nothing in transformers is patched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from ..attention import attention
from ..distributed import ring_attention
from ..distributed.comm import RingComm
from ..distributed.layout import check_layout

EXACT = "longctx"
RING = "longctx_ring"


@dataclass(frozen=True)
class RingGroup:
    """Where a sharded call's sequence lives: ``group`` (None: the default group) and its ``layout``."""

    group: dist.ProcessGroup | None = None
    layout: str = "zigzag"

    def __post_init__(self):
        check_layout(self.layout)


def no_mask(attention_mask: Tensor | None = None, **kwargs) -> None:
    """transformers mask function for both names: no mask is built (the attention knows causality and documents);
    a 2D padding mask that hides any token is refused (one host sync per forward when a mask is passed)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("longctx attention takes no padding: rows are causal by position; pack documents with "
                         "document_ids (see longctx.hf.document_ids) instead of padding")
    return None


def _refuse_unsupported(name: str, module, query: Tensor, attention_mask, dropout: float, sliding_window,
                        position_ids: Tensor | None, document_ids: Tensor | None) -> None:
    if attention_mask is not None:
        raise ValueError(f"attention {name!r} takes no attention mask, got one of shape {tuple(attention_mask.shape)}")
    if getattr(module, "is_causal", True) is False:
        raise ValueError(f"attention {name!r} is causal only; {type(module).__name__} is not causal")
    if sliding_window is not None or getattr(module, "sliding_window", None) is not None:
        raise ValueError(f"attention {name!r} has no sliding window; {type(module).__name__} uses one")
    if dropout:
        raise ValueError(f"attention {name!r} has no attention dropout; got dropout={dropout} (set the config's "
                         "attention_dropout to 0)")
    if (document_ids is None and position_ids is not None and position_ids.shape[-1] > 1
            and getattr(module, "layer_idx", 0) == 0 and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())):
        raise ValueError(f"attention {name!r}: position_ids restart inside a row (packed documents); pass "
                         "document_ids=longctx.hf.document_ids(position_ids=...) so that attention stays inside each "
                         "document")


def exact_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float | None = None,
                    dropout: float = 0.0, sliding_window=None, document_ids: Tensor | None = None,
                    position_ids: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """``"longctx"``: causal attention of ``query [B, Hq, T, D]`` over ``key, value [B, Hkv, S, D]`` (``S >= T``: a
    cache's keys come first); ``document_ids [B, T]`` (int64, with ``S == T``) keeps each query in its document."""
    _refuse_unsupported(EXACT, module, query, attention_mask, dropout, sliding_window, position_ids, document_ids)
    if document_ids is None:
        return attention(query, key, value, causal=True, scale=scaling).transpose(1, 2), None
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"document_ids need the whole row in one call (no cache): got {query.shape[2]} queries "
                         f"and {key.shape[2]} keys")
    out = ring_attention(query, key, value, causal=True, layout="contiguous", scale=scaling,
                         document_ids=document_ids, comm=RingComm.alone())
    return out.transpose(1, 2), None


def sharded_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      scaling: float | None = None, dropout: float = 0.0, sliding_window=None,
                      ring: RingGroup | None = None, document_ids: Tensor | None = None,
                      position_ids: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """``"longctx_ring"``: this rank's shard ``query [B, Hq, L, D]``, ``key, value [B, Hkv, L, D]`` of a sequence
    split over ``ring.group`` in ``ring.layout``; exact causal attention over the whole sequence (documents kept
    apart with ``document_ids [B, L]``, this rank's part)."""
    _refuse_unsupported(RING, module, query, attention_mask, dropout, sliding_window, position_ids, document_ids)
    if not isinstance(ring, RingGroup):
        raise ValueError(f"attention {RING!r} runs on a shard of the sequence: call the model with the inputs of "
                         "longctx.hf.SequenceParallel.shard (they carry ring=RingGroup(...)); got ring="
                         f"{type(ring).__name__ if ring is not None else None}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"attention {RING!r} is for training and prefill without a cache: got {query.shape[2]} "
                         f"queries and {key.shape[2]} keys")
    if document_ids is None and RingComm(ring.group).world_size == 1:   # a group of one: exactly "longctx"
        return attention(query, key, value, causal=True, scale=scaling).transpose(1, 2), None
    out = ring_attention(query, key, value, group=ring.group, causal=True, layout=ring.layout, scale=scaling,
                         document_ids=document_ids)
    return out.transpose(1, 2), None
