"""Host time that ``sharded_power_retention`` adds over ``power_retention`` on a group of one, per call (CPU, tiny
inputs, so that the arithmetic is negligible and the wrapper is what is timed): the median over rounds of the
paired difference, forward only.

    PYTHONPATH=. python benchmarks/sharded_wrapper_cost.py --out benchmarks/results/sharded_wrapper_cost.json

On one GPU a 4K-token forward + backward of the kernel is ~1.8 ms of mostly host time
(``benchmarks/results/sharded_power.json``), which is what this overhead adds to.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longctx.distributed.power import sharded_power_retention
from longctx.mechanisms.power import power_retention


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/sharded_wrapper_cost.json")
    args = p.parse_args(argv)
    q = torch.randn(1, 1, 4, 4, requires_grad=True)
    log_g = -torch.rand(1, 1, 4)
    sharded = lambda: sharded_power_retention(q, q, q, log_g, chunk_size=4)   # noqa: E731
    plain = lambda: power_retention(q, q, q, log_g, chunk_size=4)             # noqa: E731
    for fn in (sharded, plain):
        per_call_us(fn, 200)
    pairs = [(per_call_us(sharded, args.calls), per_call_us(plain, args.calls)) for _ in range(args.rounds)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {"commit": commit, "torch": torch.__version__, "calls": args.calls, "rounds": args.rounds,
           "extra_us_median": statistics.median(a - b for a, b in pairs),
           "power_retention_us_median": statistics.median(b for _, b in pairs)}
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in rows if r["commit"] != commit] + [row]
    from longctx.atomic import atomic_write_json
    atomic_write_json(out, {"what": "host microseconds sharded_power_retention adds over power_retention per forward "
                                    "call on a group of one (CPU, tiny inputs), one row per commit", "rows": rows})
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
