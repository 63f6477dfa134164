import json

import pytest
import torch

from longctx import cli
from longctx.atomic import atomic_write_text
from longctx.bench import run as bench_run
from longctx.bench.presets import settings_for
from longctx.bench.train import bits_per_byte, eval_loss, train
from longctx.data import get_batch, load_corpus

TINY = dict(n_layer=1, n_embd=16, n_head=2, n_kv_head=1, block_size=32, batch_size=4, steps=3, recall_steps=3,
            eval_batches=1, recall_pairs=2, recall_min_distance=8, measure_context=40, decode_steps=2,
            contexts=[64, 1024])


@pytest.fixture
def text(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("In the beginning was the word, and the word was long. " * 40, encoding="utf-8")
    return f


def test_bench_writes_every_result_and_resumes(tmp_path, text, monkeypatch):
    out = tmp_path / "out"
    s = settings_for("cpu", **TINY)
    res = bench_run.run_bench(s, ["full", "sliding_window"], "cpu", 0, out, str(text), progress=False)
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "loss.png", "memory.png"}
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["mechanisms"]) == ["full", "sliding_window"]
    for name, r in saved["mechanisms"].items():
        d = r["decode"]
        assert d["state_bytes_measured"] == d["state_bytes_formula"] > 0
        assert 0 <= r["recall_acc"] <= 1 and r["val_bpb"] > 0 and r["params"] > 0
        assert set(r["val_bpb_longer"]) == {"2x", "4x"} and r["val_bpb_longer"]["2x"] > 0
        assert r["val_bpb_longer"]["4x"] is None       # 128 tokens: longer than this validation text
    full, swa = saved["mechanisms"]["full"]["state_bytes"], saved["mechanisms"]["sliding_window"]["state_bytes"]
    assert full["1024"] == 16 * full["64"] and swa["1024"] == swa["64"]
    assert "| full |" in (out / "report.md").read_text()
    assert res["mechanisms"].keys() == saved["mechanisms"].keys()

    # A rerun with the same settings trains nothing again.
    def boom(*a, **k):
        raise AssertionError("finished mechanism was recomputed")
    monkeypatch.setattr(bench_run, "bench_mechanism", boom)
    again = bench_run.run_bench(s, ["full", "sliding_window"], "cpu", 0, out, str(text), progress=False)
    assert again["mechanisms"] == saved["mechanisms"]


def test_length_generalisation_is_the_loss_at_longer_contexts(tmp_path, text):
    """The 2x number is eval_loss at twice the context (same tokens per batch); a context longer than the
    validation text is recorded as missing, not an error."""
    s = settings_for("cpu", **{**TINY, "eval_context_multiples": [2, 1000]})
    train_data, val_data = load_corpus(str(text))
    r = bench_run.bench_mechanism("full", s, train_data, val_data, torch.device("cpu"), 0, progress=False)
    assert r["val_bpb_longer"]["1000x"] is None
    # retrain the same model (same seed) and evaluate it directly at 64 tokens
    model = bench_run._model(s, "full", torch.device("cpu"), 0)
    train(model, lambda g: get_batch(train_data, s.batch_size, s.block_size, g), s.steps, s.lr, 0, progress=False)
    direct = bits_per_byte(eval_loss(model, val_data, 2 * s.block_size, s.eval_batches, s.batch_size // 2, 1))
    assert abs(r["val_bpb_longer"]["2x"] - direct) < 1e-5


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "r.json"
    atomic_write_text(f, "old")

    class Interrupted(BaseException):
        pass

    def broken(tmp):
        open(tmp, "w").write("half")
        raise Interrupted

    from longctx.atomic import atomic_write
    with pytest.raises(Interrupted):
        atomic_write(f, broken)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_makes_an_ordinary_file(tmp_path):
    import os
    mask = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o644      # not mkstemp's private 0600


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert cli.main(["bench", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert cli.main(["bench", "--mechanisms", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown mechanism 'nope'" in capsys.readouterr().err
