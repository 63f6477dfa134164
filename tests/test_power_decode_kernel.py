"""The Triton decode kernel (one token of deg-2 power retention) == the PyTorch recurrent step and a float64
reference, through several folds; on CPU under TRITON_INTERPRET=1 in a subprocess, compiled where CUDA is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import json, sys, torch
from longctx.mechanisms.power.recurrent import init_power_state, power_retention_step
device = sys.argv[2]
g = torch.Generator().manual_seed(int(sys.argv[1]))

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def case(B, hq, hkv, d, e, gated, dtype, steps, chunk, switch_over):
    # the same tokens through the kernel, the PyTorch step in the same dtype, and the PyTorch step in float64
    states = [init_power_state(B, hkv, d, e, gated, device, dt) for dt in (dtype, dtype, torch.float64)]
    err_kernel, err_eager = [], []
    for _ in range(steps):
        q, k, v = (torch.randn(B, h, 1, n, generator=g).to(device) for h, n in ((hq, d), (hkv, d), (hkv, e)))
        log_g = (-0.2 * torch.rand(B, hkv, 1, generator=g)).to(device) if gated else None
        outs = []
        for i, (st, dt, kern) in enumerate(zip(states, (dtype, dtype, torch.float64), (True, False, False))):
            o, states[i] = power_retention_step(q.to(dt), k.to(dt), v.to(dt), st, log_g, 2, None, chunk,
                                                switch_over, use_kernel=kern)
            outs.append(o)
        assert outs[0].dtype == dtype and outs[0].shape == (B, hq, 1, e) and torch.isfinite(outs[0]).all()
        err_kernel.append(rel(outs[0], outs[2]))
        err_eager.append(rel(outs[1], outs[2]))
    a, b = states[0], states[1]
    same_state = a.seen == b.seen and torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and \
        (a.S is None) == (b.S is None) and (a.S is None or torch.allclose(a.S, b.S))
    return {"kernel": max(err_kernel), "eager": max(err_eager), "same_state": same_state,
            "folded": a.S is not None}

res = {
    "fp32_gated_gqa": case(2, 4, 2, 16, 32, True, torch.float32, 40, 16, 32),     # two folds, odd recent counts
    "fp32_ungated_before_fold": case(1, 2, 2, 32, 16, False, torch.float32, 20, 16, 32),
    "fp32_d128_e16": case(1, 2, 1, 128, 16, True, torch.float32, 20, 16, 16),
    "bf16_gated_d64": case(1, 2, 1, 64, 64, True, torch.bfloat16, 70, 32, 64),   # > BLOCK_KEYS recent keys
}
errors = {}
try:
    st = init_power_state(1, 1, 16, 16, False, device)
    x = torch.randn(1, 1, 1, 16, device=device)
    power_retention_step(x, x, x, st, None, 4, None, 16, 32, use_kernel=True)
except ValueError as err:
    errors["deg4"] = str(err)
print(json.dumps({"cases": res, "refused": errors}))
"""


def run_check(gen, device: str, interpret: bool) -> dict:
    import torch
    seed = torch.randint(0, 2**31 - 1, (), generator=gen).item()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", CHECK, str(seed), device], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_report(report: dict) -> None:
    cases = report["cases"]
    for name, c in cases.items():
        assert c["same_state"] and c["folded"] == (name != "fp32_ungated_before_fold"), (name, c)
        if name.startswith("fp32"):
            assert c["kernel"] < 1e-5 and c["eager"] < 1e-5, (name, c)
        else:   # bf16 outputs: one rounding of the float32 result
            assert c["kernel"] < 8e-3 and c["kernel"] < 2 * c["eager"] + 1e-3, (name, c)
    assert "use_kernel=True: the decode kernel needs" in report["refused"]["deg4"]


def test_decode_kernel_matches_the_recurrent_step_under_interpreter(gen, triton_interpreter):
    check_report(run_check(gen, "cpu", interpret=True))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_compiled_decode_kernel(gen):
    check_report(run_check(gen, "cuda", interpret=False))
