"""Independent oracles: every expected value here is computed from the method's written definition (float64, tiny
shapes, explicit loops over tokens), never through the library's own helpers or parametrisation, so a bug shared
by an implementation and its ``naive`` oracle, or in how a module turns its constructor arguments into
parameters, still fails a test.

Covered: bottom-right causal masks of ``attention`` (forward, lse and gradients, GQA, batch > 1); power
retention's per-head gates (the functions and the ``"power"`` mechanism's per-KV-head decay); Tensor Cache
(``decay_init`` / ``eta_init`` / ``gate_init`` and both feature maps, forward and step forms); RayTention's
``tau`` / ``gamma`` initialisation and the signals' dependence on them; ``longctx bench --deterministic``.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from longctx import cli
from longctx.attention import attention
from longctx.bench import run as bench_run
from longctx.bench.presets import settings_for
from longctx.mechanisms.power import PowerRetention, power_retention, power_retention_naive, power_retention_step
from longctx.mechanisms.power import init_power_state
from longctx.mechanisms.raytention import RayTention, RayTentionLayer, raytention_signals, raytention_signals_naive
from longctx.mechanisms.tensor_cache import TensorCache
from longctx.model import GPTConfig
from conftest import rel_err

F64 = torch.float64


def randn(gen, *shape, requires_grad=False):
    return torch.randn(*shape, generator=gen, dtype=F64, requires_grad=requires_grad)


def pieces(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges cutting ``0 .. total`` into steps of ``sizes`` (cycled)."""
    out, start, n = [], 0, 0
    while start < total:
        stop = min(total, start + sizes[n % len(sizes)])
        out.append((start, stop))
        start, n = stop, n + 1
    return out


# --- 1. causal masks of exact attention ------------------------------------------------------------------------

def causal_attention_loop(q, k, v, scale):
    """Query ``i`` of ``Tq`` sits at key position ``Tk - Tq + i`` and sees keys ``j <= i + (Tk - Tq)``;
    query head ``h`` reads KV head ``h // (Hq / Hkv)``. Returns ``(out, lse)``, differentiable."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    outs, lses = [], []
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Tq):
                visible = [j for j in range(Tk) if j <= i + (Tk - Tq)]
                s = torch.stack([scale * (q[b, h, i] @ k[b, kh, j]) for j in visible])
                lse = torch.logsumexp(s, 0)
                p = torch.exp(s - lse)
                outs.append(sum(p[n] * v[b, kh, j] for n, j in enumerate(visible)))
                lses.append(lse)
    return torch.stack(outs).view(B, Hq, Tq, -1), torch.stack(lses).view(B, Hq, Tq)


@pytest.mark.parametrize("tq,tk,scale", [(1, 6, None), (3, 8, 0.7), (4, 5, None), (6, 6, None), (5, 9, None)])
@pytest.mark.parametrize("return_lse", [False, True])
def test_causal_attention_matches_an_explicit_bottom_right_mask(tq, tk, scale, return_lse, gen):
    """Forward (with and without gradients being recorded: different dispatch paths) and the gradients of
    ``q, k, v`` against the loop above; GQA (4 query heads on 2 KV heads), batch 2."""
    B, Hq, Hkv, D = 2, 4, 2, 8
    q = randn(gen, B, Hq, tq, D, requires_grad=True)
    k, v = randn(gen, B, Hkv, tk, D, requires_grad=True), randn(gen, B, Hkv, tk, D, requires_grad=True)
    ref_out, ref_lse = causal_attention_loop(q, k, v, D ** -0.5 if scale is None else scale)

    with torch.no_grad():
        got = attention(q, k, v, causal=True, scale=scale, return_lse=return_lse)
    out, lse = got if return_lse else (got, None)
    # measured over 36 runs: <= 4.8e-16 (float64, every path; out and lse, here and below)
    assert rel_err(out, ref_out) < 5e-15
    if return_lse:
        assert rel_err(lse, ref_lse) < 5e-15

    got = attention(q, k, v, causal=True, scale=scale, return_lse=return_lse)
    out, lse = got if return_lse else (got, None)
    assert rel_err(out, ref_out) < 5e-15
    w_out = randn(gen, *ref_out.shape)
    loss, ref_loss = (out * w_out).sum(), (ref_out * w_out).sum()
    if return_lse:
        assert rel_err(lse, ref_lse) < 5e-15
        w_lse = randn(gen, *ref_lse.shape)
        loss, ref_loss = loss + (lse * w_lse).sum(), ref_loss + (ref_lse * w_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 3e-14, name   # measured over 36 runs: <= 2.8e-15


@pytest.mark.parametrize("tq,tk,return_lse", [(3, 8, False), (6, 6, True)])
def test_causal_attention_with_a_value_width_other_than_the_key_width(tq, tk, return_lse, gen):
    """``v [B, Hkv, Tk, Dv]`` with ``Dv != D``, as the docstring allows, on the no-gradient path."""
    q, k, v = randn(gen, 2, 4, tq, 8), randn(gen, 2, 2, tk, 8), randn(gen, 2, 2, tk, 5)
    ref_out, _ = causal_attention_loop(q, k, v, 8 ** -0.5)
    with torch.no_grad():
        got = attention(q, k, v, causal=True, return_lse=return_lse)
    assert rel_err(got[0] if return_lse else got, ref_out) < 5e-15   # measured over 36 runs: <= 3.9e-16


def test_causal_attention_rejects_more_queries_than_keys(gen):
    """``Tq > Tk`` has no bottom-right causal alignment (leading queries would see nothing): a clear error."""
    q, k = randn(gen, 1, 2, 5, 4), randn(gen, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="Tq=5"):
        attention(q, k, k, causal=True)


# --- 2. power retention: per-head gates ------------------------------------------------------------------------

def power_loop(q, k, v, log_g, deg, scale):
    """``out_i = sum_{j<=i} w_ij v_j / sum_j w_ij``, ``w_ij = exp(G_i - G_j) (scale q_i.k_j)^deg``, with
    ``G_t = sum_{u<=t} log_g_u`` of query head ``h``'s own KV head ``h // (Hq / Hkv)``."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            G, running = [], 0.0
            for t in range(T):
                running = running + float(log_g[b, kh, t])
                G.append(running)
            for i in range(T):
                num, den = torch.zeros(v.shape[-1], dtype=F64), 0.0
                for j in range(i + 1):
                    w = math.exp(G[i] - G[j]) * float(scale * (q[b, h, i] @ k[b, kh, j])) ** deg
                    num, den = num + w * v[b, kh, j], den + w
                out[b, h, i] = num / den
    return out


def distinct_head_gates(gen, B, T):
    """Per-token log-gates for 3 KV heads with clearly different ranges: slow, fast, and very fast decay."""
    lo_hi = torch.tensor([[0.0, 0.05], [0.3, 0.6], [1.0, 2.0]], dtype=F64)
    u = torch.rand(B, 3, T, generator=gen, dtype=F64)
    return -(lo_hi[:, 0, None] + (lo_hi[:, 1] - lo_hi[:, 0])[:, None] * u)


@pytest.mark.parametrize("deg", [2, 4])
def test_power_retention_uses_each_heads_own_gate(deg, gen):
    """``power_retention`` (chunked: 5 chunks of 8) and ``power_retention_naive`` with 3 KV heads whose gates differ
    by orders of magnitude, 6 query heads (GQA), against the loop."""
    B, Hq, T, d, e = 2, 6, 37, 4, 3
    q, k, v = randn(gen, B, Hq, T, d), randn(gen, B, 3, T, d), randn(gen, B, 3, T, e)
    log_g = distinct_head_gates(gen, B, T)
    ref = power_loop(q, k, v, log_g, deg, d ** -0.5)
    # measured over 36 runs: chunked <= 1.5e-15, naive <= 2.5e-16 (float64)
    assert rel_err(power_retention(q, k, v, log_g, deg=deg, chunk_size=8), ref) < 2e-14
    assert rel_err(power_retention_naive(q, k, v, log_g, deg=deg), ref) < 3e-15
    # and the decoding form, token by token and in pieces that fold
    state, outs = init_power_state(B, 3, d, e, gated=True, dtype=F64), []
    for a, b in pieces(T, [1, 3, 1, 12, 2]):
        o, state = power_retention_step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, log_g[:, :, a:b], deg,
                                        None, chunk_size=4, switch_over=8)
        outs.append(o)
    assert rel_err(torch.cat(outs, 2), ref) < 5e-14   # measured over 36 runs: <= 3.8e-15


def test_power_mechanism_initial_decays_are_half_lives_32_to_512():
    """``log_g_h = -softplus(decay_logit_h)`` starts at ``-ln 2 / half_life_h``, half-lives geometric from 32 to
    512 over the KV heads."""
    m = PowerRetention(n_head=6, n_kv_head=3, head_dim=4)
    half_lives = torch.tensor([32.0, 128.0, 512.0], dtype=F64)
    got = -torch.nn.functional.softplus(m.decay_logit.detach().double())
    # float32 parameter (relative rounding <= 6e-8) through softplus: measured 2.2e-7 relative
    torch.testing.assert_close(got, -math.log(2) / half_lives, rtol=1e-6, atol=0)


@pytest.mark.parametrize("T", [8, 30])
@pytest.mark.parametrize("rates", ["init", "distinct"])
def test_power_mechanism_applies_each_kv_heads_own_decay(T, rates, gen):
    """The ``"power"`` mechanism (T=8: quadratic form; T=30: chunked form) and its step form against the loop
    with KV head ``h``'s own constant gate: the initial half-lives 32/128/512, or decay rates 0.05/0.4/1.5 set
    through ``decay_logit`` (``-log_g = softplus(decay_logit)``)."""
    B, Hq, Hkv, d = 2, 6, 3, 4
    m = PowerRetention(Hq, Hkv, d, chunk_size=4, switch_over=8).double()
    if rates == "init":
        rate = [math.log(2) / hl for hl in (32.0, 128.0, 512.0)]
        tol = 1e-7      # the float32 parameter holds the rates to ~6e-8; measured over 36 runs: <= 6.3e-9
    else:
        tol = 2e-14     # set in float64; measured over 36 runs: <= 1.7e-15
        rate = [0.05, 0.4, 1.5]
        with torch.no_grad():
            m.decay_logit.copy_(torch.tensor([math.log(math.expm1(r)) for r in rate], dtype=F64))
    q, k, v = randn(gen, B, Hq, T, d), randn(gen, B, Hkv, T, d), randn(gen, B, Hkv, T, d)
    log_g = torch.tensor(rate, dtype=F64)[None, :, None].neg().expand(B, Hkv, T)
    ref = power_loop(q, k, v, log_g, 2, d ** -0.5)
    with torch.no_grad():
        assert rel_err(m(q, k, v), ref) < tol
        state, outs = m.init_state(B, dtype=F64), []
        for a, b in pieces(T, [1, 2, 5, 1, 9]):
            o, state = m.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
            outs.append(o)
    assert rel_err(torch.cat(outs, 2), ref) < tol


# --- 3. Tensor Cache -------------------------------------------------------------------------------------------

def phi(x, feature):
    """Feature map on one vector: the identity, or ``x / ||x||_2``."""
    return x if feature == "identity" else x / torch.sqrt((x * x).sum())


def tensor_cache_loop(q, k, v, W, lam, eta, mix, feature, write, chunk):
    """Token ``i``: token ``j = i - W`` leaves the window and is written to its KV head's memory
    (``exact``: ``A <- lam A + phi(k_j) (eta v_j)^T``; ``chunk_mean``: every ``chunk`` evicted tokens,
    ``A <- lam^C A + eta C mean(phi k) mean(v)^T``); then ``L1`` = softmax attention over keys ``(i - W, i]``
    (scale ``1/sqrt(D)``) and ``r = phi(q_i)^T A`` (the write included); ``out = m L1 + (1 - m) r``.
    ``lam, eta`` per KV head, ``mix`` (= sigmoid of the gate) per query head, all python floats."""
    B, Hq, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    out = torch.zeros(B, Hq, T, Dv, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            A = torch.zeros(D, Dv, dtype=F64)
            held = []                                   # evicted (phi(k), v) of the open chunk
            for i in range(T):
                j = i - W
                if j >= 0:
                    fk = phi(k[b, kh, j], feature)
                    if write == "exact":
                        A = lam[kh] * A + torch.outer(fk, eta[kh] * v[b, kh, j])
                    else:
                        held.append((fk, v[b, kh, j]))
                        if len(held) == chunk:
                            mk = sum(x for x, _ in held) / chunk
                            mv = sum(y for _, y in held) / chunk
                            A = lam[kh] ** chunk * A + eta[kh] * chunk * torch.outer(mk, mv)
                            held = []
                lo = max(0, i - W + 1)
                s = torch.stack([q[b, h, i] @ k[b, kh, t] for t in range(lo, i + 1)]) / math.sqrt(D)
                p = torch.softmax(s, 0)
                l1 = sum(p[n] * v[b, kh, t] for n, t in enumerate(range(lo, i + 1)))
                r = phi(q[b, h, i], feature) @ A
                out[b, h, i] = mix[h] * l1 + (1 - mix[h]) * r
    return out


def tensor_cache_outputs(m, q, k, v):
    """``(forward, eager steps in pieces, static one-token steps)`` of ``m`` in float64."""
    B, T = q.shape[0], q.shape[2]
    with torch.no_grad():
        fwd = m(q, k, v)
        state, outs = m.init_state(B, dtype=F64), []
        for a, b in pieces(T, [1, 2, 1, 5, 1, 1, 6, 3]):
            o, state = m.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
            outs.append(o)
        static, souts = m.init_static_state(B, T, dtype=F64), []
        for t in range(T):
            one = slice(t, t + 1)
            souts.append(m.step_static(q[:, :, one], k[:, :, one], v[:, :, one], static, torch.tensor([t]),
                                       m.static_variant(t)))
    return fwd, torch.cat(outs, 2), torch.cat(souts, 2)


def test_tensor_cache_fresh_module_holds_its_init_arguments():
    """``lam == decay_init``, ``eta == eta_init``, ``sigmoid(g) == sigmoid(gate_init)``, for every head."""
    m = TensorCache(4, 2, 4, window=4, decay_init=0.7, eta_init=1.7, gate_init=-0.4)
    # float32 parameters: relative rounding <= 6e-8
    torch.testing.assert_close(m.decay.double(), torch.full((2,), 0.7, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(m.eta.double(), torch.full((2,), 1.7, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.sigmoid(m.gate.double()), torch.full((4,), 1 / (1 + math.exp(0.4)),
                                                                          dtype=F64), rtol=1e-6, atol=0)
    d = TensorCache(4, 2, 4)                                   # documented defaults: 0.99, 1.0, 0.0
    torch.testing.assert_close(d.decay.double(), torch.full((2,), 0.99, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(d.eta.double(), torch.full((2,), 1.0, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.sigmoid(d.gate.double()), torch.full((4,), 0.5, dtype=F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("feature", ["identity", "normalize"])
@pytest.mark.parametrize("write", ["exact", "chunk_mean"])
def test_tensor_cache_matches_the_definition_with_its_init_arguments(feature, write, gen):
    """A fresh module (window 4, 20 tokens: 16 writes; chunk 3) in its forward, eager step and static step forms
    against the loop with ``lam = decay_init``, ``eta = eta_init``, ``sigmoid(gate_init)`` taken from the
    constructor's arguments. Keys and queries are scaled by 3 so that the identity and the unit-norm feature
    maps differ clearly."""
    B, Hq, Hkv, D, T, W = 2, 4, 2, 4, 20, 4
    decay_init, eta_init, gate_init = 0.7, 1.7, -0.4
    m = TensorCache(Hq, Hkv, D, window=W, feature=feature, write=write, chunk=3, decay_init=decay_init,
                    eta_init=eta_init, gate_init=gate_init).double()
    q, k, v = 3 * randn(gen, B, Hq, T, D), 3 * randn(gen, B, Hkv, T, D), randn(gen, B, Hkv, T, D)
    mix = 1 / (1 + math.exp(-gate_init))
    ref = tensor_cache_loop(q, k, v, W, [decay_init] * Hkv, [eta_init] * Hkv, [mix] * Hq, feature, write, 3)
    for name, out in zip(("forward", "step", "step_static"), tensor_cache_outputs(m, q, k, v)):
        assert rel_err(out, ref) < 3e-15, name                 # measured over 6 runs: <= 2.6e-16


def test_tensor_cache_reads_each_heads_own_parameters(gen):
    """With the offsets moved so that every KV head has its own ``lam, eta`` and every query head its own gate,
    the module's outputs follow the loop with the values it reports (``decay``, ``eta``, ``gate``) per head."""
    B, Hq, Hkv, D, T, W = 1, 4, 2, 4, 16, 3
    m = TensorCache(Hq, Hkv, D, window=W, feature="normalize", chunk=4, decay_init=0.8, eta_init=0.5).double()
    with torch.no_grad():
        m.decay_offset.copy_(torch.tensor([-2.0, 2.0]))
        m.eta_offset.copy_(torch.tensor([1.5, -1.0]))
        m.gate_offset.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    lam, eta, mix = m.decay.tolist(), m.eta.tolist(), torch.sigmoid(m.gate).tolist()
    assert abs(lam[0] - lam[1]) > 0.3 and abs(eta[0] - eta[1]) > 1 and mix[3] - mix[0] > 0.7
    q, k, v = randn(gen, B, Hq, T, D), randn(gen, B, Hkv, T, D), randn(gen, B, Hkv, T, D)
    ref = tensor_cache_loop(q, k, v, W, lam, eta, mix, "normalize", "exact", None)
    for name, out in zip(("forward", "step", "step_static"), tensor_cache_outputs(m, q, k, v)):
        assert rel_err(out, ref) < 3e-15, name                 # measured over 6 runs: <= 2.6e-16


# --- 4. RayTention ---------------------------------------------------------------------------------------------

def raytention_loop(q, e, tau, gamma):
    """Signals ``[B, H, T, 5D+2]`` of queries ``q [B, H, T, D]`` at positions ``0..T-1`` over keys ``e [B, T, D]``,
    ``tau, gamma`` per head: with ``d_j = ||q_i - e_j||^2`` and ``p_j = softmax_j(-d_j / tau)`` over ``j <= i``:
    centroid ``sum p_j e_j``; temporal centroid with weights ``p_j gamma^(i-j)`` renormalised; predecessor
    ``e_{i-1}`` (0 at ``i = 0``); the nearest and second nearest keys (ties: lower index; one key: twice);
    spread ``sum p_j d_j``; entropy ``-sum p_j ln p_j``."""
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, 5 * D + 2, dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                d = [float(((q[b, h, i] - e[b, j]) ** 2).sum()) for j in range(i + 1)]
                z = [math.exp(-dj / tau[h]) for dj in d]
                p = [x / sum(z) for x in z]
                w = [p[j] * gamma[h] ** (i - j) for j in range(i + 1)]
                w = [x / sum(w) for x in w]
                centroid = sum(p[j] * e[b, j] for j in range(i + 1))
                temporal = sum(w[j] * e[b, j] for j in range(i + 1))
                pred = e[b, i - 1] if i > 0 else torch.zeros(D, dtype=F64)
                order = sorted(range(i + 1), key=lambda j: (d[j], j))
                top1, top2 = e[b, order[0]], e[b, order[1] if i > 0 else order[0]]
                spread = sum(p[j] * d[j] for j in range(i + 1))
                entropy = -sum(x * math.log(x) for x in p if x > 0)
                out[b, h, i] = torch.cat([centroid, temporal, pred, top1, top2,
                                          torch.tensor([spread, entropy], dtype=F64)])
    return out


def test_raytention_signals_follow_tau_and_gamma(gen):
    """The naive and blocked signals with per-head ``tau`` (0.5 and 6: sharp and flat) and ``gamma`` (0.3 and 0.9)
    against the loop; ``log_gamma = ln gamma`` as documented."""
    B, H, T, D = 2, 2, 9, 3
    q, e = randn(gen, B, H, T, D), randn(gen, B, T, D)
    tau, gamma = [0.5, 6.0], [0.3, 0.9]
    ref = raytention_loop(q, e, tau, gamma)
    t, lg = torch.tensor(tau, dtype=F64), torch.log(torch.tensor(gamma, dtype=F64))
    # measured over 6 runs: <= 2.3e-16
    assert rel_err(raytention_signals_naive(q, e, t, lg), ref) < 3e-15
    assert rel_err(raytention_signals(q, e, t, lg, 0, 4, 3), ref) < 3e-15


def raytention_layer(n_embd, n_head, **options):
    cfg = GPTConfig(n_layer=1, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, mechanism="raytention",
                    mechanism_options=options)
    return RayTention.make_layer(cfg)


def test_raytention_fresh_layer_holds_tau_and_gamma_init():
    """``tau = exp(log_tau)`` starts at ``tau_init`` (default ``sqrt(n_embd)``), ``gamma = sigmoid(gamma_logit)``
    at ``gamma_init`` (default 0.7), in every head."""
    for layer, tau, gamma in [(raytention_layer(16, 2), 4.0, 0.7),
                              (raytention_layer(16, 2, heads=3, tau_init=2.5, gamma_init=0.4), 2.5, 0.4),
                              (RayTentionLayer(8, 2, 4, tau_init=0.3, gamma_init=0.95, block_size=4,
                                               layer_index=0), 0.3, 0.95)]:
        H = layer.n_head
        # float32 parameters: relative rounding <= 6e-8
        torch.testing.assert_close(layer.log_tau.exp().double(), torch.full((H,), tau, dtype=F64), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.sigmoid(layer.gamma_logit).double(), torch.full((H,), gamma, dtype=F64),
                                   rtol=1e-6, atol=0)


def test_raytention_layer_signals_use_tau_init_and_gamma_init(gen):
    """A fresh layer (feed-forward replaced by the identity, so it returns its signals; query head ``h`` set to
    ``(h + 1) x``) in its forward and step forms against the loop with the constructor's ``tau_init`` and
    ``gamma_init``."""
    B, T, C, H, tau_init, gamma_init = 2, 9, 4, 2, 1.5, 0.4
    layer = RayTentionLayer(C, H, 4, tau_init=tau_init, gamma_init=gamma_init, block_size=4, layer_index=0).double()
    layer.ffn = nn.Identity()
    with torch.no_grad():
        layer.q_proj.weight.copy_(torch.cat([(h + 1) * torch.eye(C, dtype=F64) for h in range(H)]))
    embed = nn.Embedding(11, C).double()
    with torch.no_grad():
        embed.weight.copy_(randn(gen, 11, C))
    tokens = torch.randint(0, 11, (B, T), generator=gen)
    x = randn(gen, B, T, C)
    q = torch.stack([(h + 1) * x for h in range(H)], 1)
    ref = raytention_loop(q, embed.weight[tokens].detach(), [tau_init] * H, [gamma_init] * H)
    with torch.no_grad():
        fwd = layer(x, SimpleNamespace(tokens=tokens, embed=embed))
        state, outs = layer.init_state(B, "cpu", F64), []
        for a, b in pieces(T, [1, 3, 2]):
            o, state = layer.step(x[:, a:b], SimpleNamespace(tokens=tokens[:, a:b], embed=embed), state)
            outs.append(o)
    # log_tau and gamma_logit are initialised in float32 (tau, gamma off by ~1e-8 relative);
    # measured over 6 runs: <= 2e-9
    assert rel_err(fwd, ref) < 1e-7
    assert rel_err(torch.cat(outs, 2), ref) < 1e-7


# --- 5. bench --deterministic ----------------------------------------------------------------------------------

TINY = dict(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, block_size=32, batch_size=4, steps=2, recall_steps=2,
            eval_batches=1, recall_pairs=[1], recall_min_distance=8, needle_distances=[8], eval_context_multiples=[],
            measure_contexts=[40], decode_steps=1, prefill_chunk=16, contexts=[64])


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("In the beginning was the word, and the word was long. " * 40, encoding="utf-8")
    return f


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def spy_on_training(monkeypatch, raise_after=False):
    """Replace the bench's ``train`` by one that records ``torch.are_deterministic_algorithms_enabled()``."""
    seen, real = [], bench_run.train
    monkeypatch.setattr(bench_run, "write_report", lambda results, out: None)   # plots: half the run's time

    def spy(*a, **k):
        seen.append(torch.are_deterministic_algorithms_enabled())
        if raise_after:
            raise RuntimeError("stop here")
        return real(*a, **k)
    monkeypatch.setattr(bench_run, "train", spy)
    return seen


@pytest.mark.parametrize("flag", [True, False])
def test_bench_trains_under_deterministic_algorithms_exactly_when_asked(flag, tmp_path, corpus, monkeypatch,
                                                                       restore_determinism):
    torch.use_deterministic_algorithms(False)
    seen = spy_on_training(monkeypatch)
    bench_run.run_bench(settings_for("cpu", **TINY, deterministic=flag), ["full"], "cpu", tmp_path / "out",
                        str(corpus), progress=False)
    assert seen == [flag, flag]                 # the text model and the recall model
    assert not torch.are_deterministic_algorithms_enabled()


def test_bench_restores_the_previous_setting_also_when_training_fails(tmp_path, corpus, monkeypatch,
                                                                      restore_determinism):
    torch.use_deterministic_algorithms(True, warn_only=True)       # a caller's own setting: warn-only mode
    seen = spy_on_training(monkeypatch, raise_after=True)
    with pytest.raises(RuntimeError, match="stop here"):
        bench_run.run_bench(settings_for("cpu", **TINY, deterministic=True), ["full"], "cpu", tmp_path / "out",
                            str(corpus), progress=False)
    assert seen == [True]
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match="stop here"):
        bench_run.run_bench(settings_for("cpu", **TINY, deterministic=True), ["full"], "cpu", tmp_path / "out2",
                            str(corpus), progress=False)
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("argv,expected", [([], False), (["--deterministic"], True)])
def test_cli_deterministic_flag_reaches_the_bench_settings(argv, expected, tmp_path, monkeypatch):
    got = []

    def fake_run_bench(s, *a, **k):
        got.append(s.deterministic)
        return {}
    monkeypatch.setattr(bench_run, "run_bench", fake_run_bench)
    assert cli.main(["bench", "--mechanisms", "full", "--out", str(tmp_path), "--no-progress", *argv]) == 0
    assert got == [expected]
