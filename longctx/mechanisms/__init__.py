"""Attention mechanisms behind one interface (see ``base``). Importing this package registers them all."""
from .base import Mechanism, build_mechanism, lookup, register, registered, tensor_bytes
from .full import FullAttention, KVCache
from .sliding_window import SlidingWindowAttention, WindowCache, sliding_window_attention
from ..distributed.mechanism import RingAttention  # registers "ring"
from .raytention import RayTention  # registers "raytention"
from .tensor_cache import TensorCache  # registers "tensor_cache"
from .power import PowerRetention  # registers "power", "power4"

__all__ = ["Mechanism", "build_mechanism", "lookup", "register", "registered", "tensor_bytes",
           "FullAttention", "KVCache", "SlidingWindowAttention", "WindowCache", "sliding_window_attention"]
