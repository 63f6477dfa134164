"""Power retention (issue 4): weights ``g_ij (scale q_i . k_j)^p`` normalised by their sum, with a state of
``C(d+p-1, p) x (e+1)`` numbers per KV head whatever the context length.

``naive`` is the quadratic definition (the tests' oracle), ``expand`` the symmetric power feature map,
``chunk`` the chunked training form and the ``power_retention`` entry point, ``continued`` the same from an
incoming state (the kernel's part and the state's, added), ``recurrent`` the decoding form,
``mechanism`` the registered ``"power"`` / ``"power4"``. The Triton kernels: ``chunk_triton`` (the chunked form,
forward and backward) and ``decode_triton`` (one decoding step), imported only where they run.
"""
from .chunk import power_retention, power_retention_chunk
from .continued import power_retention_continued
from .expand import check_deg, expanded_dim, sympow
from .mechanism import PowerRetention
from .naive import power_retention_naive
from .recurrent import PowerState, init_power_state, power_retention_step, power_state_bytes

__all__ = ["power_retention", "power_retention_chunk", "power_retention_continued", "power_retention_naive", "power_retention_step",
           "init_power_state", "power_state_bytes", "PowerState", "PowerRetention", "sympow", "expanded_dim",
           "check_deg"]
