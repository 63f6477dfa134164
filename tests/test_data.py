import pytest
import torch

from longctx.data import get_batch, load_corpus, load_text, recall_accuracy, recall_batch


def test_builtin_corpus_split_is_deterministic():
    tr1, va1 = load_corpus()
    tr2, va2 = load_corpus()
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2)
    assert tr1.dtype == torch.uint8 and len(tr1) > 4_000_000 and 0.04 < len(va1) / (len(tr1) + len(va1)) < 0.06
    assert bytes(tr1[:30].tolist()).startswith(b"Genesis 1:1 In the beginning")


def test_user_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld " * 50, encoding="utf-8")
    tr, va = load_corpus(f, val_fraction=0.1)
    assert bytes(torch.cat([tr, va]).tolist()).decode("utf-8") == "héllo wörld " * 50


@pytest.mark.parametrize("content,match", [(None, "not found"), (b"", "empty"), (b"\xff\xfe\xfa", "UTF-8")])
def test_bad_data_files_are_named(tmp_path, content, match):
    f = tmp_path / "d.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        load_text(f)


def test_get_batch_targets_are_shifted(gen):
    data = torch.arange(200, dtype=torch.uint8)
    x, y = get_batch(data, 5, 17, gen)
    assert x.shape == y.shape == (5, 17) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    with pytest.raises(ValueError, match="too short"):
        get_batch(data, 1, 200)


@pytest.mark.parametrize("n_pairs,seq_len,min_distance", [(1, 8, 0), (4, 40, 20), (8, 128, 64), (16, 200, 100)])
def test_recall_answers_are_the_paired_values(n_pairs, seq_len, min_distance, gen):
    x, y = recall_batch(3, seq_len, n_pairs, gen, min_distance)
    assert x.shape == y.shape == (3, seq_len)
    for b in range(3):
        pairs = {x[b, 2 * i].item(): x[b, 2 * i + 1].item() for i in range(n_pairs)}
        assert len(pairs) == n_pairs and all(k < 64 <= v < 128 for k, v in pairs.items())
        scored = (y[b] != -1).nonzero().flatten().tolist()
        assert len(scored) == n_pairs
        for t in scored:
            key = x[b, t].item()
            assert y[b, t].item() == pairs[key]
            first = (x[b, :t] == key).nonzero().min().item()
            assert t - first >= min_distance


def test_recall_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="too short"):
        recall_batch(1, 20, 8)
    with pytest.raises(ValueError, match="n_pairs"):
        recall_batch(1, 400, 65)


def test_recall_accuracy_counts_scored_positions_only():
    y = torch.tensor([[-1, 5, -1, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 5] = logits[0, 3, 2] = logits[0, 0, 1] = 1
    assert recall_accuracy(logits, y) == 0.5
