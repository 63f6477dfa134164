"""What the power-retention kernels compile to on an H100, read on a CPU machine with no GPU: registers, local
memory (spills), shared memory, Hopper matrix instructions (HGMMA) against the older HMMA, loads Triton turned
into asynchronous copies and synchronous tensor loads left inside loops, and the programs an SM can hold. Costs
no device time; Triton's bundled ``ptxas`` and ``cuobjdump`` do the work. The GPU machine's Triton (3.6)
allocates a little differently from this one's (3.8), so the numbers are leads to be confirmed by
``power_variants.py``'s ``kernel_info`` on the device.

    PYTHONPATH=. python benchmarks/power_kernel_resources.py                        # the default configuration
    PYTHONPATH=. python benchmarks/power_kernel_resources.py --config '{"state_rows": 32}' --T 4096 --chunk 1024

How: ``power_retention_triton``'s forward and backward run on CPU tensors with the launches recorded instead of
made (the outputs are left unwritten), then each recorded kernel is compiled for ``sm_90`` with the launch's
arguments and options.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longctx.mechanisms.power import chunk_triton as ct

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}
SM_REGISTERS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64   # H100 per-SM limits


def record_launches(cfg: ct.KernelConfig, B: int, Hq: int, Hkv: int, T: int, d: int, chunk: int) -> list:
    """``(name, kernel, args, kwargs)`` of every launch of one forward+backward, none of them made."""
    launches = []
    saved = ct._launch, ct._interpreting
    ct._launch = lambda name, kernel, grid, *args, **kw: launches.append((name, kernel, args, kw))
    ct._interpreting = lambda: False
    try:
        q = torch.randn(B, Hq, T, d, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, T, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        log_g = torch.full((B, Hkv, T), -0.01, requires_grad=True)
        ct._PowerRetentionFn.apply(q, k, v, log_g, chunk, d ** -0.5, cfg, False).sum().backward()
    finally:
        ct._launch, ct._interpreting = saved
    return launches


def compile_sm90(kernel, args: tuple, kwargs: dict):
    """The launch compiled for sm_90: tensors become 16-byte-aligned pointers, ints i32, floats fp32, ``None`` and
    bools constants, as Triton specialises them at a launch."""
    kwargs = dict(kwargs)
    options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages", "maxnreg") if o in kwargs}
    signature, constants, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is None or isinstance(value, bool):
            constants[name] = value
        elif isinstance(value, int):
            signature[name] = "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {kernel.__name__}: {type(value).__name__}")
    signature = {n: "constexpr" if n in constants else signature[n] for n in kernel.arg_names}
    src = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), options.get("num_warps", 4)


def loop_loads(ttgir: str) -> int:
    """Synchronous tensor loads (``tt.load`` of a tensor) inside loops of a kernel's TTGIR, where the pipeliner
    did not make them asynchronous copies (``ttg.async_copy_global_to_local``, issued stages ahead); such a load
    is waited on in its iteration, or, at best, issued one iteration ahead into registers."""
    count, loops, depth = 0, [], 0
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            loops.append(depth)
        if loops and " = tt.load " in line and line.rsplit(" : ", 1)[-1].startswith("tensor<"):   # not scalars
            count += 1
        depth += line.count("{") - line.count("}")
        while loops and depth <= loops[-1]:
            loops.pop()
    return count


def resources(compiled, warps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = compiled.metadata.shared
    by_regs = SM_REGISTERS // (-(-regs // 8) * 8 * 32 * warps)
    by_shared = SM_SHARED // (shared + 1024)
    out = {"regs": regs, "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)), "shared": shared,
           "warps": warps, "programs_per_sm": min(by_regs, by_shared, SM_WARPS // warps),
           "async_copies": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local"),
           "loop_loads": loop_loads(compiled.asm["ttgir"])}
    for op in ("HGMMA", "HMMA", "LDL", "STL"):
        out[op] = len(re.findall(rf"\b{op}\b", sass))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="{}", help="KernelConfig fields as JSON")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--heads", default="8,8", help="query heads, KV heads")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    hq, hkv = map(int, args.heads.split(","))
    cfg = ct.KernelConfig(**json.loads(args.config))
    report = {}
    for name, kernel, kargs, kwargs in record_launches(cfg, args.B, hq, hkv, args.T, args.head_dim, args.chunk):
        if name not in report:
            report[name] = resources(*compile_sm90(kernel, kargs, kwargs))
    if args.json:
        print(json.dumps(report))
        return
    cols = list(next(iter(report.values())))
    print(f"{'kernel':12s}" + "".join(f"{c:>{len(c) + 2}s}" for c in cols))
    for name, r in report.items():
        print(f"{name:12s}" + "".join(f"{r[c]:>{len(c) + 2}}" for c in cols))


if __name__ == "__main__":
    main()
