"""Triton kernels; each module names the pure-PyTorch reference it must match and runs under TRITON_INTERPRET=1."""
