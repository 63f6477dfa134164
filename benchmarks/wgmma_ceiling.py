"""What Hopper's wgmma sustains in the shapes the power retention kernels can use (H100 / H200; needs
``torch.cuda._compile_kernel``): a block of one warpgroup issues groups of m64nNk16 bf16 MMAs (fp32 accumulators) in
a loop with one group in flight (``wait_group 1``), nothing else, ``blocks`` blocks an SM on every SM.

- ``rs`` / ``ss``: the A operand from registers (as the state-delta kernel's features) or from shared memory;
- ``n``: 64 (the state-delta kernel: N = e = 64, four MMAs a 16-token slice) or 256 (one MMA, a 128-float
  accumulator);
- B from shared memory, MN-major, no swizzle (the layout the kernels give Y and S).

    python benchmarks/wgmma_ceiling.py --out results/wgmma_ceiling.json

Prints and writes TFLOP/s for each variant (JSON written atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from longctx.mechanisms.power import hopper

HEADER = (hopper.HERE / hopper.COMMON).read_text()    # the kernels' own helpers: desc, wgmma fences, commit, wait


def _mma(n: int, rs: bool) -> str:
    """One m64nNk16 bf16 wgmma as a C statement accumulating into ``accr`` (n / 2 floats; overwritten in iteration
    0), A in ``a[0..3]`` (rs) or at descriptor ``da``, B at descriptor ``db`` (MN-major)."""
    nd = n // 2
    d = ", ".join(f"%{i}" for i in range(nd))
    if rs:
        a_op, ins, nxt = f"{{%{nd}, %{nd + 1}, %{nd + 2}, %{nd + 3}}}", '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])', nd + 4
    else:
        a_op, ins, nxt = f"%{nd}", '"l"(da)', nd + 1
    trans = "1" if rs else "0, 1"                  # imm-trans-b (rs); imm-trans-a, imm-trans-b (ss)
    outs = ", ".join(f'"+f"(accr[{i}])' for i in range(nd))
    return (f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nxt + 1}, 0;\\n'
            f'wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{d}}}, {a_op}, %{nxt}, p, 1, 1, {trans};\\n}}\\n"'
            f' : {outs} : {ins}, "l"(db), "r"((int)(it > 0)));')


def source(n: int, rs: bool, count: int) -> str:
    """A kernel issuing ``count`` m64nNk16 MMAs a group, ``iters`` groups."""
    nd = n // 2
    b_bytes = 16 * n * 2
    words = (b_bytes + 2048) // 2
    return HEADER + f"""
extern "C" __global__ void __launch_bounds__(128) mma_loop(float* out, int iters) {{
    __shared__ __align__(128) unsigned short smem[{words}];
    for (int i = threadIdx.x; i < {words}; i += 128) smem[i] = 0x3c00 + (i & 7);   // bf16 ~1.0 .. 1.03
    __syncthreads();
    const u32 base = (u32)__cvta_generic_to_shared(smem);
    const u64 db = desc(base, 128 * {n // 8}, 128);         // B: [16][{n}] MN-major, core matrices of 8 x 16 bytes
    const u64 da = desc(base + {b_bytes}, 128, 256);        // A: [64][16] K-major
    float acc[{count}][{nd}];      // written by the first group (scale-d 0): zeroing by hand serialised n256
    const u32 a[4] = {{0x3c003c00u + threadIdx.x, 0x3c003c01u, 0x3c003c02u, 0x3c003c03u}};
    for (int it = 0; it < iters; ++it) {{
        wgmma_fence();
#pragma unroll
        for (int r = 0; r < {count}; ++r) {{
            float* accr = acc[r];
            {_mma(n, rs)}
        }}
        wgmma_commit();
        wgmma_wait<1>();
    }}
    wgmma_wait<0>();
    float s = 0.f;
    for (int r = 0; r < {count}; ++r)
        for (int j = 0; j < {nd}; ++j) s += acc[r][j];
    out[blockIdx.x * 128 + threadIdx.x] = s;
}}
"""


def measure(n: int, rs: bool, count: int, blocks_per_sm: int, iters: int) -> float:
    """TFLOP/s of the loop on every SM."""
    kernel = torch.cuda._compile_kernel(source(n, rs, count), "mma_loop", compute_capability="90a")
    grid = torch.cuda.get_device_properties(0).multi_processor_count * blocks_per_sm
    out = torch.empty(grid * 128, device="cuda")
    run = lambda: kernel(grid=(grid, 1, 1), block=(128, 1, 1), args=[out, iters])  # noqa: E731
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 5 / 1e3
    return 2 * 64 * n * 16 * count * iters * grid / seconds / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=4096)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": args.iters, "tflops": {}}
    for n, count in ((64, 4), (256, 1)):
        for rs in (True, False):
            for bps in (1, 2):
                name = f"{'rs' if rs else 'ss'}_n{n}x{count}_{bps}blocks"
                try:
                    res["tflops"][name] = round(measure(n, rs, count, bps, args.iters), 1)
                except Exception as err:     # a shape that does not fit the register file: say so, go on
                    res["tflops"][name] = repr(err)
                print(name, res["tflops"][name], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
