"""Where a decode step's time goes: kernels per step and GPU time per step, eager against graph-replayed.

For each mechanism, a random-weight GPT (``longctx throughput``'s presets) is filled to ``--context`` tokens at
``--batch`` and profiled (torch.profiler, CUDA activity) over ``--steps`` one-token steps through the eager path
and through the graph path. Reports kernels per step, the summed kernel time per step (GPU busy), the wall time
per step and the five costliest kernels. Writes ``decode_profile.json`` atomically.

    python3 benchmarks/decode_profile.py --out $OUT --preset gpu --context 32768 --batch 1
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from longctx.atomic import atomic_write_json
from longctx.bench.throughput import build_model, fill_state
from longctx.bench.throughput_presets import PRESETS
from longctx.decoding import greedy_decoder, warm_steps


def profile_path(model, state, path: str, steps: int) -> dict:
    tok = torch.zeros(state.batch, 1, dtype=torch.long, device="cuda")
    if path == "eager":
        eager = model.eager_state(state)

        def one():
            nonlocal eager
            logits, eager = model.step(tok, eager)
            tok.copy_(logits[:, -1:].argmax(-1))
        for _ in range(2):
            one()
        run = one
    else:
        decode = greedy_decoder(model, state, tok, graphs=True)
        decode(warm_steps(model, state.seen))

        def run():
            decode(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict = defaultdict(float)
    for e in kernels:
        by_name[e.name] += (e.device_time if hasattr(e, "device_time") else e.cuda_time) / steps
    top = sorted(by_name.items(), key=lambda x: -x[1])[:5]
    return {"kernels_per_step": len(kernels) / steps, "gpu_us_per_step": sum(by_name.values()),
            "wall_us_per_step": 1e6 * wall / steps, "top_kernels_us": [[n[:80], round(t, 2)] for n, t in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    ap.add_argument("--mechanisms", default="full,sliding_window,power,power4,tensor_cache")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    s = PRESETS[args.preset]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "context": args.context, "batch": args.batch, "rows": {}}
    gen = torch.Generator().manual_seed(0)
    for mech in args.mechanisms.split(","):
        model = build_model(s, mech, torch.device("cuda"))
        row = {}
        for path in ("eager", "graph"):
            state = model.init_static_state(args.batch, args.context + 512)
            fill_state(model, state, args.context, s, gen)
            row[path] = profile_path(model, state, path, args.steps)
            del state
            torch.cuda.empty_cache()
        res["rows"][mech] = row
        atomic_write_json(f"{args.out}/decode_profile.json", res)
        print(mech, {p: {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "top_kernels_us"}
                     for p, r in row.items()}, "top graph kernels:", row["graph"]["top_kernels_us"][:3], flush=True)


if __name__ == "__main__":
    main()
