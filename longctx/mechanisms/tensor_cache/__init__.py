"""Tensor Cache: sliding-window attention plus an associative memory fed by evicted tokens (issue 5).

``naive`` defines it token by token (the tests' oracle), ``scan`` is the chunked training form of the memory,
``window`` the blocked sliding-window attention, ``recurrent`` the decoding form, ``mechanism`` the registered
``"tensor_cache"``."""
from .mechanism import TensorCache
from .naive import tensor_cache_naive
from .recurrent import TensorCacheState
from .scan import chunk_mean_scan, decayed_scan
from .window import blocked_window_attention

__all__ = ["TensorCache", "TensorCacheState", "tensor_cache_naive", "decayed_scan", "chunk_mean_scan",
           "blocked_window_attention"]
