"""The bench report says what it shows: one x value drawn as bars, ring visible beside full attention, a note for
every column the tables have and none for one they lack, and ``--help`` giving each preset's defaults."""
import argparse
import re
from dataclasses import asdict

import pytest

from longctx import cli
from longctx.bench import report
from longctx.bench.presets import OPTIONS, PRESETS, settings_for

MECHS = ("full", "sliding_window", "ring", "raytention", "power")
GROWS = ("full", "ring", "raytention")   # state grows with the context


def make_results(preset: str, *, seeds=None, missing_longer=False, skipped=None, unreached=None, **over) -> dict:
    """A ``results.json``-shaped dict with made-up numbers: ring's quality and recall are full's (as on one device),
    its decode speed is timed apart (differs). ``skipped``/``unreached``: (mechanism, context) with a prefill
    projected too long / no row yet."""
    s = asdict(settings_for(preset, **over))
    if seeds is not None:
        s["seeds"] = seeds
    cuda = preset == "gpu"
    out = {"settings": s, "mechanisms": {},
           "meta": {"command": "longctx bench", "device": "cuda" if cuda else "cpu", "device_name": "test",
                    "torch": "2", "preset": preset, "seconds": 60.0, "data": "test"}}
    for i, name in enumerate(m for m in MECHS if m not in s["exclude"]):
        k = 0 if name == "ring" else i
        runs = {str(seed): {
            "text": {"val_bpb": 3.3 + 0.1 * k + 0.01 * seed, "train_tokens_per_s": 1e5 - 1e4 * i,
                     "val_bpb_longer": {f"{m}x": None if missing_longer else 3.4 + 0.1 * k
                                        for m in s["eval_context_multiples"]},
                     "curve": [[step, 5.0 - 0.1 * step - 0.2 * k] for step in range(0, 20, 2)]},
            "recall": {"by_pairs": {str(n): 0.8 / (k + 1) / n for n in s["recall_pairs"]},
                       "needle": {str(d): 0.9 / (k + 1) - d / 1e4 for d in s["needle_distances"]}}}
            for seed in s["seeds"]}
        rows = []
        for c in s["measure_contexts"]:
            if (name, c) == unreached:
                continue
            if (name, c) == skipped:
                rows.append({"context": c, "skipped": "prefill projected at 999 s > 120 s"})
                continue
            held = 512 * c if name in GROWS else 32768
            row = {"context": c, "state_bytes_measured": held, "decode_tokens_per_s": 1000.0 - 50 * i - c / 1e4,
                   "decode_path": "graph" if cuda and name != "raytention" else "static"}
            if cuda:
                row["peak_allocated_bytes_decoding"] = held + 10 ** 7
            rows.append(row)
        out["mechanisms"][name] = {"params": 100_000 + i, "runs": runs, "memory": {"rows": rows},
                                   "state_bytes": {str(c): 512 * c if name in GROWS else 32768
                                                   for c in s["contexts"]}}
    return out


CPU_LIKE = {"preset": "cpu"}                                      # one pair count, one measured context, one seed
GPU_LIKE = {"preset": "gpu", "measure_contexts": [16384, 65536, 131072], "exclude": []}   # several, two seeds


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """``draw(results)`` -> {file name: matplotlib figure}, the figures as they are about to be saved (not rendered)."""
    import matplotlib.pyplot as plt
    drawn = {}

    def keep(fig, path):
        drawn[path.name] = fig
        plt.close(fig)

    monkeypatch.setattr(report, "_save", keep)

    def draw(results):
        drawn.clear()
        report.write_report(results, tmp_path)
        return dict(drawn)
    return draw


def lines(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def bar_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


# --- the plot kind ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xs, kind", [([], "empty"), ([4096], "bars"), ([1, 1, 1], "bars"), ([2, 8, 32], "lines")])
def test_plot_kind_is_bars_for_one_x_value_and_lines_for_several(xs, kind):
    assert report.plot_kind(xs) == kind


def test_both_presets_write_every_file(tmp_path):
    for name, kw in (("cpu", CPU_LIKE), ("gpu", GPU_LIKE)):
        out = tmp_path / name
        out.mkdir()
        report.write_report(make_results(**kw), out)
        for png in ("loss.png", "memory.png", "recall.png", "speed.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (name, png)
        assert "| full |" in (out / "report.md").read_text()


def test_one_x_value_is_drawn_as_bars_per_mechanism(figures):
    figs = figures(make_results(**CPU_LIKE))
    pairs, needle = figs["recall.png"].axes
    assert len(pairs.patches) == len(MECHS) and not lines(pairs)            # one pair count: a bar per mechanism
    assert bar_labels(pairs)[0] == "full" and "1 key-value pair" in pairs.get_title()
    assert needle.get_xscale() == "log" and set(lines(needle)) >= {"full", "power"}   # three distances: lines
    speed = figs["speed.png"].axes[0]
    assert len(speed.patches) == len(MECHS) and speed.get_yscale() == "linear" and "4K" in speed.get_title()
    # full's tok/s: measured exactly equal (pytest.approx's default rel=1e-6 covers float rounding)
    assert speed.containers[0].datavalues[0] == pytest.approx(1000 - 0.4096)
    assert speed.texts[0].get_text() == "1,000"                                                 # written on it
    memory = figs["memory.png"].axes[0]                                      # the formula spans four contexts
    assert memory.get_xscale() == "log" and "full state (formula)" in lines(memory)


def test_several_x_values_are_drawn_as_lines_on_labelled_ticks(figures):
    figs = figures(make_results(**GPU_LIKE))
    pairs = figs["recall.png"].axes[0]
    assert not pairs.patches and pairs.get_xscale() == "log"
    assert [t.get_text() for t in pairs.get_xticklabels()] == ["2", "8", "32"]
    speed = figs["speed.png"].axes[0]
    assert not speed.patches and list(lines(speed)["full"].get_xdata()) == [16384, 65536, 131072]
    assert [t.get_text() for t in speed.get_xticklabels()] == ["16K", "64K", "128K"]
    assert "full peak while decoding" in lines(figs["memory.png"].axes[0])


def test_one_context_in_all_draws_the_memory_as_bars_and_nothing_as_a_note(figures):
    figs = figures(make_results("cpu", contexts=[4096]))
    assert len(figs["memory.png"].axes[0].patches) == len(MECHS)
    results = make_results("cpu")
    for r in results["mechanisms"].values():
        r["memory"]["rows"] = []
    assert figures(results)["speed.png"].axes[0].texts[0].get_text() == "nothing measured"


# --- ring beside full -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [CPU_LIKE, GPU_LIKE], ids=["cpu", "gpu"])
def test_ring_is_drawn_dashed_over_full_and_labelled_where_they_coincide(figures, kw):
    figs = figures(make_results(**kw))
    coincide = "ring (coincides with full)"
    panels = [figs["loss.png"].axes[0], figs["recall.png"].axes[1]] + figs["recall.png"].axes[:1] * (kw is GPU_LIKE)
    for ax in panels:
        ring, full = lines(ax)[coincide], lines(ax)["full"]
        assert ring.get_linestyle() == "--" and full.get_linestyle() == "-" and ring.get_zorder() > full.get_zorder()
        assert list(ring.get_ydata()) == list(full.get_ydata())
    memory = lines(figs["memory.png"].axes[0])
    assert memory["ring state (formula) (coincides with full)"].get_linestyle() == "--"
    speed = figs["speed.png"].axes[0]                                   # timed apart: no "coincides"
    if kw is GPU_LIKE:
        assert lines(speed)["ring"].get_linestyle() == "--" and lines(speed)["ring"].get_marker() == "o"
    else:
        ring_bar = speed.patches[bar_labels(speed).index("ring")]
        assert ring_bar.get_hatch() == "//" and speed.patches[0].get_hatch() is None
        pairs = figs["recall.png"].axes[0]
        assert "ring\n(coincides with full)" in bar_labels(pairs)


def test_the_report_text_says_ring_coincides_with_full():
    md = report.ring_note(make_results(**CPU_LIKE))
    assert "exactly full attention" in md and "coincides with full" in md and "dashed" in md
    assert "left out" in report.ring_note(make_results("gpu"))
    assert report.ring_note(make_results("cpu", exclude=["ring"])).startswith("*ring* is left out")
    ring_line = next(x for x in report.findings(make_results(**CPU_LIKE)) if x.startswith("**ring**"))
    assert "gap +0.000" in ring_line and "same numbers are expected" in ring_line


# --- notes against the tables -----------------------------------------------------------------------------------

def terms(notes: str) -> set[str]:
    return set(re.findall(r"\*([^*]+)\*", notes))


def header(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def explains(term: str, column: str) -> bool:
    """``*bpb @m× ctx*`` explains ``bpb @2× ctx``, ``*state*`` explains ``state @1K``."""
    pattern = (re.escape(term).replace("@m×", r"@\d+×").replace(r"\ n\ pairs", r"\ \d+\ pairs?")
               .replace("@d", r"@\d+"))
    return re.fullmatch(pattern + r"(?: @\S+)?", column) is not None


CASES = {"cpu": CPU_LIKE, "gpu": {"preset": "gpu"}, "gpu with ring": GPU_LIKE,
         "two seeds": {"preset": "cpu", "seeds": [0, 1]},
         "short validation": {"preset": "cpu", "missing_longer": True},
         "bare": {"preset": "cpu", "eval_context_multiples": [], "needle_distances": [], "contexts": []},
         "unmeasured": {"preset": "gpu", "skipped": ("full", 1 << 20), "unreached": ("power", 1 << 20)}}


@pytest.mark.parametrize("case", CASES)
def test_every_table_note_names_a_column_the_table_has_and_every_column_has_one(case):
    results = make_results(**CASES[case])
    t, notes = report.table(results), report.table_notes(results)
    columns = header(t)[2:]                                   # mechanism, params: self-explaining
    for term in terms(notes) - {"—"}:
        assert any(explains(term, c) for c in columns), (term, columns)
    for c in columns:
        assert any(explains(term, c) for term in terms(notes)), (c, notes)
    assert ("—" in terms(notes)) == ("| — |" in t) and ("±" in notes) == ("±" in t)

    mt, mnotes = report.memory_table(results), report.memory_notes(results)
    parts = {p.strip() for c in header(mt)[1:] for p in c.split(":", 1)[1].split(" / ")}
    marks = {m for m in ("not measured", "—") if f"| {m} |" in mt}
    assert terms(mnotes) == parts | marks, (terms(mnotes), parts, marks)
    assert ("peak" in parts) == results["meta"]["device"].startswith("cuda")


def test_the_decoding_notes_name_the_paths_that_ran():
    assert "CUDA graph" not in report.memory_notes(make_results("cpu"))
    assert "each step replayed from a CUDA graph (raytention: static eager steps)" in report.memory_notes(
        make_results("gpu"))
    assert "RayTention" not in report.memory_notes(make_results("cpu", exclude=["raytention"]))


# --- --help ---------------------------------------------------------------------------------------------------

def bench_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_bench_help_gives_every_preset_default():
    helps = {a.dest: a.help for a in bench_parser()._actions}
    for field in OPTIONS:
        values = [getattr(PRESETS[p], field) for p in PRESETS]
        lists = isinstance(values[0], list)
        shown = [",".join(map(str, v)) if lists else str(v) for v in values]
        expected = "default: " + ("; " if lists else ", ").join(f"{p} {v}" for p, v in zip(PRESETS, shown))
        assert expected in helps[field], (field, helps[field])
    assert "(default: cpu 120, gpu 1000)" in helps["steps"]
    text = " ".join(bench_parser().format_help().split())
    assert "--n-kv-head N_KV_HEAD key/value heads" in text and "seed (default: cpu 0; gpu 0,1)" in text
    assert all(a.help for a in bench_parser()._actions), "an option without help text"


def test_decoding_note_says_which_path_the_recorded_rows_took():
    """Rows recorded before static decoding (no ``decode_path``) are described as eager steps, newer ones as the
    fast path they took."""
    import json
    from pathlib import Path

    from longctx.bench.report import memory_notes
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    old = memory_notes(json.loads((results / "bench_gpu" / "results.json").read_text()))
    new = memory_notes(json.loads((results / "bench_cpu" / "results.json").read_text()))
    assert "eager step form" in old and "fast path" not in old
    assert "fast path: static eager steps" in new and "eager step form" not in new
