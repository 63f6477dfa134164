"""The Triton decode kernels (one token of deg-2 power retention, eager and static state) == the PyTorch recurrent
step and a float64 reference, through several folds; on CPU under TRITON_INTERPRET=1 in a subprocess, compiled where CUDA is."""

import pytest

from conftest import run_script

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
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)     # the float64 reference sees the same rounded inputs
        outs = []
        for i, (st, dt, kern) in enumerate(zip(states, (dtype, dtype, torch.float64), (True, False, False))):
            o, states[i] = power_retention_step(q.to(dt), k.to(dt), v.to(dt), st, log_g, 2, None, chunk,
                                                switch_over, use_kernel=kern)
            outs.append(o)
        assert outs[0].dtype == dtype and outs[0].shape == (B, hq, 1, e) and torch.isfinite(outs[0]).all()
        err_kernel.append(rel(outs[0], outs[2]))
        err_eager.append(rel(outs[1], outs[2]))
    a, b = states[0], states[1]
    # the fold is the same PyTorch code on both paths: S measured exactly equal (default allclose)
    same_state = a.seen == b.seen and torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and \
        (a.S is None) == (b.S is None) and (a.S is None or torch.allclose(a.S, b.S))
    return {"kernel": max(err_kernel), "eager": max(err_eager), "same_state": same_state,
            "folded": a.S is not None}

def static_case(B, hq, hkv, d, e, gated, dtype, steps, chunk, switch_over):
    # the static step through the kernel against the eager step in float64: outputs and the state after folds
    from longctx.mechanisms.power.recurrent import init_static_power_state, power_step_static, static_variant
    st = init_static_power_state(B, hkv, d, e, 2, gated, switch_over, device, dtype)
    ref = init_power_state(B, hkv, d, e, gated, device, torch.float64)
    pos, errs = torch.zeros(1, dtype=torch.long, device=device), []
    for t in range(steps):
        q, k, v = (torch.randn(B, h, 1, n, generator=g).to(device) for h, n in ((hq, d), (hkv, d), (hkv, e)))
        log_g = (-0.2 * torch.rand(B, hkv, 1, generator=g)).to(device) if gated else None
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)     # the reference sees the same rounded inputs
        o = power_step_static(q, k, v, st, pos, static_variant(t, chunk, switch_over), log_g, 2, None, chunk,
                              use_kernel=True)
        o_ref, ref = power_retention_step(q.double(), k.double(), v.double(), ref, None if log_g is None else
                                          log_g.double(), 2, None, chunk, switch_over, use_kernel=False)
        pos += 1
        assert o.dtype == dtype and o.shape == (B, hq, 1, e) and torch.isfinite(o).all()
        errs.append(rel(o, o_ref))
    r = ref.k.shape[2]
    return {"kernel": max(errs), "recent": rel(st.k[:, :, :r], ref.k), "S": rel(st.S, ref.S), "z": rel(st.z, ref.z)}

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
static = {
    "fp32_gated_gqa": static_case(2, 4, 2, 16, 32, True, torch.float32, 41, 16, 32),
    "fp32_ungated_so_eq_chunk": static_case(1, 3, 1, 32, 16, False, torch.float32, 20, 8, 8),
    "bf16_gated_d64": static_case(1, 2, 1, 64, 64, True, torch.bfloat16, 70, 32, 64),   # the state read split
    "fp32_one_split": static_case(4, 8, 2, 16, 16, True, torch.float32, 20, 8, 8),   # enough rows: not split
}
print(json.dumps({"cases": res, "static": static, "refused": errors}))
"""


def check_report(report: dict) -> None:
    cases = report["cases"]
    for name, c in cases.items():
        assert c["same_state"] and c["folded"] == (name != "fp32_ungated_before_fold"), (name, c)
        # measured under the interpreter (not re-measured on a GPU here): float32 <= 1.7e-6 over 7 seeds; bf16
        # over 83 seeds: eager <= 2.2e-3 (about one rounding of the output, 2^-8), the kernel <= 4.8e-3 (8e-3 ~ two
        # roundings) and <= 2.54x eager, so 3x eager + 1e-3 (2x eager + 1e-3 failed one seed in 40)
        if name.startswith("fp32"):
            assert c["kernel"] < 1e-5 and c["eager"] < 1e-5, (name, c)
        else:
            assert c["kernel"] < 8e-3 and c["kernel"] < 3 * c["eager"] + 1e-3, (name, c)
    assert "use_kernel=True: the decode kernel needs" in report["refused"]["deg4"]
    for name, c in report["static"].items():   # the static step (fixed buffers, slot in device memory)
        # as above: float32 output <= 4.6e-7, state S and z <= 1.8e-7 (float32 in every case), bf16 output
        # <= 5.0e-3, over 7 seeds (bf16: 83)
        tol = 1e-5 if name.startswith("fp32") else 8e-3
        assert max(c.values()) < tol, (name, c)


def test_decode_kernel_matches_the_recurrent_step_under_interpreter(gen, triton_interpreter):
    check_report(run_script(CHECK, gen, "cpu", interpret=True))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_compiled_decode_kernel(gen):
    check_report(run_script(CHECK, gen, "cuda", interpret=False))
