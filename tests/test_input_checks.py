"""Bad input at the library's public edge (mechanisms, their states, the GPT) is refused with an error that names
the problem, before any arithmetic: nothing runs on a state made by another mechanism, configuration or batch
size, no size is zero, negative or fractional, no token id lies outside the vocabulary; empty inputs give empty
results where a result is defined."""
import pytest
import torch

from longctx import build_mechanism
from longctx.model import GPT, GPTConfig

OTHER_CONFIG = [   # (mechanism, its options, the options of the state's maker, what the error names)
    ("sliding_window", {"window": 8}, {"window": 4}, "expected \\(1, 2, 8, 16\\)"),
    ("power", {}, {"chunk_size": 16, "switch_over": 32}, "chunk_size / switch_over"),
    ("power", {}, {"gate": "none"}, "g is missing"),
    ("tensor_cache", {"window": 8}, {"window": 4}, "expected \\(1, 2, 8, 16\\)"),
    ("tensor_cache", {}, {"write": "chunk_mean"}, "pending_k is present"),
]


def mech(name, **options):
    return build_mechanism(name, 4, 2, 16, **options)


def qkv(gen, batch=1, n=1):
    return (torch.randn(batch, 4, n, 16, generator=gen), torch.randn(batch, 2, n, 16, generator=gen),
            torch.randn(batch, 2, n, 16, generator=gen))


def run_steps(m, state, gen, n):
    for _ in range(n):
        _, state = m.step(*qkv(gen, state_batch(state)), state)
    return state


def state_batch(state) -> int:
    return (state.k if hasattr(state, "k") else state.window.k).shape[0]


@pytest.mark.parametrize("name,options,maker,match", OTHER_CONFIG)
def test_step_refuses_a_state_of_another_configuration(name, options, maker, match, gen):
    other = mech(name, **maker)
    state = run_steps(other, other.init_state(1), gen, 40)
    with pytest.raises(ValueError, match=match):
        mech(name, **options).step(*qkv(gen), state)


@pytest.mark.parametrize("name", ["full", "sliding_window", "power", "tensor_cache"])
def test_step_refuses_another_batch_and_another_mechanism(name, gen):
    m = mech(name)
    with pytest.raises(ValueError, match="expected \\(1, "):          # a batch-2 state, batch-1 tokens
        m.step(*qkv(gen), m.init_state(2))
    foreign = mech("sliding_window" if name == "full" else "full").init_state(1)
    with pytest.raises(TypeError, match=f"needs a {type(m.init_state(1)).__name__}"):
        m.step(*qkv(gen), foreign)
    with pytest.raises(TypeError, match="needs a Static"):
        m.prefill_static(*qkv(gen), m.init_state(1), 0)


@pytest.mark.parametrize("name", ["full", "sliding_window", "power", "power4", "tensor_cache"])
def test_no_new_tokens_give_an_empty_output(name, gen):
    m = mech(name)
    q, k, v = qkv(gen, batch=2, n=0)
    assert m(q, k, v).shape == (2, 4, 0, 16)
    state = run_steps(m, m.init_state(2), gen, 3)
    out, after = m.step(q, k, v, state)
    assert out.shape == (2, 4, 0, 16) and after is state


@pytest.mark.parametrize("build,match", [
    (lambda: mech("sliding_window", window=2.5), "window must be an int >= 1, got 2.5"),
    (lambda: mech("tensor_cache", window=0), "window must be an int >= 1, got 0"),
    (lambda: mech("tensor_cache", chunk=1.5), "chunk must be an int"),
    (lambda: mech("tensor_cache", eta_init=float("inf")), "eta_init"),
    (lambda: build_mechanism("full", 4, 2, 15.0), "head_dim must be an int"),
    (lambda: build_mechanism("full", 0, 2, 16), "n_head must be an int >= 1"),
    (lambda: mech("full").state_bytes(-1), "context_len must be an int >= 0, got -1"),
    (lambda: mech("power").state_bytes(10, 0), "batch must be an int >= 1, got 0"),
    (lambda: mech("sliding_window").state_bytes(1.5), "context_len must be an int >= 0, got 1.5"),
    (lambda: mech("power").init_state(0), "batch must be an int >= 1"),
    (lambda: mech("full").init_static_state(1, 0), "capacity must be an int >= 1"),
])
def test_sizes_are_refused_at_the_edge(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("options,match", [
    (dict(vocab_size=0), "vocab_size"), (dict(n_layer=0), "n_layer"), (dict(n_head=0), "n_head"),
    (dict(n_embd=30, n_head=4), "divisible"), (dict(n_embd=36, n_head=4, n_kv_head=2), "must be even"),
    (dict(mlp_ratio=0), "mlp_ratio"), (dict(block_size=0), "block_size"), (dict(rope_base=-1.0), "rope_base"),
    (dict(n_layer=2.0), "n_layer"), (dict(mechanism="nope"), "unknown mechanism"),
])
def test_gpt_config_refuses_bad_sizes(options, match):
    with pytest.raises((ValueError, KeyError), match=match):
        GPTConfig(**options)


def test_gpt_refuses_ids_outside_the_vocabulary_and_empty_prompts():
    m = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1)).eval()
    for ids, match in [(torch.tensor([[1, 256]]), "from 1 to 256"), (torch.tensor([[-1, 3]]), "from -1 to 3"),
                       (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
                       (torch.zeros(0, 3, dtype=torch.long), "at least one sequence")]:
        for call in (lambda: m(ids), lambda: m.step(ids, m.init_state(max(1, ids.shape[0]))),
                     lambda: m.generate(ids, 2), lambda: m.prefill_static(ids, m.init_static_state(1, 8))):
            with pytest.raises(ValueError, match=match):
                call()
    with pytest.raises(ValueError, match="context_len"):
        m.state_bytes(-3)


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("-inf"), float("inf")], ids=["positive", "nan", "-inf", "inf"])
def test_power_gates_must_be_finite_and_not_positive(bad, gen):
    """A log gate that is positive, NaN or infinite is refused by every power-retention form (before it gave NaN,
    or a state growing without bound, silently); 0 and large negative gates are fine."""
    from longctx.mechanisms.power import init_power_state, power_retention, power_retention_step
    from longctx.mechanisms.power.naive import power_retention_naive

    q = torch.randn(1, 2, 6, 8, generator=gen)
    k, v = q[:, :1].clone(), q[:, 1:].clone()
    log_g = -torch.rand(1, 1, 6, generator=gen)
    log_g[0, 0, 0] = 0.0
    log_g[0, 0, 1] = -80.0
    power_retention(q, k, v, log_g, chunk_size=4)
    log_g[0, 0, 3] = bad
    calls = {"chunked": lambda: power_retention(q, k, v, log_g, chunk_size=4),
             "naive": lambda: power_retention_naive(q, k, v, log_g),
             "step": lambda: power_retention_step(q, k, v, init_power_state(1, 1, 8, 8, gated=True), log_g)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="log_g must be finite and <= 0 .* 1 of 6 values are not"):
            call()


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("-inf"), float("inf")], ids=["positive", "nan", "-inf", "inf"])
def test_power_gates_are_poisoned_where_not_checked_on_the_host(bad, gen, monkeypatch):
    """Where the gate is not checked on the host (CUDA: a check would synchronise), a bad gate value turns its
    token's output and every later one of that KV head's query heads into NaN, in every form; the other heads and
    batch rows, and the tokens before the bad one's chunk, are exactly the clean run's. (The policy is switched on
    the CPU here; ``benchmarks/gate_poison_check.py`` runs the CUDA kernel.)"""
    from longctx.mechanisms.power import init_power_state, power_retention, power_retention_step
    from longctx.mechanisms.power import naive
    from longctx.mechanisms.power.naive import power_retention_naive

    monkeypatch.setattr(naive, "REFUSED_ON", ())
    B, hq, hkv, T, d, c, at = 2, 4, 2, 13, 8, 4, 6          # the bad gate: batch row 1, KV head 0, token 6
    q = torch.randn(B, hq, T, d, generator=gen, dtype=torch.float64)
    k, v = torch.randn(B, hkv, T, d, generator=gen, dtype=torch.float64), torch.randn(B, hkv, T, 5, generator=gen,
                                                                                      dtype=torch.float64)
    clean = torch.nn.functional.logsigmoid(torch.randn(B, hkv, T, generator=gen, dtype=torch.float64))
    log_g = clean.clone()
    log_g[1, 0, at] = bad
    forms = {"chunked": lambda g: power_retention(q, k, v, g, chunk_size=c),
             "naive": lambda g: power_retention_naive(q, k, v, g),
             "prefill step": lambda g: power_retention_step(q, k, v, init_power_state(B, hkv, d, 5, gated=True,
                                                                                      dtype=torch.float64), g,
                                                            chunk_size=c, switch_over=2 * c)[0],
             "one-token steps": lambda g: one_token_steps(g)}

    def one_token_steps(g):
        state, outs = init_power_state(B, hkv, d, 5, gated=True, dtype=torch.float64), []
        for t in range(T):
            o, state = power_retention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                            g[:, :, t:t + 1], chunk_size=c, switch_over=2 * c)
            outs.append(o)
        return torch.cat(outs, 2)

    for name, form in forms.items():
        want, got = form(clean), form(log_g)
        reached = got[1, :2, at:]                           # query heads 0 and 1 share KV head 0
        assert torch.isnan(reached).all(), f"{name}: a finite output after a bad gate"
        untouched = torch.ones_like(got, dtype=torch.bool)
        untouched[1, :2, at // c * c:] = False
        torch.testing.assert_close(got[untouched], want[untouched], rtol=0, atol=0, msg=f"{name}: other outputs moved")
