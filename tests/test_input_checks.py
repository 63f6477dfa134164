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


def power_fn():
    import longctx.mechanisms.power as power
    return power


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
    (lambda: mech("sliding_window").init_static_state(1, -1), "capacity must be an int >= 1, got -1"),
    (lambda: mech("power").state_bytes(10, 1, "bfloat16"), "dtype must be a floating-point torch.dtype"),
    (lambda: mech("full").state_bytes(10, 1, torch.int64), "dtype must be a floating-point torch.dtype"),
    (lambda: mech("tensor_cache").init_state(1, dtype="float32"), "dtype must be a floating-point torch.dtype"),
    (lambda: mech("full").init_state(1, dtype=torch.int32), "dtype must be a floating-point torch.dtype"),
    (lambda: mech("tensor_cache", decay_init="0.5"), "decay_init must be a number, got '0.5'"),
    (lambda: mech("power", switch_over=True, chunk_size=1), "switch_over must be a multiple"),
    (lambda: mech("power", use_kernel="yes"), "use_kernel must be None, True or False"),
    (lambda: mech("power", rotary=True, rope_base=-1.0), "rope_base must be a finite number > 1, got -1.0"),
    (lambda: mech("power", scale=0.0), "scale must be finite and positive, got 0.0"),
    (lambda: power_fn().init_power_state(-1, 2, 16, 16, True), "batch must be an int >= 1, got -1"),
    (lambda: power_fn().init_power_state(1, 2, 16.0, 16, True), "d must be an int >= 1, got 16.0"),
    (lambda: power_fn().power_state_bytes(-1, 1, 2, 16, 16, 2, True, 32, 64), "context_len must be an int >= 0"),
    (lambda: power_fn().power_state_bytes(10, 1, 2, 16, 16, 3, True, 32, 64), "deg"),
    (lambda: power_fn().power_retention(*qkv(torch.Generator(), n=6), rotary_base=-1.0), "rotary_base must be a finite"),
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


@pytest.mark.parametrize("name", ["full", "sliding_window", "power", "power4", "tensor_cache"])
@pytest.mark.parametrize("start", [-1, 2.5, True])
def test_prefill_static_refuses_a_start_that_is_not_a_position(name, start, gen):
    """A negative or fractional start crashed inside torch (a slice, index_copy_) or ran silently (power rounded 2.5
    down)."""
    m = mech(name)
    with pytest.raises(ValueError, match=f"start must be an int >= 0, got {start!r}"):
        m.prefill_static(*qkv(gen, n=3), m.init_static_state(1, 16), start)


@pytest.mark.parametrize("name", ["full", "sliding_window", "power", "power4", "tensor_cache"])
def test_a_batch_of_zero_gives_an_empty_output(name, gen):
    q, k, v = qkv(gen, batch=0, n=5)
    assert mech(name)(q, k, v).shape == (0, 4, 5, 16)    # power and tensor_cache crashed in a reshape


@pytest.mark.parametrize("name", ["full", "sliding_window", "power", "tensor_cache"])
def test_q_and_k_of_other_lengths_are_refused(name, gen):
    """Full attention, sliding window and Tensor Cache ran them silently (a step appended 2 keys for 1 query)."""
    m = mech(name)
    q, k, v = qkv(gen, n=2)
    with pytest.raises(ValueError, match="must hold the same tokens"):
        m(q[:, :, :1], k, v)
    with pytest.raises(ValueError, match="must hold the same tokens"):
        m.step(q[:, :, :1], k, v, m.init_state(1))


def power_step_case(gen, state_of, tokens_of, **schedule):
    """``power_retention_step`` on a state built by ``state_of`` (init_power_state's arguments and a token count)
    with tokens shaped by ``tokens_of``."""
    from longctx.mechanisms.power import init_power_state, power_retention_step

    def tokens(B=1, Hkv=2, d=16, e=16, n=1, dtype=torch.float32):
        q = torch.randn(B, 4, n, d, generator=gen, dtype=dtype)
        k, v = torch.randn(B, Hkv, n, d, generator=gen, dtype=dtype), torch.randn(B, Hkv, n, e, generator=gen, dtype=dtype)
        return q, k, v, -torch.rand(B, Hkv, n, generator=gen).to(dtype) * 0.1

    made, n_steps, made_schedule = state_of
    state = init_power_state(*made, gated=True, dtype=made[4] if len(made) > 4 else torch.float32)
    for _ in range(n_steps):
        *t, g = tokens(*made[:4], dtype=state.k.dtype)
        _, state = power_retention_step(*t, state, g, chunk_size=16, **made_schedule)
    *t, g = tokens(**tokens_of)
    return power_retention_step(*t, state, g, chunk_size=16, **schedule)


@pytest.mark.parametrize("state_of,tokens_of,schedule,match", [
    (((1, 2, 8, 8), 3, {}), {}, {}, r"the state's k is \(1, 2, 3, 8\), expected \(1, 2, 3, 16\)"),
    (((1, 1, 16, 16), 3, {}), {}, {}, r"the state's k is \(1, 1, 3, 16\), expected \(1, 2, 3, 16\)"),
    (((2, 2, 16, 16), 0, {}), {}, {}, r"the state's k is \(2, 2, 0, 16\), expected \(1, 2, 0, 16\)"),
    (((1, 2, 16, 16), 50, {"switch_over": 64}), {"n": 3}, {"switch_over": 32}, "unfolded tokens after 50"),
    (((1, 2, 16, 16), 70, {"switch_over": 64}), {}, {"switch_over": 64, "deg": 4}, r"the state's S is .* deg=4"),
    (((1, 2, 16, 16), 3, {"switch_over": 64}), {"dtype": torch.float64}, {"switch_over": 64}, "the state's k is torch.float32"),
])
def test_power_step_refuses_a_state_made_for_other_inputs(state_of, tokens_of, schedule, match, gen):
    """The function-level step (public: README) crashed inside torch.cat / baddbmm on these, or ran a state folded
    on another schedule."""
    with pytest.raises(ValueError, match=match):
        power_step_case(gen, state_of, tokens_of, **schedule)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_power_scale_must_be_finite_and_positive(scale, gen):
    """Scale 0 gave all-zero outputs and -1 the outputs of +1, as confident finite numbers; NaN and inf, NaN."""
    from longctx.mechanisms.power import init_power_state, power_retention, power_retention_step
    from longctx.mechanisms.power.naive import power_retention_naive

    q, k, v = qkv(gen, n=6)
    for call in (lambda: power_retention(q, k, v, scale=scale, chunk_size=4),
                 lambda: power_retention_naive(q, k, v, scale=scale),
                 lambda: power_retention_step(q, k, v, init_power_state(1, 2, 16, 16, False), scale=scale),
                 lambda: mech("power", scale=scale)):
        with pytest.raises(ValueError, match="scale must be finite and positive"):
            call()


@pytest.mark.parametrize("gate", [[[[-0.1] * 6]] * 2, torch.full((2, 1, 6), -1)], ids=["list", "int64"])
def test_power_gate_of_a_wrong_type_is_refused(gate, gen):
    from longctx.mechanisms.power import init_power_state, power_retention, power_retention_step

    q = torch.randn(2, 2, 6, 16, generator=gen)
    k, v = q[:, :1].clone(), q[:, 1:].clone()
    for call in (lambda: power_retention(q, k, v, gate, chunk_size=4),
                 lambda: power_retention_step(q, k, v, init_power_state(2, 1, 16, 16, True), gate)):
        with pytest.raises(TypeError, match="log_g must be a floating-point tensor"):
            call()


def test_decode_attention_refuses_a_length_past_the_buffer(gen):
    from longctx.decode_attention import decode_attention

    q, k, v = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"length must lie in \[0, 8\].*got 9"):
        decode_attention(q, k, v, torch.tensor([9]))


def tiny_gpt(**options):
    return GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, vocab_size=64, **options)).eval()


@pytest.mark.parametrize("options,match", [
    ({"heads": 0}, "heads must be an int >= 1, got 0"), ({"ffn_hidden": 2.5}, "ffn_hidden must be an int >= 1"),
    ({"block_size": 1.5}, "block_size must be an int >= 1"), ({"tau_init": float("nan")}, "tau_init must be a finite"),
])
def test_raytention_options_are_refused_not_replaced(options, match):
    """heads=0 was replaced by the default (``0 or n_head``), a fractional size crashed inside nn.Linear, NaN ran."""
    with pytest.raises(ValueError, match=match):
        tiny_gpt(mechanism="raytention", mechanism_options=options)


def test_gpt_refuses_a_state_of_another_model():
    """A state of another depth ran silently (zip left blocks out); a foreign layer state crashed in RayTention."""
    ids = torch.ones(1, 3, dtype=torch.long)
    two = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=64)).eval()
    one = tiny_gpt()
    for call in (lambda: two.step(ids, one.init_state(1)), lambda: one.step(ids, two.init_state(1)),
                 lambda: two.prefill_static(ids, one.init_static_state(1, 8)),
                 lambda: two.step_static(ids[:, :1], one.init_static_state(1, 8))):
        with pytest.raises(ValueError, match="the state holds .* layers, this model has n_layer="):
            call()
    with pytest.raises(TypeError, match="needs a TokenHistory"):
        tiny_gpt(mechanism="raytention").step(ids, one.init_state(1))


@pytest.mark.parametrize("call,match", [
    (lambda m: m([[1, 2, 3]]), "idx must be \\[batch, seq\\] integer token ids, got list"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)), "targets must be integer"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)), "targets must be integer"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), 64)), "targets must lie in .* from 64 to 64"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -2)), "targets must lie in .* from -2"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), positions=torch.arange(5)), "positions must be a tensor \\[seq\\]"),
    (lambda m: m.generate(torch.ones(1, 3, dtype=torch.long), 2, temperature="1"), "temperature must be a finite"),
    (lambda m: m.generate(torch.ones(1, 3, dtype=torch.long), 2, temperature=True), "temperature must be a finite"),
    (lambda m: m.init_state(1, dtype="float32"), "dtype must be a floating-point torch.dtype"),
])
def test_gpt_refuses_bad_arguments_by_name(call, match):
    """These crashed inside torch (cross_entropy, RoPE's broadcast, torch.empty) or ran (temperature=True)."""
    with pytest.raises(ValueError, match=match):
        call(tiny_gpt())


def test_gpt_targets_of_minus_one_are_ignored(gen):
    m = tiny_gpt()
    ids = torch.randint(0, 64, (2, 5), generator=gen)
    targets = ids.clone()
    targets[:, -2:] = -1
    _, loss = m(ids, targets)
    _, part = m(ids[:, :3], targets[:, :3])
    torch.testing.assert_close(loss, part)


@pytest.mark.parametrize("batch,n", [(1, 0), (0, 5)])
def test_power_functions_give_empty_outputs_for_empty_inputs(batch, n, gen):
    """No tokens or a batch of 0: the quadratic and chunked forms crashed in a reshape (-1 of 0 elements), the step
    and the static prefill in torch.cat of no pieces."""
    from longctx.mechanisms.power import init_power_state, power_retention, power_retention_chunk, power_retention_step
    from longctx.mechanisms.power.naive import power_retention_naive

    q, k, v = qkv(gen, batch=batch, n=n)
    g = -torch.rand(batch, 2, n, generator=gen)
    for out in (power_retention_naive(q, k, v, g), power_retention(q, k, v, g, chunk_size=4),
                power_retention_chunk(q, k, v, g, chunk_size=4)):
        assert out.shape == (batch, 4, n, 16)
    if batch:
        state = init_power_state(batch, 2, 16, 16, True)
        out, after = power_retention_step(q, k, v, state, g)
        assert out.shape == (batch, 4, 0, 16) and after is state
        for name in ("power", "power4"):
            assert mech(name).prefill_static(q, k, v, mech(name).init_static_state(1, 8), 0).shape == (1, 4, 0, 16)


def test_unknown_mechanism_options_are_named():
    with pytest.raises(ValueError, match=r"unknown options \['windw'\] for mechanism 'sliding_window'; known: .*'window'"):
        build_mechanism("sliding_window", 4, 2, 16, windw=8)
