"""Power retention: feature map, naive float64 == chunked == step-by-step decoding (with folds), gradients,
long fp16 contexts, the registered mechanisms and their state size."""
import math

import pytest
import torch

from conftest import rel_err
from longctx.mechanisms import build_mechanism, registered, tensor_bytes
from longctx.mechanisms.power import (expanded_dim, init_power_state, power_retention, power_retention_chunk,
                                      power_retention_naive, power_retention_step, sympow)
from longctx.mechanisms.power import mechanism as power_mechanism
from longctx.mechanisms.power import naive as power_naive
from longctx.mechanisms.power.recurrent import recent_count
from longctx.model import GPT, GPTConfig
from longctx.rope import apply_rope


def inputs(gen, B=2, hq=4, hkv=2, T=23, d=8, e=8, gated=True, positive=False, dtype=torch.float64):
    q = torch.randn(B, hq, T, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, T, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, T, e, generator=gen, dtype=torch.float64)
    if positive:  # deg 1 needs q . k > 0 for its normaliser to stay away from zero
        q, k = q.abs(), k.abs()
    log_g = -0.3 * torch.rand(B, hkv, T, generator=gen, dtype=torch.float64) if gated else None
    return q.to(dtype), k.to(dtype), v.to(dtype), log_g


@pytest.mark.parametrize("d,deg", [(1, 2), (3, 1), (5, 2), (8, 2), (4, 4), (3, 6)])
def test_sympow_inner_product_is_the_power(d, deg, gen):
    x, y = torch.randn(7, d, generator=gen, dtype=torch.float64), torch.randn(7, d, generator=gen, dtype=torch.float64)
    fx, fy = sympow(x, deg), sympow(y, deg)
    assert fx.shape == (7, math.comb(d + deg - 1, deg)) == (7, expanded_dim(d, deg))
    # measured <= 8e-14 over 18 seeds (sums of deg-th powers, deg up to 6; median far lower): was 1e-13, raised
    assert rel_err((fx * fy).sum(-1), (x * y).sum(-1) ** deg) < 1e-12


def test_expanded_dim_of_the_issue():
    assert expanded_dim(64, 2) == 2080 and expanded_dim(16, 4) == 3876


@pytest.mark.parametrize("deg", [0, 3, 5, -2])
def test_odd_or_non_positive_deg_is_refused(deg, gen):
    q, k, v, _ = inputs(gen)
    with pytest.raises(ValueError, match=f"deg must be 1 or a positive even integer.*deg={deg}"):
        power_retention_naive(q, k, v, deg=deg)
    with pytest.raises(ValueError, match="deg"):
        power_retention(q, k, v, deg=deg)
    with pytest.raises(ValueError, match="deg"):
        build_mechanism("power", 4, 2, 8, deg=deg)
    with pytest.raises(TypeError, match="deg must be an int"):
        power_retention_chunk(q, k, v, deg=2.0)


@pytest.mark.parametrize("deg", [1, 2, 4])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,chunk,hkv", [(1, 8, 2), (23, 8, 2), (40, 8, 1), (37, 16, 4)])
def test_chunked_equals_naive(deg, gated, T, chunk, hkv, gen):
    """Odd lengths (not multiples of the chunk), batch 2, GQA 4:2 and 4:1, with and without the gate."""
    q, k, v, log_g = inputs(gen, hkv=hkv, T=T, gated=gated, positive=deg == 1)
    ref = power_retention_naive(q, k, v, log_g, deg)
    out = power_retention_chunk(q, k, v, log_g, deg, chunk_size=chunk)
    # measured <= 1.5e-15 over 18 seeds
    assert out.shape == ref.shape and rel_err(out, ref) < 5e-14


@pytest.mark.parametrize("deg", [1, 2, 4])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk,switch_over", [(4, 8), (3, 12)])
def test_stepwise_decoding_equals_naive(deg, gated, chunk, switch_over, gen):
    """Random step sizes (single tokens and prefills spanning several folds); the recent buffer follows the
    schedule, and the state holds the bytes its formula says."""
    T = 41
    q, k, v, log_g = inputs(gen, T=T, gated=gated, positive=deg == 1)
    ref = power_retention_naive(q, k, v, log_g, deg)
    state = init_power_state(2, 2, 8, 8, gated, dtype=torch.float64)
    cuts = sorted(set(torch.randint(1, T, (6,), generator=gen).tolist()) | {T})
    outs, start = [], 0
    for stop in cuts:
        sl = slice(start, stop)
        o, state = power_retention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
                                        None if log_g is None else log_g[:, :, sl], deg, None, chunk, switch_over)
        outs.append(o)
        assert state.seen == stop and state.k.shape[2] == recent_count(stop, chunk, switch_over)
        assert (state.S is None) == (stop < switch_over)
        start = stop
    # relative to |o| the error is heavy-tailed at deg 4, gated (max 1.6e-13 over 200 seeds, then 3.6e-12 on test
    # seed 1887961992); relative to the sums the feature form adds up (as in the test below) it is not: measured
    # <= 4.0 eps over 200 seeds of every case here
    out = torch.cat(outs, 2)
    err = (out - ref).abs().amax(-1) / feature_sum_scale(q, k, v, log_g, deg, ref)
    assert err.max() < 64 * torch.finfo(torch.float64).eps, err.max()
    m = build_mechanism("power", 4, 2, 8, deg=deg, chunk_size=chunk, switch_over=switch_over,
                        gate="decay" if gated else "none")
    assert tensor_bytes(state) == m.state_bytes(T, batch=2, dtype=torch.float64)


def feature_sum_scale(q, k, v, log_g, deg, o):
    """Per query row ``[B, Hq, T]``: ``sum_j g_ij (sum_a |q_ia k_ja|)^deg (|v_j| + |o_i|) / den_i`` with ``den_i =
    sum_j g_ij (q_i . k_j)^deg`` (causal, gated): the size of what the feature form sums for ``o_i``, which its
    rounding errors scale with (``max`` norms over the value dimension)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[2]
    gate = torch.zeros(T, T, dtype=q.dtype)
    if log_g is not None:
        G = log_g.repeat_interleave(rep, 1).cumsum(-1)
        gate = G[..., :, None] - G[..., None, :]
    g = torch.where(torch.ones(T, T, dtype=torch.bool).tril(), gate.exp(), torch.zeros((), dtype=q.dtype))
    sizes = g * (q.abs() @ k.abs().transpose(-1, -2)) ** deg
    den = (g * (q @ k.transpose(-1, -2)) ** deg).sum(-1)
    return (sizes * (v.abs().amax(-1)[..., None, :] + o.abs().amax(-1)[..., :, None])).sum(-1) / den


@pytest.mark.parametrize("deg", [2, 4])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk,switch_over,first", [(4, 8, 5), (4, 8, 0), (4, 4, 3), (3, 12, 11), (5, 25, 2)])
def test_long_step_equals_token_by_token(deg, gated, chunk, switch_over, first, gen):
    """A prefill of at least switch_over tokens (the chunked path) after ``first`` single tokens gives the
    outputs and the state (recent tokens, S, z, gate levels) of feeding the same tokens one at a time; ``(4, 4)``
    with 3 + 25 tokens leaves no recent token at all; ``(5, 25)`` is a step of exactly switch_over tokens."""
    T = first + 25
    q, k, v, log_g = inputs(gen, T=T, gated=gated)

    def run(cuts):
        state, outs, start = init_power_state(2, 2, 8, 8, gated, dtype=torch.float64), [], 0
        for stop in cuts:
            sl = slice(start, stop)
            o, state = power_retention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
                                            None if log_g is None else log_g[:, :, sl], deg, None, chunk, switch_over)
            outs.append(o)
            start = stop
        return torch.cat(outs, 2), state
    o1, s1 = run(list(range(1, T + 1)))
    o2, s2 = run(list(range(1, first + 1)) + [T])
    # relative to |o| the error is heavy-tailed (up to 2.6e-12 at deg 4: a row whose query is almost orthogonal
    # to its few keys has tiny weights, summed from features of size (|q_a k_a|)^deg); relative to the sums the
    # feature form adds up it is not: measured <= 5.1 eps over 100 seeds of every case here
    err = (o2 - o1).abs().amax(-1) / feature_sum_scale(q, k, v, log_g, deg, o1)
    assert err.max() < 64 * torch.finfo(torch.float64).eps, err.max()
    assert s2.k.shape == s1.k.shape and s2.seen == s1.seen == T
    for a, b in ((s1.k, s2.k), (s1.v, s2.v), (s1.S, s2.S), (s1.z, s2.z)) + (((s1.g, s2.g),) if gated else ()):
        # measured <= 5.5e-16 over 18 seeds
        assert a.shape == b.shape and (a.numel() == 0 or rel_err(b, a) < 1e-13)


def test_chunk_state_continues_the_sequence(gen):
    """Two calls with the state carried between them == one call over the whole sequence."""
    q, k, v, log_g = inputs(gen, T=45)
    ref = power_retention_chunk(q, k, v, log_g, 2, chunk_size=8)
    a, state = power_retention_chunk(q[:, :, :19], k[:, :, :19], v[:, :, :19], log_g[:, :, :19], 2, 8,
                                     return_state=True)
    b = power_retention_chunk(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], log_g[:, :, 19:], 2, 8, initial_state=state)
    # measured <= 2.8e-16 over 6 seeds
    assert rel_err(torch.cat([a, b], 2), ref) < 1e-13


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_chunked(gated, gen):
    q, k, v, log_g = inputs(gen, B=1, hq=2, hkv=1, T=7, d=3, e=2, gated=gated)
    args = [t.requires_grad_() for t in (q, k, v)] + ([log_g.requires_grad_()] if gated else [])
    fn = (lambda q, k, v, g: power_retention_chunk(q, k, v, g, 2, chunk_size=3)) if gated else \
         (lambda q, k, v: power_retention_chunk(q, k, v, None, 2, chunk_size=3))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("deg", [2, 4])
def test_chunked_gradients_equal_naive(deg, gen):
    q, k, v, log_g = inputs(gen, T=29)
    args = [t.requires_grad_() for t in (q, k, v, log_g)]
    w = torch.randn(2, 4, 29, 8, generator=gen, dtype=torch.float64)
    ref = torch.autograd.grad((power_retention_naive(*args, deg) * w).sum(), args)
    out = torch.autograd.grad((power_retention_chunk(*args, deg, chunk_size=8) * w).sum(), args)
    for a, b in zip(out, ref):
        # measured <= 8.8e-14 over 6 seeds (48 checks; median 8e-16): heavy tail, so 1e-11 stays
        assert rel_err(a, b) < 1e-11


def test_64k_tokens_in_fp16_do_not_overflow(gen):
    """Ungated, 65536 tokens: the state's sums pass fp16's largest value (65504) many times over; kept in
    float32, the fp16 run stays finite and as accurate as fp16 inputs allow."""
    T = 65536
    q, k, v, _ = inputs(gen, B=1, hq=1, hkv=1, T=T, d=16, e=16, gated=False)
    q, k = 2 * q, 2 * k
    ref, (_, z) = power_retention_chunk(q, k, v, None, 2, chunk_size=256, return_state=True)
    assert z.max() > 3 * 65504
    out = power_retention_chunk(q.half(), k.half(), v.half(), None, 2, chunk_size=256)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # fp16 inputs and output: measured 5.8e-4 over 6 seeds (about one fp16 rounding)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("checked_on_host", [True, False])
def test_hard_resets_keep_later_gates_exact_in_float32(checked_on_host, gen, monkeypatch):
    """Gates of exp(-1e6) (full resets) inside two chunks and at the end of one. A running sum of the gate over
    the whole sequence sat at -1e6 after one, where float32 values are 0.06 apart: every later gate factor was off
    by up to 6% (7-9e-3 of the output). Summed inside each chunk, the end-of-chunk reset was exact, the others were
    not (5-9e-3 of the output, 7e-3-1.2e-2 of the gradients); with the gate floored at -80 (``check_gate``) the
    chunked form, its gradients and token-by-token decoding are as exact as float32 allows, with the gate checked
    on the host (CPU) or poisoned (CUDA's way, switched on here).

    Compared on every token but the first three after the sequence's start and after each reset: those see one to
    three tokens, and where q is nearly orthogonal to their keys, normalising a few tiny weights in float32 is
    ill-conditioned (rows of 1e-4 error in the output, 1.4e-3 of a gradient, in 10,000 seeds; the backward's
    ``(v_j - o) . do`` cancels), whatever the gate does."""
    if not checked_on_host:
        monkeypatch.setattr(power_naive, "REFUSED_ON", ())
    resets = [5, 15, 40]
    q, k, v, log_g = inputs(gen, B=1, hq=2, hkv=1, T=48, gated=True)
    log_g[..., resets] = -1e6
    w = torch.randn(1, 2, 48, 8, generator=gen, dtype=torch.float64)
    ref_args = [t.clone().requires_grad_() for t in (q, k, v, log_g)]
    ref = power_retention_naive(*ref_args, 2)                                     # float64
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_args)
    args = [t.float().requires_grad_() for t in (q, k, v, log_g)]
    out = power_retention_chunk(*args, 2, chunk_size=16)
    grads = torch.autograd.grad((out * w.float()).sum(), args)
    state, steps = init_power_state(1, 1, 8, 8, True, dtype=torch.float32), []
    for t in range(48):
        o, state = power_retention_step(*(x[:, :, t:t + 1].float() for x in (q, k, v)), state,
                                        log_g[:, :, t:t + 1].float(), 2, None, 4, 8)
        steps.append(o)
    keep = torch.ones(48, dtype=torch.bool)
    for r in [0, *resets]:
        keep[r:r + 3] = False

    def kept(x):   # [B, H, T, d] or the gate's [B, H, T]
        return x[:, :, keep] if x.dim() == 4 else x[..., keep]
    # over 20,000 seeds at most 1.8e-6 (outputs) and 2.7e-5 (gradients; the next largest 4.1e-6)
    assert torch.isfinite(out).all() and rel_err(kept(out), kept(ref)) < 1e-5
    assert rel_err(kept(torch.cat(steps, 2)), kept(ref)) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and rel_err(kept(a), kept(b)) < 1e-4


def test_rotary_option_equals_rotating_first(gen):
    q, k, v, log_g = inputs(gen, T=30)
    pos = torch.arange(30)
    ref = power_retention_chunk(apply_rope(q, pos), apply_rope(k, pos), v, log_g, 2, 8)
    # measured exactly 0 over 6 seeds (same operations); 1e-12 allows a reordering
    assert rel_err(power_retention(q, k, v, log_g, 2, 8, rotary_base=10000.0), ref) < 1e-12
    m = build_mechanism("power", 4, 2, 8, rotary=True, switch_over=8, chunk_size=4).double()
    lg = m._log_g(q, 30)
    # measured exactly 0 over 6 seeds (same operations); 1e-12 allows a reordering
    assert rel_err(m(q, k, v), power_retention_naive(apply_rope(q, pos), apply_rope(k, pos), v, lg)) < 1e-12
    state, outs = m.init_state(2, dtype=torch.float64), []
    for t0, t1 in [(0, 11), (11, 12), (12, 30)]:
        o, state = m.step(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1], state)
        outs.append(o)
    # measured <= 3.8e-16 over 6 seeds
    assert rel_err(torch.cat(outs, 2), m(q, k, v)) < 1e-13


@pytest.mark.parametrize("name", ["power", "power4"])
def test_mechanism_long_input_uses_the_chunked_form(name, gen, monkeypatch):
    """Longer than switch_over: chunked (with the learned per-head decay) == naive with the same gate."""
    monkeypatch.setattr(power_mechanism, "QUADRATIC_MAX_TOKENS", 0)  # the chunked form past switch_over
    m = build_mechanism(name, 4, 2, 16, switch_over=32, chunk_size=16).double()
    q, k, v, _ = inputs(gen, T=50, d=16, e=16)
    log_g = m._log_g(q, 50)
    assert log_g.shape == (2, 2, 50) and (log_g < 0).all()
    # measured <= 7.1e-16 over 6 seeds
    assert rel_err(m(q, k, v), power_retention_naive(q, k, v, log_g, m.deg)) < 2e-14
    (m(q, k, v) ** 2).sum().backward()
    assert m.decay_logit.grad is not None and m.decay_logit.grad.abs().sum() > 0


def test_forward_takes_the_quadratic_form_while_it_is_cheaper(gen, monkeypatch):
    """Past switch_over (and without the kernel) the quadratic form runs while ``T (d + e)`` is at most
    ``4 D e + c (d + e)`` (d = e = 16, deg 2: D = 136, T <= 304) and T <= QUADRATIC_MAX_TOKENS."""
    assert power_mechanism.prefers_quadratic(304, 16, 16, 2, 32)
    assert not power_mechanism.prefers_quadratic(305, 16, 16, 2, 32)
    assert power_mechanism.prefers_quadratic(4096, 16, 16, 4, 64)          # deg 4: D = 3876
    assert not power_mechanism.prefers_quadratic(4097, 16, 16, 4, 64)      # past the memory cap
    m = build_mechanism("power", 4, 2, 16).double()                        # switch_over 64, chunk 32
    chunked = []
    real = power_mechanism.power_retention
    monkeypatch.setattr(power_mechanism, "power_retention",
                        lambda q, *a, **kw: chunked.append(q.shape[2]) or real(q, *a, **kw))
    for T, expect in [(128, []), (320, [320])]:
        q, k, v, _ = inputs(gen, T=T, d=16, e=16)
        # measured <= 4.1e-16 over 6 seeds
        assert rel_err(m(q, k, v), power_retention_naive(q, k, v, m._log_g(q, T), 2)) < 1e-13
        assert chunked == expect
        chunked.clear()


def test_registered_with_documented_defaults():
    assert {"power", "power4"} <= set(registered())
    p2, p4 = build_mechanism("power", 4, 2, 16), build_mechanism("power4", 4, 2, 16)
    assert (p2.deg, p2.chunk_size, p2.switch_over, p2.gate) == (2, 32, 64, "decay")
    assert (p4.deg, p4.chunk_size, p4.switch_over, p4.gate) == (4, 64, 1024, "decay")


@pytest.mark.parametrize("name", ["power", "power4"])
def test_state_is_flat_in_context_and_kv_sized_when_short(name):
    m = build_mechanism(name, 4, 2, 16, gate="none")
    full = build_mechanism("full", 4, 2, 16)
    long = [m.state_bytes(n) for n in (1 << 14, 1 << 17, 1 << 20, 1 << 24)]
    assert len(set(long)) == 1
    assert max(m.state_bytes(n) for n in range(m.switch_over, m.switch_over + 3 * m.chunk_size)) <= \
        m.state_bytes(1 << 20) + m.chunk_size * full.state_bytes(1)
    assert m.state_bytes(m.switch_over - 1) == full.state_bytes(m.switch_over - 1)
    assert m.state_bytes(1 << 20) < full.state_bytes(1 << 20) / 100


def test_tiny_gpt_trains_and_generates_with_power():
    for name in ("power", "power4"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(mechanism=name, n_embd=64, n_head=4, n_kv_head=2, block_size=128))
        idx = torch.randint(0, 256, (4, 128))
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        out = model.generate(idx[:1, :70], 5, temperature=0)
        assert out.shape == (1, 75)


def test_bad_arguments_are_named(gen):
    q, k, v, log_g = inputs(gen)
    with pytest.raises(ValueError, match="log_g must be"):
        power_retention_chunk(q, k, v, log_g[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        power_retention_chunk(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="gate must be one of"):
        build_mechanism("power", 4, 2, 8, gate="sigmoid")
    with pytest.raises(ValueError, match="switch_over must be a multiple of chunk_size"):
        build_mechanism("power", 4, 2, 8, chunk_size=32, switch_over=48)
    with pytest.raises(ValueError, match="log_g must be given exactly when"):
        power_retention_step(q, k, v, init_power_state(2, 2, 8, 8, gated=False, dtype=torch.float64), log_g)
    with pytest.raises(ValueError, match="use_kernel=True"):
        power_retention(q, k, v, deg=4, use_kernel=True)
