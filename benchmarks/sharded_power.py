"""Sequence-parallel power retention (``longctx.distributed.sharded_power_retention``) against one GPU.

Runs unchanged on one process or under ``torchrun --nproc-per-node N`` (NCCL, one GPU per rank):

    PYTHONPATH=. python benchmarks/sharded_power.py --out benchmarks/results/sharded_power.json
    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/sharded_power.py --out benchmarks/results/sharded_power_4.json

For every ``L`` (tokens per rank): forward + backward of ``sharded_power_retention`` over ``N x L`` tokens, and on
each rank alone ``power_retention`` over ``L`` tokens through the Triton kernel, ``power_retention_continued`` from
a state (what each rank computes when ``N > 1``: the kernel, the incoming state's reads and the shard's own state;
here the state of an earlier random stretch) and the PyTorch chunked form (what the ranks ran before the kernel
could continue a state), each with its peak of allocated memory in one step. Weak scaling: the sharded step does
each rank's work plus the relay, so ``efficiency = single L / sharded`` against each baseline. bf16, B = 1, 8 heads,
d = e = 64, deg 2, gated, chunk 128. The sharded step and the kernel are timed in ``--rounds`` alternating rounds
(each 2 untimed steps, then enough timed ones to last ``--round-ms``, synchronised over the ranks) and the best
round's mean is kept, so that clock drift falls on both alike, and the median over rounds of the paired ratio is
reported too; the chunked form (slow) in one round of ``--reps`` steps. Rank 0 writes the JSON atomically.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longctx.atomic import atomic_write_json
from longctx.bench.measure import device_name
from longctx.distributed.power import relay_bytes, sharded_power_retention
from longctx.mechanisms.power import power_retention, power_retention_continued
from longctx.mechanisms.power.continued import stretch_state


def median_paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``: rounds ``i`` ran back to back, so host noise (these short steps
    are host-bound: rounds of the same call spread over 1.5-2.8 ms at 4K tokens on an H100) cancels in each pair."""
    return statistics.median(x / y for x, y in zip(a, b))


def timed_step(fn, reps: int, device) -> float:
    """Seconds of one forward + backward of ``fn()`` (the slowest rank's, after a barrier), the mean of ``reps``
    after 2 untimed steps."""
    for _ in range(2):
        fn().float().sum().backward()
    torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn().float().sum().backward()
    torch.cuda.synchronize(device)
    seconds = torch.tensor([(time.perf_counter() - start) / reps], device=device)
    if dist.is_initialized():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def peak_bytes(fn, device) -> int:
    """Peak allocated bytes during one forward + backward of ``fn()``, above what was allocated before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn().float().sum().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def alternating_rounds(variants: dict, rounds: int, round_ms: float, device, sizing: str) -> dict:
    """Time ``variants`` (name -> a forward call) in ``rounds`` rounds, each variant once a round in turn, each
    time ``reps`` steps where ``reps`` makes variant ``sizing`` last about ``round_ms``: ``{name}_ms`` (the best
    round's mean), ``{name}_ms_rounds`` (every round's) and ``reps_per_round``."""
    reps = max(3, int(round_ms / (1000 * timed_step(variants[sizing], 1, device))))   # the slowest rank's
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(1000 * timed_step(fn, reps, device))
    return {"reps_per_round": reps, **{f"{n}_ms": min(t) for n, t in times.items()},
            **{f"{n}_ms_rounds": t for n, t in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="4096,16384,65536", help="tokens per rank")
    p.add_argument("--reps", type=int, default=3, help="timed steps of the chunked form")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-ms", type=float, default=200.0, help="timed milliseconds per round (sharded, kernel)")
    p.add_argument("--out", default="benchmarks/results/sharded_power.json")
    args = p.parse_args(argv)
    if "RANK" in os.environ:
        dist.init_process_group("nccl")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.cuda.set_device(device)
    result = {"device": device_name(device), "ranks": world, "torch": torch.__version__,
              "shape": "B=1, H=8, d=e=64, deg 2, gated, chunk 128, bf16", "reps": args.reps,
              "rounds": args.rounds, "round_ms": args.round_ms,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    gen = torch.Generator(device=device).manual_seed(rank)
    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v = (torch.randn(1, 8, L, 64, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for _ in range(3))
        log_g = torch.nn.functional.logsigmoid(torch.randn(1, 8, L, device=device, generator=gen) + 4)
        log_g.requires_grad_()
        row = {"tokens_per_rank": L, "total_tokens": L * world,
               "relay_bytes": relay_bytes(1, 8, 64, 64, 2) if world > 1 else 0}
        with torch.no_grad():   # the state an earlier stretch of L random tokens leaves
            X, _ = stretch_state(*(torch.randn_like(t) for t in (k, v)), log_g.detach().flip(-1), 2)
        S, z = X[..., :64].clone().requires_grad_(), X[..., 64].clone().requires_grad_()
        variants = {"sharded": lambda: sharded_power_retention(q, k, v, log_g, chunk_size=128),
                    "kernel": lambda: power_retention(q, k, v, log_g, chunk_size=128),
                    "continued": lambda: power_retention_continued(q, k, v, log_g, (S, z), chunk_size=128)}
        chunked = lambda: power_retention(q, k, v, log_g, chunk_size=128, use_kernel=False)  # noqa: E731
        row.update(alternating_rounds(variants, args.rounds, args.round_ms, device, sizing="kernel"))
        row["chunked_ms"] = 1000 * timed_step(chunked, args.reps, device)
        for name, fn in (*variants.items(), ("chunked", chunked)):
            row[f"{name}_peak_bytes"] = peak_bytes(fn, device)
        row["efficiency_vs_kernel"] = row["kernel_ms"] / row["sharded_ms"]
        row["efficiency_vs_kernel_median_paired"] = median_paired_ratio(row["kernel_ms_rounds"], row["sharded_ms_rounds"])
        row["efficiency_vs_chunked"] = row["chunked_ms"] / row["sharded_ms"]
        result["rows"].append(row)
        if rank == 0:
            print(row, flush=True)
            atomic_write_json(Path(args.out), result)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
