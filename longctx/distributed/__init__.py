"""Attention with the sequence split over devices (``torch.distributed``): ring attention and its layouts.

``ring_attention(q, k, v, group=None, causal=True, layout="zigzag")`` returns this rank's shard of exact
attention over the whole sequence; ``shard`` / ``gather`` / ``local_positions`` place a sequence in the
zigzag or contiguous layout; importing this package registers the ``"ring"`` mechanism.
``sharded_power_retention(q, k, v, log_g, deg, group=None)`` is power retention over a contiguously sharded
sequence: the ranks relay one state instead of their keys (``power.py``); ``sharded_tensor_cache(mech, q, k, v)``
the same for Tensor Cache, plus a halo of ``window`` tokens (``tensor_cache.py``); ``relay.py`` holds what both send.
The ``power``, ``power4`` and ``tensor_cache`` mechanisms use them with ``sequence_parallel=True``.
"""
from .. import mechanisms  # noqa: F401  (first: the mechanisms' registry imports .mechanism, which imports it)
from .comm import RingComm, RingCommError, RingShift
from .layout import LAYOUTS, check_seq_len, gather, local_positions, required_multiple, shard, unshard
from .mechanism import RingAttention
from .power import relay_bytes, sharded_power_retention
from .ring import KERNELS, ring_attention
from .tensor_cache import sharded_tensor_cache

__all__ = ["ring_attention", "sharded_power_retention", "relay_bytes", "sharded_tensor_cache", "KERNELS",
           "RingAttention", "RingComm", "RingCommError", "RingShift", "LAYOUTS", "check_seq_len", "gather",
           "local_positions", "required_multiple", "shard", "unshard"]
