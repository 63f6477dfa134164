"""The ``"ring"`` mechanism: exact causal attention, computed by ring attention across the ranks of the
default process group when ``torch.distributed`` is initialised with more than one rank.

Under ``torchrun`` each rank feeds the model its shard of the sequence in the mechanism's ``layout`` and
passes the shard's global positions to ``GPT.forward(positions=...)`` (``layout.local_positions``), so that
RoPE sees every token at its true position; gradients of the parameters are then summed over the ranks as
in data parallelism. Without a process group (or with one rank) it is plain causal attention.

Decoding (``step``) is single-process: a KV cache exactly like full attention's, whose size
``state_bytes`` reports for the rank that decodes.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from ..attention import attention
from ..mechanisms.base import register
from ..mechanisms.full import FullAttention
from .layout import check_layout
from .ring import ring_attention


@register("ring", layout="zigzag")
class RingAttention(FullAttention):
    """Causal softmax attention; the sequence split over the default process group's ranks (``layout``:
    ``"zigzag"`` or ``"contiguous"``) when one is initialised. ``kernel``: see ``ring.pick_kernel``."""

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int, layout: str = "zigzag", kernel: str = "auto"):
        super().__init__(n_head, n_kv_head, head_dim)
        check_layout(layout)
        self.layout, self.kernel = layout, kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.check(q, k, v)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ring_attention(q, k, v, causal=True, layout=self.layout, kernel=self.kernel)
        return attention(q, k, v, causal=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}, kernel={self.kernel!r}"
