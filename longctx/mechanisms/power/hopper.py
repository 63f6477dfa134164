"""Hand-written Hopper (sm_90a, wgmma) kernels in place of some of ``chunk_triton``'s Triton kernels, chosen with
``KernelConfig(cuda=(...))``: ``"deltas"`` (``state_deltas.cu``: the states between chunks, ``S`` and ``Z``, both
directions, summed there: in place of Triton's contributions and scan), ``"out"``
(``forward_out.cu``: the forward's output kernel, 128 query rows a block), and three kernels that stream a state
through shared memory (``state_stream.cuh``: a producer thread copying pieces with the bulk tensor copy engine through
the state's ``tensor_map``, consumer warpgroups multiplying every piece):
``"dq"`` (``state_dq.cu``: the state part of dq, 256 rows a block; ``_bwd_dq`` adds the rest), ``"out_state"``
(``state_out.cu``: the state part of the forward's output, the same design; ``_fwd_out`` adds the rest) and
``"dkv"`` (``state_dkv.cu``: the state part of dk and dv, 128 key rows a block, both products; ``_bwd_dkv`` adds the
rest).

Compiled at first use for sm_90a with NVRTC through ``torch.cuda._compile_kernel`` (PyTorch >= 2.8, a CUDA build):
no C++ extension and no ``nvcc``. They cover bf16 inputs, ``d = e = 64``, the default feature steps (column blocks
of 16, 16 values of ``a`` a step) and chunks of whole tiles (64 tokens; 128 for ``"out"`` and ``"dkv"``, 256 for
``"dq"`` and ``"out_state"``). The Triton kernels cover the rest and are what CI tests (no GPU there): these are
checked against them, against the PyTorch references below and against the float64 reference on the GPU
(``tests/test_power_kernel.py``, the Hopper cases). The default configuration (``KernelConfig(cuda="auto")``) takes
the deltas kernel and the three state parts (``chunk_triton.AUTO``) wherever they run; measured speeds are in
``benchmarks/power_retention_notes.md`` (v8-v18).
"""
from __future__ import annotations

import ctypes
import functools
import re
import struct
import warnings
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).parent
KERNELS = {"deltas": ("state_deltas.cu", "power_state_deltas", 100352),      # name -> (file, entry, dynamic smem)
           "out": ("forward_out.cu", "power_forward_out", 101632),
           "dq": ("state_dq.cu", "power_state_dq", 103552),
           "out_state": ("state_out.cu", "power_state_out", 103552),
           "dkv": ("state_dkv.cu", "power_state_dkv", 85120)}
COMMON = "hopper_common.cuh"                   # the helpers every kernel includes
FB, FA = 16, 16                                # the feature steps the kernels are written for
TILE = {"deltas": 64, "out": 128, "dq": 256, "out_state": 256, "dkv": 128}   # the chunk holds whole tiles / blocks
STREAMED = ("dq", "out_state", "dkv")          # the kernels of state_stream.cuh, reading the state by tensor_map


def why_not(name: str, X: Tensor, d: int, e: int, fb: int, fa: int, chunk: int, operands: str) -> str | None:
    """Why kernel ``name`` cannot run these inputs with ``KernelConfig.operands`` (``None``: it can)."""
    if not isinstance(name, str) or name not in KERNELS:
        return f"unknown CUDA kernel {name!r} (known: {', '.join(KERNELS)})"
    if X.dtype != torch.bfloat16:
        return f"dtype {X.dtype}, not bf16"
    if operands != "bf16":
        return f"operands {operands!r}, not 'bf16'"
    if (d, e) != (64, 64):
        return f"d={d}, e={e}; the kernels are written for (and tested at) d = e = 64"
    if (fb, fa) != (FB, FA):
        return f"feature steps of {fb} x {fa}; the kernel needs {FB} x {FA}"
    if chunk % TILE[name]:
        return f"chunk {chunk} is not a multiple of {TILE[name]}"
    if not X.is_cuda:
        return f"inputs on {X.device}, not CUDA"
    if torch.cuda.get_device_capability(X.device) != (9, 0):
        return f"{torch.cuda.get_device_name(X.device)} is not a Hopper GPU (sm_90)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"PyTorch {torch.__version__} has no torch.cuda._compile_kernel (2.8 or newer)"
    if name in STREAMED and _encode_tiled() is None:
        return "the CUDA driver library (libcuda.so.1) has no cuTensorMapEncodeTiled (CUDA 12 or newer)"
    return None


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    """The driver's ``cuTensorMapEncodeTiled`` (``None`` where libcuda.so.1 or the function is missing)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


def tensor_map(S: Tensor) -> Tensor:
    """The TMA descriptor (a ``CUtensorMap``: 128 bytes, uint8 on ``S``'s device) through which the state kernels'
    producer copies ``S [.., f, 64]`` (bf16, contiguous; states or their gradients) viewed as ``[rows, 64]``: boxes
    of 64 rows (a piece: 64 features, 8 KB), the 128-byte swizzle the consumers' wgmma descriptors read, L2 promotion
    of 256 bytes. The kernels address a piece by its first row, a 32-bit coordinate."""
    if S.dtype != torch.bfloat16 or S.dim() < 2 or S.shape[-1] != 64 or not S.is_contiguous():
        raise ValueError(f"tensor_map takes a contiguous bf16 [.., f, 64] state, got {S.dtype} {tuple(S.shape)} "
                         f"(contiguous: {S.is_contiguous()})")
    rows = S.numel() // 64
    if rows >= 1 << 31:
        raise ValueError(f"{rows} state rows exceed the kernels' 32-bit row coordinates (2^31): split the batch")
    if not S.is_cuda or _encode_tiled() is None:
        raise ValueError(f"tensor_map needs a CUDA tensor and the CUDA driver's cuTensorMapEncodeTiled (S on "
                         f"{S.device})")
    if torch.cuda.is_current_stream_capturing():   # a CUDA graph: its own descriptor, in the graph's memory
        return _on_device(_encode(S.data_ptr(), rows), S.device)
    return _tensor_map_at(S.device.index, S.data_ptr(), rows)


@functools.lru_cache(maxsize=64)
def _tensor_map_at(device: int, address: int, rows: int) -> Tensor:
    """``tensor_map``'s descriptor, which depends on nothing but the address and the rows: kept (the last 64), so
    that a step whose states land where the last step's did (PyTorch's caching allocator) builds none."""
    return _on_device(_encode(address, rows), torch.device("cuda", device))


def _encode(address: int, rows: int) -> bytes:
    """The 128 bytes of ``tensor_map``'s descriptor for ``rows`` rows of 64 bf16 from ``address``."""
    desc = (ctypes.c_uint8 * 128)()
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    # bf16 (9), rank 2, dims (64, rows), a row every 128 bytes, 64 x 64 boxes, unit steps; no interleave (0), the
    # 128-byte swizzle (3), 256-byte L2 promotion (3), zeros out of bounds (0)
    err = _encode_tiled()(desc, 9, 2, ctypes.c_void_p(address), (u64 * 2)(64, rows), (u64 * 1)(128),
                          (u32 * 2)(64, 64), (u32 * 2)(1, 1), 0, 3, 3, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for a state of {rows} rows at "
                           f"{address:#x}")
    return bytes(desc)


def _on_device(data: bytes, device) -> Tensor:
    """``data`` (a multiple of 8 bytes) as uint8 on ``device``, written by fill kernels, one a non-zero 8-byte word,
    rather than copied from host memory: that copy waits for the device's queue (a step at 4K took 7.05 ms with a
    copy a launch, 6.76 with the descriptors kept; notes v16) and cannot be captured in a CUDA graph."""
    words = struct.unpack(f"<{len(data) // 8}q", data)
    out = torch.zeros(len(words), dtype=torch.int64, device=device)
    for i, word in enumerate(words):
        if word:
            out[i].fill_(word)
    return out.view(torch.uint8)


def _source(file: str) -> str:
    """The kernel's source with every ``#include "..."`` replaced by the header's own source (nvcc finds the headers
    beside the file; NVRTC is given one string, with no include path that depends on the PyTorch version)."""
    return re.sub(r'#include "([\w.]+)"', lambda m: _source(m.group(1)), (HERE / file).read_text())


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device: int):
    file, entry, smem = KERNELS[name]
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(_source(file), entry, compute_capability="90a")
        if smem:
            kernel.set_shared_memory_config(smem)
    return kernel


@functools.lru_cache(maxsize=None)
def compiles(name: str, device: int) -> bool:
    """Whether kernel ``name`` compiles for this GPU (``KernelConfig(cuda="auto")`` asks before taking it: NVRTC or
    the driver may refuse sm_90a code that an explicit ``cuda=(...)`` would then raise on); warns once if not."""
    try:
        _kernel(name, device)
        return True
    except Exception as err:  # noqa: BLE001 - any compile / load failure sends "auto" to the Triton kernels
        warnings.warn(f"the CUDA kernel {name!r} did not compile ({err!r}); using the Triton kernels", stacklevel=3)
        return False


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# The deltas kernel's walk and the carry as measured on an H100 (notes v17, v18): a block walks a token of its
# segment in ~0.02 us where 2 blocks share an SM (10.4 us a 512-token slot), in ~0.72 of that alone on an SM; the
# carry (chunk_triton._scan in segments) reads and writes states at ~2.7 TB/s (2.7e6 bytes a us)
WALK_US_PER_TOKEN = 0.0203
ALONE = 0.72
CARRY_BYTES_PER_US = 2.7e6


def segments(blocks: int, slots: int, walk_tokens: int, carry_bytes: int, device: torch.device) -> int:
    """Into how many segments ``state_deltas`` splits each KV head's ``slots`` chunk slots, for ``blocks`` blocks a
    segment that walk ``walk_tokens`` tokens a slot, where the carry moves ``carry_bytes`` a slot (read and
    written, every KV head): the count of least modelled time. The walk takes the slots of a segment times the
    waves of 2 blocks an SM (a last wave of at most one block an SM at ``ALONE``); the carry skips the first
    segment, whose states are whole. One segment on the benchmark's grids up to 32K tokens (H100: 11 blocks a KV
    head, 128K tokens a step), 3 at 64K and 128K."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _segments(blocks, slots, walk_tokens, carry_bytes, sms)


@functools.lru_cache(maxsize=1024)
def _segments(blocks: int, slots: int, walk_tokens: int, carry_bytes: int, sms: int) -> int:
    def modelled_us(n: int) -> float:
        per = -(-slots // n)
        waves, rest = divmod(n * blocks, 2 * sms)
        load = waves + (0.0 if rest == 0 else 1.0 if rest > sms else ALONE)
        return load * per * walk_tokens * WALK_US_PER_TOKEN + (slots - per) * carry_bytes / CARRY_BYTES_PER_US

    counts = {-(-slots // -(-slots // n)) for n in range(1, min(slots, 64) + 1)}   # a count for each segment length
    return min(sorted(counts), key=modelled_us)


def state_deltas(X: Tensor, Y: Tensor, G: Tensor, steps: Tensor, SB: Tensor, ZB: Tensor, den: Tensor | None,
                 delta: Tensor | None, *, ns: int, nc: int, chunk: int, f: int, hq: int, hkv: int, batch: int,
                 scale: float, has_gate: bool, backward: bool, nseg: int) -> None:
    """Writes ``SB [B*Hkv, nc - 1, f, 64]`` (bf16, feature steps ``0 .. ns - 1``) and ``ZB [B*Hkv, nc - 1, 64, 64]``
    (fp32): the states between chunks (``chunk_triton._states``' slots), each of ``nseg`` segments of
    ``ceil((nc - 1) / nseg)`` slots summed from zero at its start (``segments``; ``chunk_triton._scan`` completes
    the later ones). ``X [B, H, Tp, 64]``, ``Y [B, H, Tp, 64]`` bf16 contiguous (H = Hkv forward, Hq backward),
    ``G [B*Hkv, Tp]`` the in-chunk gate sums (fp32), ``steps`` int32 ``[ns * 3]``, ``den, delta [B, Hq, Tp]`` fp32
    (backward)."""
    _kernel("deltas", X.device.index)(
        grid=(ns + 1, nseg, batch * hkv), block=(128, 1, 1), shared_mem=KERNELS["deltas"][2],
        args=[X, Y, G, steps, SB, ZB, G if den is None else den, G if delta is None else delta, nc, chunk, f, ns,
              hq, hkv, int(backward), int(has_gate), float(scale * scale)])


def forward_out(q: Tensor, k: Tensor, v: Tensor, G: Tensor, steps: Tensor, SB: Tensor, ZB: Tensor, O: Tensor,
                O32: Tensor, DEN: Tensor, *, ns: int, nc: int, chunk: int, f: int, hq: int, hkv: int, batch: int,
                scale: float, has_gate: bool) -> None:
    """Writes ``O [B, Hq, Tp, 64]`` (bf16), ``O32`` (fp32) and ``DEN [B, Hq, Tp]`` (``chunk_triton._fwd_out``):
    ``q [B, Hq, Tp, 64]``, ``k, v [B, Hkv, Tp, 64]`` bf16 contiguous, ``SB``, ``ZB`` the states between chunks."""
    _kernel("out", q.device.index)(
        grid=(nc * chunk // 128, batch * hq, 1), block=(256, 1, 1), shared_mem=KERNELS["out"][2],
        args=[q, k, v, G, steps, SB, ZB, O, O32, DEN, nc, chunk, f, ns, hq, hkv, int(has_gate), float(scale)])


def state_dq(q: Tensor, do: Tensor, den: Tensor, G: Tensor, SB: Tensor, U: Tensor, V: Tensor, *, nc: int,
             chunk: int, f: int, hq: int, hkv: int, batch: int, scale: float, has_gate: bool) -> None:
    """Writes the state part of dq for the rows of chunks ``1 .. nc - 1`` (chunk 0 has no state; its rows are left
    as they are): ``U [B, Hq, Tp, 64]`` (fp32, ``r dq``) and ``V [B, Hq, Tp]`` (fp32, ``r phi(q) . g``), what
    ``state_dq_reference`` computes. ``q, do [B, Hq, Tp, 64]`` bf16 contiguous, ``den [B, Hq, Tp]`` fp32, ``G`` the
    in-chunk gate sums ``[B*Hkv, Tp]`` (fp32), ``SB [B*Hkv, nc - 1, f, 64]`` the forward's states (bf16)."""
    _kernel("dq", q.device.index)(
        grid=((nc - 1) * chunk // 256, batch * hq, 1), block=(640, 1, 1), shared_mem=KERNELS["dq"][2],
        args=[q, do, den, G, tensor_map(SB), U, V, nc, chunk, f, hq, hkv, int(has_gate), float(scale * scale)])


def _states_of_rows(G: Tensor, SB: Tensor, *, batch: int, hq: int, hkv: int, tp: int, chunk: int, scale: float,
                    has_gate: bool) -> tuple[Tensor, Tensor]:
    """For the references below: the states ``[B, hq, nc - 1, F, e]`` (float32) as the query heads read them, and
    the rows' factor ``r = scale^2 exp(G) [B, hq, Tp - chunk]`` for the rows after chunk 0."""
    kv = torch.arange(hq, device=SB.device) // (hq // hkv)
    S = SB.view(batch, hkv, tp // chunk - 1, -1, SB.shape[-1])[:, kv].float()
    Gq = G.view(batch, hkv, tp)[:, kv, chunk:] if has_gate else torch.zeros(batch, hq, tp - chunk, device=SB.device)
    return S, scale * scale * torch.exp(Gq)


def _per_chunk(x: Tensor, S: Tensor, chunk: int) -> Tensor:
    """``x [.., (nc - 1) chunk, K] @ S [.., nc - 1, K, N]``, chunk by chunk: ``[.., (nc - 1) chunk, N]``."""
    return torch.cat([x[..., m * chunk:(m + 1) * chunk, :] @ S[..., m, :, :] for m in range(S.shape[-3])], dim=-2)


def _features(x: Tensor, weighted: bool, dtype: torch.dtype) -> Tensor:
    """The features ``[.., F]`` of ``x [.., d]`` (float32) as the kernels build them: block pairs ``A <= B`` of 16
    columns, ``(a, b)`` row-major in a pair, ``w x_a x_b`` rounded to ``dtype`` (``w`` 1, or with ``weighted`` 2 on
    the pairs off the diagonal)."""
    blocks = [x[..., 16 * A:16 * A + 16] for A in range(x.shape[-1] // 16)]
    phi = torch.cat([(2.0 if weighted and A != Bk else 1.0) * blocks[A][..., :, None] * blocks[Bk][..., None, :]
                     for A in range(len(blocks)) for Bk in range(A, len(blocks))], dim=-2).flatten(-2)
    return phi.to(dtype).float()


def _fold(g: Tensor, x: Tensor, weighted: bool) -> Tensor:
    """The chain rule through ``_features``' products (not their rounding): ``dx [.., d]`` from the features'
    gradient ``g [.., F]``, ``dx_a += w sum_b g_ab x_b``, ``dx_b += w sum_a g_ab x_a``."""
    dx = torch.zeros_like(x)
    f0 = 0
    for A in range(x.shape[-1] // 16):
        for Bk in range(A, x.shape[-1] // 16):
            w = 2.0 if weighted and A != Bk else 1.0
            gp = g[..., f0:f0 + 256].unflatten(-1, (16, 16))                        # [.., a, b]
            xa, xb = x[..., 16 * A:16 * A + 16], x[..., 16 * Bk:16 * Bk + 16]
            dx[..., 16 * A:16 * A + 16] += w * torch.einsum("...ab,...b->...a", gp, xb)
            dx[..., 16 * Bk:16 * Bk + 16] += w * torch.einsum("...ab,...a->...b", gp, xa)
            f0 += 256
    return dx


def state_dq_reference(q: Tensor, do: Tensor, den: Tensor, G: Tensor, SB: Tensor, *, chunk: int, hkv: int,
                       scale: float, has_gate: bool) -> tuple[Tensor, Tensor]:
    """PyTorch reference of ``state_dq`` (float32): ``(U, V)`` with ``U [B, Hq, Tp, 64]`` and ``V [B, Hq, Tp]``, zero
    on chunk 0's rows. For row i of chunk n >= 1 with the state ``S`` entering it, ``g_i = dnum_i S^T`` over the
    features (block pairs ``A <= B`` of 16 columns, ``(a, b)`` row-major in a pair, weight 1 on diagonal pairs and 2
    off them), ``dnum_i = do_i (1 / den_i)`` rounded to ``S``'s dtype; ``dq_i = sum_pairs w (g_i q_i[B] -> a,
    g_i^T q_i[A] -> b)``, ``U_i = r_i dq_i``, ``V_i = r_i (q_i . dq_i) / 2``, ``r_i = scale^2 exp(G_i)``."""
    B, hq, Tp, d = q.shape
    S, r = _states_of_rows(G, SB, batch=B, hq=hq, hkv=hkv, tp=Tp, chunk=chunk, scale=scale, has_gate=has_gate)
    inv = 1.0 / torch.where(den == 0, 1.0, den)[:, :, chunk:, None]        # a reciprocal, as the kernels take it
    dn = (do[:, :, chunk:].float() * inv).to(SB.dtype).float()
    qr = q[:, :, chunk:].float()
    dq = _fold(_per_chunk(dn, S.transpose(-1, -2), chunk), qr, weighted=True)
    U = torch.zeros(B, hq, Tp, d, device=q.device)
    V = torch.zeros(B, hq, Tp, device=q.device)
    U[:, :, chunk:] = r[..., None] * dq
    V[:, :, chunk:] = r * (qr * dq).sum(-1) / 2
    return U, V


def state_out(q: Tensor, G: Tensor, SB: Tensor, U: Tensor, *, nc: int, chunk: int, f: int, hq: int, hkv: int,
              batch: int, scale: float, has_gate: bool) -> None:
    """Writes the state part of the forward's numerator for the rows of chunks ``1 .. nc - 1`` (chunk 0's rows are
    left as they are): ``U [B, Hq, Tp, 64]`` (fp32, ``r phi(q) S``), what ``state_out_reference`` computes.
    ``q [B, Hq, Tp, 64]`` bf16 contiguous, ``G`` the in-chunk gate sums ``[B*Hkv, Tp]`` (fp32), ``SB`` the states
    ``[B*Hkv, nc - 1, f, 64]`` (bf16)."""
    _kernel("out_state", q.device.index)(
        grid=((nc - 1) * chunk // 256, batch * hq, 1), block=(640, 1, 1), shared_mem=KERNELS["out_state"][2],
        args=[q, G, tensor_map(SB), U, nc, chunk, f, hq, hkv, int(has_gate), float(scale * scale)])


def state_out_reference(q: Tensor, G: Tensor, SB: Tensor, *, chunk: int, hkv: int, scale: float,
                        has_gate: bool) -> Tensor:
    """PyTorch reference of ``state_out`` (float32): ``U [B, Hq, Tp, 64]``, zero on chunk 0's rows. For row i of
    chunk n >= 1 with the state ``S`` entering it, ``U_i = r_i phi(q_i) S`` with the features of the block pairs
    ``A <= B`` of 16 columns (``(a, b)`` row-major in a pair), ``phi_(a, b) = w q_a q_b`` rounded to ``S``'s dtype
    (``w`` 1 on diagonal pairs, 2 off them) and ``r_i = scale^2 exp(G_i)``."""
    B, hq, Tp, _ = q.shape
    S, r = _states_of_rows(G, SB, batch=B, hq=hq, hkv=hkv, tp=Tp, chunk=chunk, scale=scale, has_gate=has_gate)
    num = _per_chunk(_features(q[:, :, chunk:].float(), True, SB.dtype), S, chunk)
    U = torch.zeros(B, hq, Tp, SB.shape[-1], device=q.device)
    U[:, :, chunk:] = r[..., None] * num
    return U


def state_dkv(k: Tensor, v: Tensor, G: Tensor, DSB: Tensor, DK: Tensor, DV: Tensor, DG: Tensor, *, nc: int,
              chunk: int, f: int, batch: int, hkv: int, has_gate: bool) -> None:
    """Writes the state part of dk, dv and the keys' gate gradient for the rows of chunks ``0 .. nc - 2`` (the last
    chunk's rows are left as they are): ``DK, DV [B, Hkv, Tp, 64]`` and ``DG [B, Hkv, Tp]`` (fp32), what
    ``state_dkv_reference`` computes. ``k, v [B, Hkv, Tp, 64]`` bf16 contiguous, ``G`` the in-chunk gate sums
    ``[B*Hkv, Tp]`` (fp32), ``DSB [B*Hkv, nc - 1, f, 64]`` the gradients of the states leaving the chunks (bf16)."""
    _kernel("dkv", k.device.index)(
        grid=((nc - 1) * chunk // 128, batch * hkv, 1), block=(640, 1, 1), shared_mem=KERNELS["dkv"][2],
        args=[k, v, G, tensor_map(DSB), DK, DV, DG, nc, chunk, f, int(has_gate)])


def state_dkv_reference(k: Tensor, v: Tensor, G: Tensor, DSB: Tensor, *, chunk: int,
                        has_gate: bool) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch reference of ``state_dkv`` (float32): ``(DK, DV, DG)``, ``[B, Hkv, Tp, 64]`` twice and ``[B, Hkv, Tp]``,
    zero on the last chunk's rows. For key row j of chunk n <= nc - 2 with ``dS`` the gradient of the state leaving
    it: ``dv_j = phi(k_j) dS`` (``phi_(a, b) = k_a k_b`` rounded to ``dS``'s dtype, the features of the block pairs
    ``A <= B`` of 16 columns, no pair weight: the query side's is inside ``dS``), ``g_j = v_j dS^T``, ``dk_j =
    sum_pairs (g_j k_j[B] -> a, g_j^T k_j[A] -> b)``; ``DV_j = beta_j dv_j``, ``DK_j = beta_j dk_j``, ``DG_j =
    beta_j (k_j . dk_j) / 2`` with ``beta_j = exp(G_end - G_j)``, ``G_end`` the last in-chunk gate sum of j's
    chunk."""
    B, hkv, Tp, d = k.shape
    rows = Tp - chunk
    S = DSB.view(B, hkv, Tp // chunk - 1, -1, DSB.shape[-1]).float()
    if has_gate:
        Gc = G.view(B, hkv, Tp // chunk, chunk)[:, :, :-1]
        beta = torch.exp(Gc[..., -1:] - Gc).flatten(-2)
    else:
        beta = torch.ones(B, hkv, rows, device=k.device)
    kr, vr = k[:, :, :rows].float(), v[:, :, :rows].float()
    dv = _per_chunk(_features(kr, False, DSB.dtype), S, chunk)
    dk = _fold(_per_chunk(vr, S.transpose(-1, -2), chunk), kr, weighted=False)
    DK, DV = torch.zeros(B, hkv, Tp, d, device=k.device), torch.zeros(B, hkv, Tp, DSB.shape[-1], device=k.device)
    DG = torch.zeros(B, hkv, Tp, device=k.device)
    DK[:, :, :rows] = beta[..., None] * dk
    DV[:, :, :rows] = beta[..., None] * dv
    DG[:, :, :rows] = beta * (kr * dk).sum(-1) / 2
    return DK, DV, DG
