"""Hand-written Hopper (sm_90a, wgmma) kernels in place of some of ``chunk_triton``'s Triton kernels, chosen with
``KernelConfig(cuda=(...))``: ``"deltas"`` (``state_deltas.cu``: the state deltas' feature steps, both directions;
``Z`` stays Triton's) and ``"out"`` (``forward_out.cu``: the forward's output kernel).

Compiled at first use for sm_90a with NVRTC through ``torch.cuda._compile_kernel`` (PyTorch >= 2.8, a CUDA
build): no C++ extension and no ``nvcc``. They cover bf16 inputs, ``d = e = 64``, the default feature steps (column blocks of 16, 16 values of ``a`` a step) and chunks that are a multiple of 64.
The Triton kernels cover the rest and are what CI tests (no GPU there): these are checked against them and
against the float64 reference on the GPU (``tests/test_power_kernel.py``, the Hopper cases).

Exact (the deltas equal the Triton kernel's bitwise) but **not faster yet**: on an H100 at 4K tokens, chunk 512,
the deltas take what Triton's do (2.50 against 2.51 ms, both directions) and the output kernel 3.22 against 1.45
ms; both wait on unpipelined global loads (``benchmarks/power_retention_notes.md``, v8). Off by default.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).parent
KERNELS = {"deltas": ("state_deltas.cu", "power_state_deltas", 0),      # name -> (file, entry, dynamic smem)
           "out": ("forward_out.cu", "power_forward_out", 58368)}
COMMON = "hopper_common.cuh"                   # the helpers both kernels include
THREADS = 128                                  # one warpgroup a block
FB, FA, TILE = 16, 16, 64                      # the feature steps and the token tile the kernels are written for


def why_not(name: str, X: Tensor, d: int, e: int, fb: int, fa: int, chunk: int) -> str | None:
    """Why kernel ``name`` cannot run these inputs (``None``: it can)."""
    if not isinstance(name, str) or name not in KERNELS:
        return f"unknown CUDA kernel {name!r} (known: {', '.join(KERNELS)})"
    if not X.is_cuda:
        return f"inputs on {X.device}, not CUDA"
    if torch.cuda.get_device_capability(X.device) != (9, 0):
        return f"{torch.cuda.get_device_name(X.device)} is not a Hopper GPU (sm_90)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"PyTorch {torch.__version__} has no torch.cuda._compile_kernel (2.8 or newer)"
    if X.dtype != torch.bfloat16:
        return f"dtype {X.dtype}, not bf16"
    if (d, e) != (64, 64):
        return f"d={d}, e={e}; the kernels are written for (and tested at) d = e = 64"
    if (fb, fa) != (FB, FA):
        return f"feature steps of {fb} x {fa}; the kernel needs {FB} x {FA}"
    if chunk % TILE:
        return f"chunk {chunk} is not a multiple of {TILE}"
    return None


def _source(file: str) -> str:
    """The kernel's source with ``hopper_common.cuh`` pasted in for its ``#include`` (nvcc finds the header beside
    the file; NVRTC is given one string, with no include path that depends on the PyTorch version)."""
    return (HERE / file).read_text().replace(f'#include "{COMMON}"', (HERE / COMMON).read_text())


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device: int):
    file, entry, smem = KERNELS[name]
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(_source(file), entry, compute_capability="90a")
        if smem:
            kernel.set_shared_memory_config(smem)
    return kernel


def state_deltas(X: Tensor, Y: Tensor, G: Tensor, steps: Tensor, SB: Tensor, den: Tensor | None, *, ns: int,
                 nc: int, chunk: int, f: int, hq: int, hkv: int, batch: int, scale: float, has_gate: bool,
                 backward: bool) -> None:
    """Writes ``SB [B*Hkv, nc - 1, f, 64]`` (bf16): feature steps ``0 .. ns - 1`` of every chunk's contribution
    (``chunk_triton._state_deltas``). ``X [B, H, Tp, d]``, ``Y [B, H, Tp, 64]`` bf16 contiguous (H = Hkv forward,
    Hq backward), ``G [B*Hkv, Tp]`` the in-chunk gate sums (fp32), ``steps`` int32 ``[ns * 3]``, ``den [B, Hq, Tp]``
    (backward)."""
    _kernel("deltas", X.device.index)(
        grid=(ns, nc - 1, batch * hkv), block=(THREADS, 1, 1),
        args=[X, Y, G, steps, SB, G if den is None else den, nc, chunk, X.shape[-1], f, hq, hkv, int(backward),
              int(has_gate), float(scale * scale)])


def forward_out(q: Tensor, k: Tensor, v: Tensor, G: Tensor, steps: Tensor, SB: Tensor, ZB: Tensor, O: Tensor,
                O32: Tensor, DEN: Tensor, *, ns: int, nc: int, chunk: int, f: int, hq: int, hkv: int, batch: int,
                scale: float, has_gate: bool) -> None:
    """Writes ``O [B, Hq, Tp, 64]`` (bf16), ``O32`` (fp32) and ``DEN [B, Hq, Tp]`` (``chunk_triton._fwd_out``):
    ``q [B, Hq, Tp, 64]``, ``k, v [B, Hkv, Tp, 64]`` bf16 contiguous, ``SB``, ``ZB`` the states between chunks."""
    _kernel("out", q.device.index)(
        grid=(nc * chunk // 64, batch * hq, 1), block=(THREADS, 1, 1), shared_mem=KERNELS["out"][2],
        args=[q, k, v, G, steps, SB, ZB, O, O32, DEN, nc, chunk, f, ns, hq, hkv, int(has_gate), float(scale)])
