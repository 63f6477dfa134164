"""Power retention continuing an incoming state (``power.continued``): the stretch's own state and the composition's
outputs against the float64 definition over the whole sequence, gradients of all six inputs (gradcheck), features
formed a block at a time; the kernel's numerators and normalisers (``return_den``) and the continued form through
the kernel, outputs and the state after, under ``TRITON_INTERPRET=1`` (subprocess) against the float64 chunked
form."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from longctx.mechanisms.power import continued, power_retention_chunk, power_retention_continued
from longctx.mechanisms.power import power_retention_naive


def _inputs(gen, B, hq, hkv, T, d, e, gated, dtype=torch.float64):
    q = torch.randn(B, hq, T, d, generator=gen, dtype=dtype)
    k = torch.randn(B, hkv, T, d, generator=gen, dtype=dtype)
    v = torch.randn(B, hkv, T, e, generator=gen, dtype=dtype)
    log_g = -0.4 * torch.rand(B, hkv, T, generator=gen, dtype=dtype) if gated else None
    return q, k, v, log_g


def _head(x, s):
    return None if x is None else x[..., :s] if x.dim() == 3 else x[:, :, :s]


def _tail(x, s):
    return None if x is None else x[..., s:] if x.dim() == 3 else x[:, :, s:]


@pytest.mark.parametrize("deg,d,gated,block_bytes", [(2, 6, True, None), (2, 5, False, 600), (4, 3, True, 700)])
def test_stretch_state_is_the_chunked_forms_final_state(gen, deg, d, gated, block_bytes, monkeypatch):
    if block_bytes:   # a few tokens a block: the blocks' sum is checked too
        monkeypatch.setattr(continued, "BLOCK_BYTES", block_bytes)
    q, k, v, log_g = _inputs(gen, 2, 4, 2, 11, d, 3, gated)
    _, (S, z) = power_retention_chunk(q, k, v, log_g, deg, 4, return_state=True)
    X, a = continued.stretch_state(k, v, log_g, deg)
    # measured <= 3.4e-16 (deg 2 and 4, gated or not) over 40 seeds
    assert rel_err(X[..., :3], S) < 1e-12 and rel_err(X[..., 3], z) < 1e-12
    if gated:
        assert rel_err(a, log_g.sum(-1)) < 1e-13
    else:
        assert torch.equal(a, torch.zeros(2, 2, dtype=a.dtype))


@pytest.mark.parametrize("deg,B,hq,hkv,T,split,chunk,gated,block_bytes", [
    (2, 2, 4, 2, 23, 9, 4, True, None),      # GQA, a split inside a chunk, odd lengths
    (2, 1, 3, 1, 17, 16, 5, False, 900),     # MQA, a stretch of one token, features a few tokens a block
    (4, 3, 2, 2, 14, 5, 3, True, None),      # deg 4, batch 3
])
def test_continued_equals_the_definition_over_the_whole_sequence(gen, deg, B, hq, hkv, T, split, chunk, gated,
                                                                 block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(continued, "BLOCK_BYTES", block_bytes)
    d = 5 if deg == 2 else 3
    q, k, v, log_g = _inputs(gen, B, hq, hkv, T, d, 4, gated)
    leaves = [t.requires_grad_() for t in (q, k, v, log_g) if t is not None]
    _, (S, z) = power_retention_chunk(*(_head(t, split) for t in (q, k, v, log_g)), deg, chunk, return_state=True)
    # the composition itself (the chunked form's own part here; the kernel's under the interpreter below)
    X = torch.cat([S, z.unsqueeze(-1)], -1)
    o = continued.continue_from(*(_tail(t, split) for t in (q, k, v, log_g)), X, deg, chunk, d ** -0.5,
                                use_kernel=False)
    want = power_retention_naive(q, k, v, log_g, deg)[:, :, split:]
    assert o.dtype == q.dtype and o.shape == want.shape
    assert rel_err(o, want) < 1e-11                            # measured <= 4.7e-15 over 30 seeds
    w = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    got = torch.autograd.grad((o * w).sum(), leaves)
    ref = torch.autograd.grad((want * w).sum(), leaves)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-10                           # measured <= 1.3e-14


def test_composition_gradcheck_in_all_six_inputs(gen, monkeypatch):
    monkeypatch.setattr(continued, "BLOCK_BYTES", 400)        # three blocks of features
    q, k, v, log_g = _inputs(gen, 1, 2, 1, 5, 3, 2, True)
    S = torch.rand(1, 1, 6, 2, generator=gen, dtype=torch.float64)
    z = torch.rand(1, 1, 6, generator=gen, dtype=torch.float64) + 0.5
    args = [t.requires_grad_() for t in (q, k, v, log_g, S, z)]
    assert torch.autograd.gradcheck(lambda q, k, v, g, S, z: continued.continue_from(
        q, k, v, g, torch.cat([S, z.unsqueeze(-1)], -1), 2, 2, 0.7, use_kernel=False), args)


def test_continued_without_the_kernel_is_the_chunked_form_from_the_state(gen):
    q, k, v, log_g = _inputs(gen, 2, 2, 1, 9, 4, 3, True)
    S, z = torch.rand(2, 1, 10, 3, generator=gen, dtype=torch.float64), torch.rand(2, 1, 10, generator=gen,
                                                                                    dtype=torch.float64)
    got = power_retention_continued(q, k, v, log_g, (S, z), 2, 4, return_state=True)
    want = power_retention_chunk(q, k, v, log_g, 2, 4, initial_state=(S, z), return_state=True)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_continued_over_no_tokens_keeps_the_state(gen):
    q, k, v, log_g = _inputs(gen, 1, 2, 1, 0, 3, 2, True)
    S, z = torch.rand(1, 1, 6, 2, generator=gen), torch.rand(1, 1, 6, generator=gen)
    o, (S1, z1) = power_retention_continued(q, k, v, log_g, (S, z), return_state=True)
    assert o.shape == (1, 2, 0, 2) and S1 is S and z1 is z
    _, (S0, z0) = power_retention_continued(q, k, v, log_g, None, return_state=True)   # no state: the zero one
    assert torch.equal(S0, torch.zeros(1, 1, 6, 2, dtype=S0.dtype)) and torch.equal(z0, torch.zeros(1, 1, 6,
                                                                                                    dtype=z0.dtype))


def test_continued_refuses_a_state_of_the_wrong_shape(gen):
    q, k, v, log_g = _inputs(gen, 1, 2, 1, 4, 3, 2, True)
    with pytest.raises(ValueError, match=r"initial_state must be \(S \(1, 1, 6, 2\), z \(1, 1, 6\)\)"):
        power_retention_continued(q, k, v, log_g, (torch.zeros(1, 1, 6, 3), torch.zeros(1, 1, 6)))
    with pytest.raises(ValueError, match="log_g must be finite"):
        power_retention_continued(q, k, v, -log_g, (torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6)))


KERNEL_CHECK = r"""
import json, sys, torch
from longctx.mechanisms.power.chunk_triton import KernelConfig, power_retention_triton
from longctx.mechanisms.power.chunk import cut_chunks, read_chunks_with_den
from longctx.mechanisms.power import power_retention_chunk, power_retention_continued, power_retention_naive
g = torch.Generator().manual_seed(int(sys.argv[1]))
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
B, hq, hkv, T, d, e, C = 2, 4, 2, 37, 32, 16, 16
q = torch.randn(B, hq, T, d, generator=g).half().requires_grad_()
k = torch.randn(B, hkv, T, d, generator=g).half().requires_grad_()
v = torch.randn(B, hkv, T, e, generator=g).half().requires_grad_()
log_g = (-0.2 * torch.rand(B, hkv, T, generator=g)).requires_grad_()
leaves = [q, k, v, log_g]
ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
out = {}
# the numerators' and normalisers' gradients both reach the inputs (fp32 operands: checked tightly)
o, den = power_retention_triton(q, k, v, log_g, chunk_size=C, config=KernelConfig(block=16, operands="fp32"),
                                return_den=True)
ro, rden = read_chunks_with_den(cut_chunks(*ref_leaves, 2, C, None))
wo, wd = torch.randn(o.shape, generator=g), torch.randn(den.shape, generator=g)
grads = torch.autograd.grad((o * wo).sum() + (den * wd).sum(), leaves)
ref_grads = torch.autograd.grad((ro * wo).sum() + (rden * wd).sum(), ref_leaves)
out["return_den"] = [str(o.dtype), str(den.dtype), rel(o, ro), rel(den, rden)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
# the continued form through the kernel (its default bf16 operands) against the definition on the whole sequence
s = 21
_, (S, z) = power_retention_chunk(*(t[:, :, :s].detach() if t.dim() == 4 else t[..., :s].detach() for t in ref_leaves),
                                  2, C, return_state=True)
S, z = S.float().requires_grad_(), z.float().requires_grad_()
oc, (S1, z1) = power_retention_continued(q[:, :, s:], k[:, :, s:], v[:, :, s:], log_g[..., s:], (S, z), 2, C,
                                        use_kernel=True, return_state=True)
want = power_retention_naive(*ref_leaves, 2)[:, :, s:]
w, wS, wz = torch.randn(oc.shape, generator=g), torch.randn(S1.shape, generator=g), torch.randn(z1.shape, generator=g)
loss = lambda o, S1, z1: (o * w).sum() + ((S1 * wS).sum() + (z1 * wz).sum()) / S1.detach().norm()
grads = torch.autograd.grad(loss(oc, S1, z1), leaves + [S, z])
Sd, zd = S.detach().double().requires_grad_(), z.detach().double().requires_grad_()
tail = [t[:, :, s:] if t.dim() == 4 else t[..., s:] for t in ref_leaves]
ref, (rS1, rz1) = power_retention_chunk(*tail, 2, C, initial_state=(Sd, zd), return_state=True)
ref_grads = torch.autograd.grad(loss(ref, rS1, rz1), ref_leaves + [Sd, zd])
out["continued"] = [str(oc.dtype), rel(oc, want), rel(S1, rS1), rel(z1, rz1)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
# a long prefill in two steps (from no state, then from a folded one) through the kernel where allowed: the
# condition is patched to "allowed" (CPU here; on CUDA, wherever the kernel applies)
import longctx.mechanisms.power.continued as cont
from longctx.mechanisms.power import init_power_state, power_retention_step
asked = []
cont.takes_kernel = lambda q, k, v, deg, c, use_kernel: (asked.append(use_kernel), use_kernel is not False)[1]
def prefill(dtype, gate_dtype, use_kernel):
    st, outs = init_power_state(B, hkv, d, e, True, dtype=dtype), []
    for sl in (slice(0, 20), slice(20, T)):
        o, st = power_retention_step(*(t[:, :, sl].detach().to(dtype) for t in (q, k, v)), st,
                                     log_g[..., sl].detach().to(gate_dtype), chunk_size=C, switch_over=16,
                                     use_kernel=use_kernel)
        outs.append(o)
    return torch.cat(outs, 2), st
o_k, st_k = prefill(torch.float16, torch.float32, None)
kernel_asked, asked[:] = list(asked), []
o_r, st_r = prefill(torch.float64, torch.float64, False)
out["prefill"] = [rel(o_k, power_retention_naive(*ref_leaves, 2)), rel(st_k.S, st_r.S), rel(st_k.z, st_r.z),
                  rel(st_k.k, st_r.k)]
out["prefill_asked"] = [kernel_asked, asked]
print(json.dumps(out))
"""


def test_kernel_normalisers_and_the_continued_form_under_interpreter(test_seed, triton_interpreter):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", KERNEL_CHECK, str(test_seed)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    o_dtype, den_dtype, *errors = report["return_den"]
    assert (o_dtype, den_dtype) == ("torch.float32", "torch.float32")
    # fp32 operands, fp16 inputs: o and den measured <= 1.8e-7, the gradients <= 3.2e-4 over 20 seeds
    assert max(errors[:2]) < 1e-5 and max(errors[2:]) < 1e-3, errors
    dtype, *errors = report["continued"]
    # o (bf16 operands) measured <= 3.7e-3; the state after (float32 products) <= 8e-8; dq, dk, dv <= 4.8e-3, d log_g
    # <= 8.3e-3, dS, dz <= 3.1e-3 over 20 seeds
    o_err, S_err, z_err, *grad_errors = errors
    assert dtype == "torch.float16" and o_err < 2e-2 and max(S_err, z_err) < 1e-5, errors
    assert max(grad_errors) < 2e-2, errors
    # the prefill: both long steps through the kernel (the first from no state, the kernel alone; the second
    # continuing the folded state); use_kernel=False never
    assert report["prefill_asked"] == [[None, None, True], [False, False]], report["prefill_asked"]
    o_err, S_err, z_err, recent_err = report["prefill"]
    # o measured <= 3.1e-3, S and z <= 7.7e-8 over 20 seeds; the recent keys are copies
    assert o_err < 2e-2 and max(S_err, z_err) < 1e-5 and recent_err == 0, report["prefill"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")
def test_compiled_kernel_continues_a_state(gen):
    """On the GPU: bf16, d = e = 64, chunk 128, a stretch of 700 tokens after 601, through the compiled kernel,
    against float64 (o and the state after; gradients of q, k, v, log_g and the incoming state)."""
    dev, (s, T) = torch.device("cuda"), (601, 1301)
    q, k, v, _ = _inputs(gen, 1, 4, 2, T, 64, 64, False)
    log_g = torch.nn.functional.logsigmoid(4 + torch.randn(1, 2, T, generator=gen, dtype=torch.float64))
    _, (S, z) = power_retention_chunk(*(_head(t, s) for t in (q, k, v, log_g)), 2, 128, return_state=True)
    tail = [_tail(t, s).to(dev) for t in (q, k, v, log_g)]
    leaves = [t.to(torch.bfloat16 if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(tail)]
    S32, z32 = S.float().to(dev).requires_grad_(), z.float().to(dev).requires_grad_()
    o, (S1, z1) = power_retention_continued(*leaves, (S32, z32), 2, 128, return_state=True)
    ref_leaves = [t.to(torch.bfloat16 if i < 3 else torch.float32).double().requires_grad_()
                  for i, t in enumerate(tail)]
    Sd, zd = S.to(dev).requires_grad_(), z.to(dev).requires_grad_()
    ref, (rS1, rz1) = power_retention_chunk(*ref_leaves, 2, 128, initial_state=(Sd, zd), return_state=True)
    assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 2e-2          # bf16 operands, as the kernel's tests
    assert rel_err(S1, rS1) < 1e-4 and rel_err(z1, rz1) < 1e-4           # float32 products of the same inputs
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dev)
    got = torch.autograd.grad((o.double() * w).sum(), leaves + [S32, z32])
    want = torch.autograd.grad((ref * w).sum(), ref_leaves + [Sd, zd])
    errors = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errors[:3]) < 3e-2 and errors[3] < 0.1 and max(errors[4:]) < 3e-2, errors
