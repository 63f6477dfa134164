"""RayTention: attention history summarised as geometric signals of the token embeddings, read by a small
network (see ``docs/raytention.md``). ``naive`` is the float64 test oracle, ``blocked`` the form the layer
runs, ``layer`` the registered ``"raytention"`` model layer; ``blocked_triton`` is a Triton kernel for the forward
signals that the layer does not call (not imported here: it needs triton)."""
from .blocked import raytention_signals
from .layer import RayTention, RayTentionLayer, TokenHistory
from .naive import raytention_signals_naive, signal_width

__all__ = ["raytention_signals", "raytention_signals_naive", "signal_width", "RayTention", "RayTentionLayer",
           "TokenHistory"]
