"""``longctx throughput`` on the CPU: rows for every mechanism x context x batch and path, a resumed run that
measures nothing again, bad settings refused before any work, and the decode loop's capacity check."""
import json

import pytest
import torch

from longctx.bench import throughput as tp
from longctx.bench.throughput_presets import settings_for
from longctx.cli import main
from longctx.decoding import greedy_decoder, warm_steps
from longctx.model import GPT, GPTConfig

TINY = dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, contexts=[40, 70], batches=[1, 3], steps=3,
            prefill_chunk=16, mechanism_options={"power": {"chunk_size": 8, "switch_over": 16}})


def test_rows_resume_and_plot(tmp_path, monkeypatch):
    s = settings_for("cpu", mechanisms=["full", "power", "raytention"], **TINY)
    res = tp.run_throughput(s, "cpu", tmp_path, progress=False)
    rows = res["rows"]
    assert [(r["mechanism"], r["context"], r["batch"]) for r in rows] == [
        (m, c, b) for m in ("full", "power", "raytention") for c in (40, 70) for b in (1, 3)]
    for r in rows:
        weights = r["weights_bytes"]
        assert r["prefill_seconds"] > 0 and r["state_bytes"] > 0 and weights > 70_000
        # the same float64 formulas recomputed: measured <= 1.9e-16 relative (pytest.approx's default rel=1e-6)
        assert r["bound_ms"] == pytest.approx(1000 * (weights + r["state_bytes"]) / res["copy_bandwidth_bytes_per_s"])
        for path in ("eager", "static"):
            x = r[path]
            assert x["tokens_per_s"] == pytest.approx(1000 * r["batch"] / x["ms_per_step"])
            assert x["bound_ratio"] == pytest.approx(x["ms_per_step"] / r["bound_ms"])
    full = {(r["context"], r["batch"]): r["state_bytes"] for r in rows if r["mechanism"] == "full"}
    power = {(r["context"], r["batch"]): r["state_bytes"] for r in rows if r["mechanism"] == "power"}
    assert full[(70, 3)] == 3 * full[(70, 1)] and full[(70, 1)] * 40 == full[(40, 1)] * 70      # grows with context
    assert power[(70, 1)] < 1.1 * power[(40, 1)]                     # flat, up to a few unfolded tokens
    assert (tmp_path / "throughput.png").stat().st_size > 0
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["contexts"] == [40, 70]

    def boom(*a, **k):
        raise AssertionError("a finished row was measured again")
    monkeypatch.setattr(tp, "measure_row", boom)
    assert tp.run_throughput(s, "cpu", tmp_path, progress=False)["rows"] == rows
    with pytest.raises(ValueError, match="other settings"):
        tp.run_throughput(settings_for("cpu", mechanisms=["full"], **TINY), "cpu", tmp_path, progress=False)


def test_history_limit_skips_and_says_why(tmp_path):
    s = settings_for("cpu", mechanisms=["raytention"], history_limit={"raytention": 100}, **TINY)
    rows = tp.run_throughput(s, "cpu", tmp_path, progress=False)["rows"]
    assert [("skipped" in r) for r in rows] == [False, True, False, True]     # 3 x 40 and 3 x 70 exceed 100
    assert "whole history" in rows[1]["skipped"]


@pytest.mark.parametrize("args,match", [
    (["--batches", "0"], "batches"), (["--batches", "1,x"], "--batches"), (["--contexts", "-5"], "contexts"),
    (["--steps", "0"], "steps"), (["--paths", "eager,fast"], "paths"), (["--mechanisms", "nope"], "unknown"),
    (["--paths", "graph"], "CUDA"), (["--batches", "max"], "GPU")])
def test_bad_settings_are_refused_before_work(args, match, tmp_path, capsys):
    assert main(["throughput", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu", *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o" / "throughput.json").exists()


def test_cli_prints_the_table(tmp_path, capsys):
    assert main(["throughput", "--out", str(tmp_path), "--no-progress", "--device", "cpu", "--mechanisms",
                 "sliding_window", "--contexts", "20", "--batches", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| sliding_window | 20 | 2 |" in out and "tok/s" in out


def test_greedy_decoder_refuses_to_pass_the_capacity():
    m = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, mechanism="power",
                      mechanism_options={"chunk_size": 4, "switch_over": 8})).eval()
    st = m.init_static_state(2, 30)
    m.prefill_static(torch.randint(0, 256, (2, 10)), st)
    run = greedy_decoder(m, st, torch.zeros(2, 1, dtype=torch.long), graphs=False)
    run(15)
    assert st.seen == 25 and int(st.pos) == 25
    with pytest.raises(ValueError, match="capacity 30"):
        run(6)
    assert st.seen == 25
    assert warm_steps(m, 10) == 6          # positions 10..15: the fold variant (11, 15) and the plain one twice each


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"rows": 3}'])
def test_a_damaged_results_file_is_refused_by_name(content, tmp_path, capsys):
    (tmp_path / "throughput.json").write_text(content)
    assert main(["throughput", "--out", str(tmp_path), "--no-progress", "--device", "cpu", "--contexts", "20",
                 "--batches", "1", "--steps", "1", "--mechanisms", "full"]) == 2
    err = capsys.readouterr().err
    assert "throughput.json is not a `longctx throughput` result" in err and "choose another --out" in err
    assert (tmp_path / "throughput.json").read_text() == content


def test_fill_static_prefills_then_jumps_with_random_content():
    """A synthetic fill: ``real`` tokens through the prefill, then the KV slots up to the context get random
    content and both counters move to the context (the next step attends over all of them)."""
    from longctx.bench.measure import fill_static
    m = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, mechanism="full")).eval()
    st = m.init_static_state(2, 64)
    seconds = fill_static(m, st, 50, 12, 5, torch.Generator().manual_seed(0))
    assert seconds > 0 and st.seen == 50 and int(st.pos) == 50
    k = st.layers[0].k
    assert (k[:, :, 12:50] != 0).all() and (k[:, :, 50:] == 0).all()
    logits = m.step_static(torch.zeros(2, 1, dtype=torch.long), st)
    assert torch.isfinite(logits).all() and st.seen == 51
