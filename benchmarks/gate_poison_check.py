"""CUDA check and cost of power retention's gate poisoning (``longctx.mechanisms.power.naive.check_gate``).

1. The Triton kernel on CUDA with one bad gate value (positive, NaN, -inf, +inf) in batch row 1, KV head 0: that
   token's output and every later one of the KV head's query heads are NaN; every other output equals the clean
   run's (bitwise), the tokens before the bad token's chunk included.
2. Cost: forward + backward of ``power_retention`` through the kernel, which poisons the gate inside its forward
   (``longctx.mechanisms.power.chunk_triton.poison``: two elementwise kernels, no autograd node), against the same
   call with ``poison`` swapped for the identity, B = 1, 8 heads, d = e = 64, deg 2, chunk 128, bf16, at 4K/16K/64K
   tokens; ``--rounds`` alternating rounds of ~200 ms: the best round of each, and the median of the paired ratios.

    PYTHONPATH=. python benchmarks/gate_poison_check.py --out benchmarks/results/gate_poison_check.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from sharded_power import alternating_rounds, median_paired_ratio  # noqa: E402

from longctx.atomic import atomic_write_json  # noqa: E402
from longctx.bench.measure import device_name  # noqa: E402
import longctx.mechanisms.power.chunk_triton as kernel  # noqa: E402
from longctx.mechanisms.power import power_retention  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/gate_poison_check.json")
    args = p.parse_args(argv)
    poison = kernel.poison
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    result = {"device": device_name(dev), "torch": torch.__version__, "checks": [], "cost": []}
    B, hq, hkv, T, c, at = 2, 4, 2, 1000, 64, 300
    q = torch.randn(B, hq, T, 64, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(B, hkv, T, 64, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    clean = F.logsigmoid(torch.randn(B, hkv, T, device=dev, generator=gen) + 2)
    want = power_retention(q, k, v, clean, chunk_size=c, use_kernel=True)
    for bad in (0.5, float("nan"), float("-inf"), float("inf")):
        log_g = clean.clone()
        log_g[1, 0, at] = bad
        got = power_retention(q, k, v, log_g, chunk_size=c, use_kernel=True)
        untouched = torch.ones_like(got, dtype=torch.bool)
        untouched[1, :2, at // c * c:] = False
        check = {"bad_gate": str(bad), "reached_all_nan": bool(torch.isnan(got[1, :2, at:]).all()),
                 "others_equal": bool(torch.equal(got[untouched], want[untouched]))}
        result["checks"].append(check)
        print(check, flush=True)
    for L in (4096, 16384, 65536):
        q, k, v = (torch.randn(1, 8, L, 64, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for _ in range(3))
        log_g = F.logsigmoid(torch.randn(1, 8, L, device=dev, generator=gen) + 4).requires_grad_()
        def as_given():
            kernel.poison = lambda x: x
            try:
                return power_retention(q, k, v, log_g, chunk_size=128)
            finally:
                kernel.poison = poison

        variants = {"poisoned": lambda: power_retention(q, k, v, log_g, chunk_size=128), "as_given": as_given}
        row = {"tokens": L, **alternating_rounds(variants, args.rounds, 200.0, dev, sizing="as_given")}
        row["poisoned_over_as_given"] = row["poisoned_ms"] / row["as_given_ms"]
        row["poisoned_over_as_given_median_paired"] = median_paired_ratio(row["poisoned_ms_rounds"],
                                                                          row["as_given_ms_rounds"])
        result["cost"].append(row)
        print({k: v for k, v in row.items() if not k.endswith("rounds")}, flush=True)
        atomic_write_json(Path(args.out), result)
    result["all_passed"] = all(c["reached_all_nan"] and c["others_equal"] for c in result["checks"])
    atomic_write_json(Path(args.out), result)
    return 0 if result["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
