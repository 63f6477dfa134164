"""``longctx kv-eval`` (longctx.kv.needle / evaluate / run_eval / report) on a tiny random Llama with a byte-level
tokenizer built here (one token per byte, a chat template), so token positions are byte positions."""
import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import rel_err
from longctx.cli import main
from longctx.data import load_text
from longctx.kv import CompressedCache, calibrate
from longctx.kv.cache import PRUNE_SLACK
from longctx.kv.budgets import parse_budgets
from longctx.kv.evaluate import (METHODS, cache_extras, compressed_caches, continuation_nll, full_kv_bytes, kv_bytes,
                                 prefill)
from longctx.kv.needle import answer_correct, corpus_region, make_needle_sample, take_tokens
from longctx.kv.run_eval import run_kv_eval

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|im_start|>": 256, "<|im_end|>": 257}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT
    return tok


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=257, eos_token_id=257, bos_token_id=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def text():
    return load_text()


@pytest.fixture(scope="module")
def tiny(tok, text):
    """(model, stats): stats calibrated on the corpus's calibration region."""
    model = tiny_model()
    ids = take_tokens(tok, corpus_region(text, "calibration"), 0, 256)[None]
    return model, calibrate(model, ids, "tiny")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_needle_sits_at_the_asked_depth(tok, text, depth):
    lines = corpus_region(text, "needle")
    s = make_needle_sample(tok, lines, 1024, depth, random.Random(5))
    needle = f"The secret code of {s.key} is {s.answer}.\n"
    assert tok.decode(s.context_ids[0, s.needle_start:s.needle_start + s.needle_tokens]) == needle
    # the haystack span is the document inside the user turn: chat header before, nothing after
    first, end = s.haystack_span
    assert tok.decode(s.context_ids[0, :first]) == "<|im_start|>user\n" and end == s.context_ids.shape[1]
    # bytes of haystack before the needle / haystack bytes, reference computed on the decoded text
    document = tok.decode(s.context_ids[0, first:end])
    before, after = document.split(needle)
    # the same byte ratio both ways: measured exactly 0 (pytest.approx's default rel=1e-6)
    assert s.needle_depth == pytest.approx(len(before.encode()) / len((before + after).encode()))
    longest_verse = max(len(line.encode()) for line in (before + after).splitlines(keepends=True))
    assert abs(s.needle_depth - depth) * len((before + after).encode()) <= longest_verse
    assert set((before + after).splitlines(keepends=True)) <= set(lines)           # between whole verses
    assert 1024 - 2 * longest_verse <= s.length <= 1024
    question = tok.decode(s.question_ids[0])
    assert question.endswith(f"<|im_start|>assistant\nThe secret code of {s.key} is")
    assert f"What is the secret code of {s.key}" in question and s.answer not in question


def test_needles_differ_by_seed_and_too_short_length_fails(tok, text):
    lines = corpus_region(text, "needle")
    a = make_needle_sample(tok, lines, 512, 0.5, random.Random("a"))
    b = make_needle_sample(tok, lines, 512, 0.5, random.Random("b"))
    assert (a.answer, a.key) != (b.answer, b.key) or not torch.equal(a.context_ids, b.context_ids)
    with pytest.raises(ValueError, match="length=100 is too short"):
        make_needle_sample(tok, lines, 100, 0.5, random.Random(0))


def test_answer_checker():
    assert answer_correct(" 483920.", "483920")
    assert answer_correct("The code is 483920, I think", "483920")
    assert not answer_correct(" 4839201", "483920")
    assert not answer_correct("1483920", "483920")
    assert not answer_correct(" 48392", "483920")
    assert not answer_correct(" 483 920", "483920")


def test_corpus_regions_are_disjoint(text):
    regions = [corpus_region(text, r) for r in ("calibration", "needle", "perplexity")]
    assert sum(map(len, regions)) == len(text.splitlines())
    assert regions[0][-1] != regions[1][0] and regions[1][-1] != regions[2][0]


@pytest.mark.parametrize("method", METHODS[1:])
def test_replay_equals_a_real_prefill(tiny, method):
    """The caches built from one recorded prefill hold exactly what a real prefill through each cache leaves."""
    model, stats = tiny
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(3))
    pre = prefill(model, ids, capture_queries=True)
    budgets = [20, 50]
    replayed = compressed_caches(pre, model, method, budgets, stats, slack=16)
    for b in budgets:
        real = CompressedCache(method, budget=b, slack=16, **cache_extras(method, model, stats))
        with torch.no_grad():
            want = model(ids, past_key_values=real, use_cache=True).logits[:, -1]
        # fixed inputs, float32 logits from two forwards: measured max |diff| 8.9e-8 (was atol=1e-5 with rtol=1e-5)
        assert torch.allclose(pre.next_logits, want, rtol=0, atol=1e-6)
        for got, ref in zip(replayed[b].layers, real.layers):
            assert got.n_pruned == ref.n_pruned == 1
            assert torch.equal(got.positions, ref.positions)
            # measured exactly 0 (the same float32 projections); 1e-6 allows a differently blocked matmul
            assert torch.allclose(got.keys, ref.keys, atol=1e-6) and torch.allclose(got.values, ref.values, atol=1e-6)
        real.detach()
        replayed[b].detach()


def test_perplexity_with_budget_above_length_equals_full_cache(tiny):
    model, stats = tiny
    ids = torch.randint(0, 256, (1, 140), generator=torch.Generator().manual_seed(4))
    context, continuation = ids[:, :100], ids[:, 100:]
    with torch.no_grad():
        logits = model(ids).logits[0, 99:-1]
    reference = torch.nn.functional.cross_entropy(logits, ids[0, 100:], reduction="sum").item()
    pre = prefill(model, context, capture_queries=True)
    full = continuation_nll(model, pre.full_cache(), pre.next_logits, continuation, 100, chunk=8)
    # fixed inputs; float32 logits, chunked decode against one forward: measured rel <= 6.4e-8 (chunk 8 and 1)
    assert full["n_tokens"] == 40 and full["nll_sum"] == pytest.approx(reference, rel=1e-6)
    assert continuation_nll(model, pre.full_cache(), pre.next_logits, continuation, 100, chunk=1)["nll_sum"] == \
        pytest.approx(reference, rel=1e-6)
    for method in METHODS[1:]:
        cache = compressed_caches(pre, model, method, [140], stats)[140]
        got = continuation_nll(model, cache, pre.next_logits, continuation, 100, chunk=8)
        cache.detach()
        # nothing pruned, the same keys: measured exactly 0; 1e-6 is float32 rounding of a 40-token sum
        assert got["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-6), method
        assert cache.layers[0].n_pruned == 0


def test_kv_bytes_of_compressed_and_full_cache(tiny):
    model, stats = tiny
    config = model.config
    ids = torch.randint(0, 256, (1, 500), generator=torch.Generator().manual_seed(5))
    context, continuation = ids[:, :300], ids[:, 300:]
    pre = prefill(model, context)
    budget = 40
    per_token = config.num_hidden_layers * 2 * 2 * 16 * 4          # layers · (K, V) · Hkv · head_dim · float32
    cache = compressed_caches(pre, model, "triattention", [budget], stats)[budget]
    continuation_nll(model, cache, pre.next_logits, continuation, 300, chunk=16)
    stored = cache.layers[0].keys.shape[-2]
    assert cache.layers[0].n_pruned >= 2                              # after the prefill and while continuing
    assert budget <= stored < budget + PRUNE_SLACK
    assert kv_bytes(cache) == stored * per_token <= (budget + PRUNE_SLACK) * per_token
    full = pre.full_cache()
    continuation_nll(model, full, pre.next_logits, continuation, 300, chunk=16)
    assert kv_bytes(full) == full_kv_bytes(config, 499) == 499 * per_token  # the last token is never fed


def test_parse_budgets():
    assert parse_budgets("0.1, 0.25,1.0") == [0.1, 0.25, 1.0]
    assert parse_budgets("512,1024") == [512, 1024]
    for bad, msg in [("0", "must be > 0"), ("-0.5", "must be > 0"), ("1.5", "fraction 1.5 is > 1"),
                     ("abc", "not a number"), ("", "no budget"), ("0.5,0.50", "duplicate")]:
        with pytest.raises(ValueError, match=f"--budgets: .*{msg}|--budgets: {msg}"):
            parse_budgets(bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model(seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


ARGS = ["--methods", "full,triattention,h2o", "--budgets", "0.25,64", "--lengths", "512",
        "--depths", "0.5", "--ppl-samples", "1", "--ppl-tokens", "48", "--calib-tokens", "256", "--answer-tokens", "4",
        "--no-progress"]


def test_cli_run_writes_outputs_and_resume_skips_finished_cells(model_dir, tmp_path, capsys):
    out = tmp_path / "kv"
    assert main(["kv-eval", "--model", str(model_dir), "--out", str(out), "--trials", "1", *ARGS]) == 0
    first = json.loads((out / "results.json").read_text())
    assert sorted(first["cells"]) == ["needle/L=512/depth=0.5/trial=0", "ppl/L=512/sample=0"]
    needle = first["cells"]["needle/L=512/depth=0.5/trial=0"]
    assert sorted(needle["results"]) == sorted(["full", "triattention@25%", "triattention@64", "h2o@25%", "h2o@64"])
    assert needle["results"]["h2o@25%"]["budget_tokens"] == 128
    assert needle["prompt_tokens"] <= 512 and 0.3 < needle["needle_depth"] < 0.7
    for r in needle["results"].values():
        assert answer_correct(r["output"], needle["answer"]) == r["correct"]
    ppl = first["cells"]["ppl/L=512/sample=0"]["results"]
    assert ppl["triattention@64"]["stored_tokens"] < 64 + PRUNE_SLACK and ppl["full"]["stored_tokens"] == 511
    assert ppl["triattention@64"]["kv_bytes"] < ppl["full"]["kv_bytes"]
    for name in ("report.md", "needle_heatmap.png", "accuracy_vs_budget.png", "triattention_stats.safetensors"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| triattention | 25% | 128 |" in report and "kvpress" in report
    assert "needle acc" in capsys.readouterr().out

    # rerun with one more trial: the finished cells are kept as they were (their timings too), one is added
    assert main(["kv-eval", "--model", str(model_dir), "--out", str(out), "--trials", "2", *ARGS]) == 0
    second = json.loads((out / "results.json").read_text())
    assert sorted(second["cells"]) == sorted([*first["cells"], "needle/L=512/depth=0.5/trial=1"])
    for key, cell in first["cells"].items():
        assert second["cells"][key] == cell
    # other settings (budgets): refused, the earlier results kept; a new --out starts afresh
    args = [a if a != "0.25,64" else "0.5" for a in ARGS]
    assert main(["kv-eval", "--model", str(model_dir), "--out", str(out), "--trials", "0", *args]) == 2
    assert "holds a run with other settings (budgets" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == second
    assert main(["kv-eval", "--model", str(model_dir), "--out", str(tmp_path / "kv2"), "--trials", "0", *args]) == 0
    third = json.loads((tmp_path / "kv2" / "results.json").read_text())
    assert sorted(third["cells"]) == ["ppl/L=512/sample=0"]
    assert sorted(third["cells"]["ppl/L=512/sample=0"]["results"]) == ["full", "h2o@50%", "triattention@50%"]


@pytest.mark.parametrize("args, message", [
    (["--budgets", "0"], "--budgets: 0 must be > 0"),
    (["--budgets", "1.5"], "--budgets: fraction 1.5 is > 1"),
    (["--lengths", "4096"], "--lengths: 4096 exceeds the model's max_position_embeddings=2048"),
    (["--lengths", "abc"], "--lengths: expected comma-separated integers"),
    (["--depths", "1.5"], "--depths: 1.5 is not a fraction"),
    (["--methods", "full,h3o"], "--methods: unknown method 'h3o'"),
    (["--stats", "missing.safetensors"], "--stats file not found: missing.safetensors"),
])
def test_cli_argument_errors(model_dir, tmp_path, capsys, args, message):
    # a length the model takes (the default 4096 is past its 2048 positions, refused before the others: #19)
    assert main(["kv-eval", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--lengths", "1024", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_missing_model_folder(tmp_path, capsys):
    assert main(["kv-eval", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "--model must be a local transformers model folder" in capsys.readouterr().err


def test_run_rejects_mismatched_stats(tiny, tok, tmp_path):
    from longctx.kv import save_stats

    _, stats = tiny
    other = LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    path = save_stats(stats, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="stats do not match the model"):
        run_kv_eval(model=other, tokenizer=tok, stats_path=path, lengths=[1024], out_dir=tmp_path / "o",
                    progress=False)


def test_large_budget_keeps_needle_answer_identical(tiny, tok, text):
    """End to end on the needle path: with a budget above the prompt, every method decodes the same tokens as
    the full cache (and a tight budget really prunes)."""
    from longctx.kv.evaluate import greedy_answer

    model, stats = tiny
    s = make_needle_sample(tok, corpus_region(text, "needle"), 400, 0.5, random.Random(2))
    pre = prefill(model, s.context_ids, capture_queries=True)
    want = greedy_answer(model, pre.full_cache(), s.question_ids, pre.length, 6)["tokens"]
    for method in METHODS[1:]:
        caches = compressed_caches(pre, model, method, [512, 32], stats)
        assert greedy_answer(model, caches[512], s.question_ids, pre.length, 6)["tokens"] == want, method
        greedy_answer(model, caches[32], s.question_ids, pre.length, 6)
        assert caches[32].layers[0].keys.shape[-2] < 32 + PRUNE_SLACK and caches[32].layers[0].n_pruned >= 1
        for c in caches.values():
            c.detach()
    with torch.no_grad():
        # fixed inputs; float32 prefill (query capture on) against a plain forward: measured 1.7e-7
        assert rel_err(pre.next_logits, model(s.context_ids).logits[:, -1]) < 1e-5


def test_question_aware_protocol_moves_the_question_into_the_prefill(tiny, tok, text):
    """Both protocols feed the same tokens, so the full cache answers identically; only where the compression
    happens differs (question-aware: after all of the question but its last token)."""
    from longctx.kv.run_eval import needle_cell

    model, stats = tiny
    lines = corpus_region(text, "needle")
    cells = {p: needle_cell(model, tok, lines, 400, 0.5, 0, 0, ["full", "snapkv"], [0.25], stats, 5, False, p)
             for p in ("question-agnostic", "question-aware")}
    agnostic, aware = cells["question-agnostic"]["results"], cells["question-aware"]["results"]
    assert agnostic["full"]["output"] == aware["full"]["output"]
    assert agnostic["full"]["stored_tokens"] == aware["full"]["stored_tokens"]
    sample = make_needle_sample(tok, lines, 400, 0.5, random.Random("0/needle/400/0.5/0"))
    # question-aware: prefill of context + question[:-1] pruned to 100, then 1 + 4 tokens fed; agnostic: the
    # whole question and 4 tokens are fed after the prune (fewer than the 128 slack: no second prune)
    assert aware["snapkv@25%"]["stored_tokens"] == 100 + 1 + 4
    assert agnostic["snapkv@25%"]["stored_tokens"] == 100 + sample.question_ids.shape[1] + 4
