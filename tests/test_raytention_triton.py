"""The Triton RayTention forward kernel == the float64 naive signals (and refuses bad use), run on CPU under TRITON_INTERPRET=1 in a
subprocess (the interpreter must be chosen before triton is imported)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import sys, torch
from longctx.mechanisms.raytention.blocked_triton import raytention_signals_triton
from longctx.mechanisms.raytention import raytention_signals_naive
g = torch.Generator().manual_seed(int(sys.argv[1]))
worst = 0.0
# random float inputs: odd lengths, query offsets (decoding), D not a power of two, blocks not dividing T
for T, off, D, bq, bk in [(1, 0, 8, 16, 16), (37, 0, 8, 16, 32), (20, 13, 24, 32, 16), (53, 0, 5, 16, 16)]:
    q, e = torch.randn(2, 3, T, D, generator=g), torch.randn(2, T + off, D, generator=g)
    tau, log_gamma = 0.5 + 4 * torch.rand(3, generator=g), torch.log(0.3 + 0.6 * torch.rand(3, generator=g))
    ref, ref_idx = raytention_signals_naive(q.double(), e.double(), tau.double(), log_gamma.double(), off,
                                            return_indices=True)
    out, idx = raytention_signals_triton(q, e, tau, log_gamma, off, bq, bk, return_indices=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(idx, ref_idx), (T, off)
    worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
# exact ties: integer keys and queries (exact in float32), many duplicates: lowest index wins, as in naive
table = torch.randint(-1, 2, (4, 3), generator=g).float()
e = table[torch.randint(0, 4, (2, 41), generator=g)]
q = torch.randint(-1, 2, (2, 2, 41, 3), generator=g).float()
_, ref_idx = raytention_signals_naive(q.double(), e.double(), 1.0, -0.5, return_indices=True)
_, idx = raytention_signals_triton(q, e, 1.0, -0.5, 0, 16, 16, return_indices=True)
assert torch.equal(idx, ref_idx)
# bad use is refused with the argument named
for kwargs, message in [({}, "forward only"), ({"block_q": 24}, "block_q must be a power of two")]:
    try:
        raytention_signals_triton(q.requires_grad_(not kwargs), e, 1.0, -0.5, **kwargs)
    except ValueError as err:
        assert message in str(err), err
    else:
        raise AssertionError(f"no error for {kwargs}")
print("worst", worst)
"""


def test_triton_forward_matches_naive_under_interpreter(gen, triton_interpreter):
    seed = int(__import__("torch").randint(0, 2**31 - 1, (), generator=gen))
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", CHECK, str(seed)], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("worst")[-1])
    assert worst < 1e-5, worst          # float32 arithmetic against float64

