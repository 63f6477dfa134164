"""The bench's outputs: the printed tables, ``report.md`` and the PNG plots.

Quality numbers are the mean over the seeds, written ``mean ± h`` with ``h`` half the range across seeds
(for two seeds: half their difference) when more than one seed ran.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write, atomic_write_text

#: Published claims the report holds the measurements against (who claims it, what).
CLAIMS = {
    "raytention": "its authors (NohWai-Software/RayTention) report that it matches or beats a standard "
                  "transformer's cross-entropy at the same number of steps",
}
FLAT_STATE = ("sliding_window", "tensor_cache", "power", "power4")   # state size claimed independent of context


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def per_token(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def context_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def seed_values(r: dict, unit: str, *keys: str) -> list:
    """One number per finished seed: ``runs[seed][unit][keys...]`` (None entries dropped)."""
    out = []
    for run in r["runs"].values():
        x = run.get(unit)
        for k in keys:
            x = None if x is None else x.get(k)
        if x is not None:
            out.append(x)
    return out


def mean_spread(xs: list) -> tuple[float, float] | None:
    return None if not xs else (sum(xs) / len(xs), (max(xs) - min(xs)) / 2)


def fmt(xs: list, digits: int = 3) -> str:
    ms = mean_spread(xs)
    if ms is None:
        return "—"
    return f"{ms[0]:.{digits}f}" + (f" ± {ms[1]:.{digits}f}" if len(xs) > 1 else "")


def _row_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table(results: dict) -> str:
    """Quality, recall, training speed and the state formula of every mechanism with a finished text model."""
    s = results["settings"]
    mults, pairs, dists, ctxs = (s["eval_context_multiples"], s["recall_pairs"], s["needle_distances"],
                                 s["contexts"])
    head = (["mechanism", "params", "val bpb"] + [f"bpb @{m}× ctx" for m in mults]
            + [f"recall {n} pair{'s' * (n > 1)}" for n in pairs] + [f"needle @{d}" for d in dists]
            + ["train tok/s"] + [f"state @{context_label(c)}" for c in ctxs]
            + ([f"state B/token @{context_label(ctxs[-1])}"] if ctxs else []))
    rows = []
    for name, r in results["mechanisms"].items():
        if not seed_values(r, "text", "val_bpb"):
            continue
        rows.append([name, f"{r['params']:,}", fmt(seed_values(r, "text", "val_bpb"))]
                    + [fmt(seed_values(r, "text", "val_bpb_longer", f"{m}x")) for m in mults]
                    + [fmt(seed_values(r, "recall", "by_pairs", str(n)), 2) for n in pairs]
                    + [fmt(seed_values(r, "recall", "needle", str(d)), 2) for d in dists]
                    + [f"{mean_spread(seed_values(r, 'text', 'train_tokens_per_s'))[0]:,.0f}"]
                    + [human_bytes(r["state_bytes"][str(c)]) for c in ctxs]
                    + ([per_token(r["state_bytes"][str(ctxs[-1])] / ctxs[-1])] if ctxs else []))
    return _row_table(head, rows)


def table_notes(results: dict) -> str:
    """The key under ``table``: a sentence for each kind of column (and mark) the table has, none for one it
    lacks."""
    s, t = results["settings"], table(results)
    notes = ["*val bpb*: validation bits per byte (lower is better)"]
    if s["eval_context_multiples"]:
        notes.append("*bpb @m× ctx*: the same model evaluated at m times its training context (length "
                     "generalisation)")
    notes.append("*recall n pairs*: multi-query associative recall on held-out sequences with n key-value pairs")
    if s["needle_distances"]:
        notes.append("*needle @d*: one pair exactly d tokens before its query (d past the training context tests "
                     "length generalisation too)")
    notes.append("*train tok/s*: text-model training tokens per second (mean over the seeds)")
    if s["contexts"]:
        notes.append("*state*: decoding state for batch 1 in the bench dtype from each mechanism's `state_bytes` "
                     "(formula); *state B/token*: the same divided by the context")
    out = "- " + "; ".join(notes) + "."
    if " ± " in t:
        out += " With several seeds: mean ± half the range."
    if "—" in t:
        out += (" *—*: no value (for *bpb @m× ctx*: the validation text is shorter than m times the context)."
                if s["eval_context_multiples"] else " *—*: no value.")
    return out


def _memory_rows(results: dict) -> dict[str, dict[int, dict]]:
    return {name: {row["context"]: row for row in r["memory"]["rows"]}
            for name, r in results["mechanisms"].items() if "memory" in r}


def memory_table(results: dict) -> str:
    """Decoding measured at each context: state bytes held, peak allocated while decoding (CUDA), tok/s."""
    ctxs = results["settings"]["measure_contexts"]
    cuda = _has_peak(results)
    head = ["mechanism"] + [f"@{context_label(c)}: state{' / peak' if cuda else ''} / tok/s" for c in ctxs]
    rows = []
    for name, by_ctx in _memory_rows(results).items():
        cells = [name]
        for c in ctxs:
            m = by_ctx.get(c)
            if m is None or "skipped" in m:
                cells.append("—" if m is None else "not measured")
                continue
            parts = [human_bytes(m["state_bytes_measured"])]
            if cuda:
                parts.append(human_bytes(m["peak_allocated_bytes_decoding"]))
            cells.append(" / ".join(parts + [f"{m['decode_tokens_per_s']:,.1f}"]))
        rows.append(cells)
    return _row_table(head, rows)


def _has_peak(results: dict) -> bool:
    return results["meta"]["device"].startswith("cuda")


def _decode_paths(results: dict) -> str:
    """How the timed steps ran, from each row's ``decode_path`` (None: results recorded before static decoding,
    whose steps ran through the eager step form)."""
    paths = {name: {m.get("decode_path") for m in by_ctx.values() if "skipped" not in m}
             for name, by_ctx in _memory_rows(results).items()}
    used = set().union(*paths.values())
    if None in used:
        return None
    if not used or "graph" not in used:
        return "static eager steps"
    static = [name for name, p in paths.items() if "static" in p]
    return "each step replayed from a CUDA graph" + (f" ({', '.join(static)}: static eager steps)" * bool(static))


def memory_notes(results: dict) -> str:
    """The key under ``memory_table``: how the numbers were taken and what each part of a cell is, naming only the
    parts (and marks) the table has."""
    s, t, rows = results["settings"], memory_table(results), _memory_rows(results)
    ray = (" (RayTention, whose state is the token ids, gets random ids put in place: its prefill computes nothing "
           "it keeps)") if "raytention" in rows else ""
    how = _decode_paths(results)
    if how is None:   # recorded before static decoding existed
        out = (f"Each context is reached by prefilling random tokens through the step form{ray}, then "
               f"{s['decode_steps']} tokens are decoded through the eager step form and timed (batch 1; recorded "
               "before static decoding and CUDA-graph replay existed). *state*: bytes the step form really holds")
    else:
        out = (f"Each context is reached by prefilling random tokens into a static decoding state{ray}, then, after "
               f"untimed warm-up steps, {s['decode_steps']} tokens are decoded and timed (batch 1) on the fast path: "
               f"{how}. *state*: bytes the state really holds at the context")
    out = (out
           + ("; *peak*: peak allocated device memory while decoding (weights, the static buffers and transients)"
              if _has_peak(results) else "")
           + "; *tok/s*: decoded tokens per second.")
    if "not measured" in t:
        out += (f" *not measured*: the prefill to that context was projected to take longer than "
                f"{s['prefill_seconds']:.0f} s.")
    if "| — |" in t:
        out += " *—*: not reached yet (the run stopped before)."
    return out


def ring_note(results: dict) -> str | None:
    """What the report says about ring attention: left out, or run and (on one device) equal to full attention."""
    mech, s = results["mechanisms"], results["settings"]
    where = "Its multi-GPU speed and memory come from `benchmarks/ring_attention.py` (benchmarks/README.md)."
    if "ring" not in mech:
        return ("*ring* is left out: on one GPU the ring mechanism computes exactly full attention (same model, same "
                "numbers). " + where) if "ring" in s["exclude"] else None
    if "full" not in mech or not seed_values(mech["ring"], "text", "val_bpb"):
        return "*ring*: on one device the ring mechanism computes exactly full attention. " + where
    same = all(seed_values(mech["ring"], unit, key) == seed_values(mech["full"], unit, key)
               for unit, key in (("text", "val_bpb"), ("recall", "by_pairs"), ("recall", "needle")))
    drawn = ("The plots draw ring dashed with larger hollow markers (its bars hatched), so that full stays visible "
             "beneath it")
    if same:
        return ("*ring*: on one device the ring mechanism computes exactly full attention, so its quality, recall "
                f"and state equal full's. {drawn}, labelled *coincides with full* where the two are equal. Its decode "
                f"speed is the same computation timed separately. {where}")
    return ("*ring*: on one device the ring mechanism computes full attention, yet its quality or recall here differ "
            f"from full's (table above). {drawn}. {where}")


def findings(results: dict) -> list[str]:
    """Plain statements: each mechanism's quality gap to full attention against the seed spread, flat-state
    claims against the measured state, and the published claims next to the numbers."""
    mech = results["mechanisms"]
    out = []
    full = mean_spread(seed_values(mech["full"], "text", "val_bpb")) if "full" in mech else None
    for name, r in mech.items():
        ms = mean_spread(seed_values(r, "text", "val_bpb"))
        if full is None or ms is None or name == "full":
            continue
        gap, spread = ms[0] - full[0], max(ms[1], full[1])
        n_seeds = min(len(seed_values(r, "text", "val_bpb")), len(seed_values(mech["full"], "text", "val_bpb")))
        if n_seeds < 2:
            line = (f"**{name}** vs full attention: {ms[0]:.3f} vs {full[0]:.3f} bpb, gap {gap:+.3f} (one seed: "
                    f"no spread to judge the gap against).")
        else:
            verdict = ("within the seed spread" if abs(gap) <= spread else "better" if gap < 0 else "worse")
            line = (f"**{name}** vs full attention: {ms[0]:.3f} vs {full[0]:.3f} bpb, gap {gap:+.3f} "
                    f"(seed spread ±{spread:.3f}, {n_seeds} seeds): {verdict}.")
        if name == "ring":
            line += " On one device ring attention computes exactly full attention: the same numbers are expected."
        if name in CLAIMS:
            if gap > spread:
                verdict = "**does not reproduce it**"
            elif n_seeds < 2:
                verdict = "does not contradict it, but one seed cannot confirm it"
            else:
                verdict = "is consistent with it"
            line += f" Published claim: {CLAIMS[name]}. This run {verdict} ({ms[0]:.3f} vs {full[0]:.3f} bpb)."
        out.append(line)
    for name, by_ctx in _memory_rows(results).items():
        held = [(c, m["state_bytes_measured"]) for c, m in sorted(by_ctx.items()) if "skipped" not in m]
        if name in FLAT_STATE and len(held) > 1:
            flat = held[0][1] == held[-1][1]
            out.append(f"**{name}**: state {'flat' if flat else '**not flat**'} as claimed: "
                       f"{human_bytes(held[0][1])} at {context_label(held[0][0])} tokens, "
                       f"{human_bytes(held[-1][1])} at {context_label(held[-1][0])} (measured).")
    return out


def write_report(results: dict, out_dir: Path) -> None:
    """``report.md`` and ``loss.png``, ``memory.png``, ``recall.png``, ``speed.png`` (each written atomically)."""
    s, meta = results["settings"], results["meta"]
    md = [
        "# longctx bench report", "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device_name']} · torch {meta['torch']} · preset `{meta['preset']}` · seeds "
        f"{', '.join(map(str, s['seeds']))} · dtype {s['dtype']} · {meta['seconds'] / 60:.1f} min  ",
        f"Model: {s['n_layer']} layers, width {s['n_embd']}, {s['n_head']} heads / {s['n_kv_head']} KV heads, "
        f"context {s['block_size']}; text: {s['steps']} steps × {s['batch_size']} × {s['block_size']} tokens "
        f"({meta['data']}); recall: {s['recall_steps']} steps on {', '.join(map(str, s['recall_pairs']))} "
        f"pair{'s' * (s['recall_pairs'] != [1])} at distance ≥ {s['recall_min_distance']}.", "",
        table(results), "",
        table_notes(results), "",
        "## Decoding, measured", "",
        memory_table(results), "",
        memory_notes(results), "",
    ]
    ring = ring_note(results)
    if ring:
        md += [ring, ""]
    found = findings(results)
    if found:
        md += ["## What the numbers say", ""] + [f"- {x}" for x in found] + [""]
    md += ["![loss curves](loss.png)", "", "![memory vs context](memory.png)", "", "![recall](recall.png)", "",
           "![speed vs context](speed.png)", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    _plots(results, out_dir)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_kind(xs: list) -> str:
    """How a panel shows its values: ``"bars"`` (one bar per mechanism) when they share one x value, since a
    column of dots on a log axis reads as nothing; ``"lines"`` over a log x axis for several; ``"empty"`` for
    none."""
    n = len(set(xs))
    return "empty" if n == 0 else "bars" if n == 1 else "lines"


def _line_style(name: str, markers: bool = True) -> dict:
    """Ring dashed, on top, with larger hollow markers: on one device its numbers are full attention's, and a
    solid line over full's would hide it."""
    if name == "ring":
        return {"ls": "--", "zorder": 3} | ({"marker": "o", "mfc": "none", "ms": 9, "mew": 1.5} if markers else {})
    return {"ls": "-", "zorder": 2} | ({"marker": "o", "ms": 5} if markers else {})


def _label(name: str, series: dict, what: str = "") -> str:
    """``name`` + ``what``, and for ring whose series equals full's, "coincides with full"."""
    same = name == "ring" and "full" in series and series["ring"] == series["full"]
    return f"{name}{what} (coincides with full)" if same else name + what


def _panel(ax, series: dict[str, list], colours: dict[str, str], *, ylabel: str, lines_title: str, bars_title,
           xlabel: str, xtick=str, value=lambda y: f"{y:.2f}", logy: tuple[str, ...] = ()) -> str:
    """``{mechanism: [(x, y), ...]}`` drawn as ``plot_kind`` says; ``bars_title(x)`` titles the one-x case, ``logy``
    names the kinds drawn over a log y axis. The kind drawn is returned."""
    series = {n: sorted(pts) for n, pts in series.items() if pts}
    kind = plot_kind([x for pts in series.values() for x, _ in pts])
    if kind == "empty":
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=lines_title, xticks=[], yticks=[])
    elif kind == "bars":
        names = list(series)
        ys = [series[n][0][1] for n in names]
        bars = ax.bar(range(len(names)), ys, color=[colours[n] for n in names])
        for bar, n in zip(bars, names):
            if n == "ring":
                bar.set(hatch="//", edgecolor="white")
        ax.bar_label(bars, labels=[value(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(names)), [_label(n, series).replace(" (", "\n(") for n in names], fontsize=8,
                      rotation=30, ha="right")
        ax.set(ylabel=ylabel, title=bars_title(series[names[0]][0][0]), yscale="log" if kind in logy else "linear")
        ax.margins(y=0.12)
    else:
        for n, pts in series.items():
            ax.plot(*zip(*pts), color=colours[n], label=_label(n, series), **_line_style(n))
        xs = sorted({x for pts in series.values() for x, _ in pts})
        ax.set(xscale="log", yscale="log" if kind in logy else "linear", xlabel=xlabel, ylabel=ylabel,
               title=lines_title)
        ax.set_xticks(xs, [xtick(x) for x in xs])
        ax.set_xticks([], minor=True)
    return kind


def _plots(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech, s = results["mechanisms"], results["settings"]
    colours = {name: f"C{i % 10}" for i, name in enumerate(mech)}   # one colour per mechanism in every plot

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = {name: runs[0]["curve"] for name, r in mech.items()
              if (runs := [x["text"] for x in r["runs"].values() if "text" in x])}
    for name, curve in curves.items():
        steps, losses = zip(*curve)
        ax.plot(steps, losses, color=colours[name], label=_label(name, curves), **_line_style(name, markers=False))
    ax.set(xlabel="step", ylabel="train loss (nats/byte)", title=f"Training loss (seed {s['seeds'][0]})")
    ax.legend()
    _save(fig, out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _memory_plot(ax, results, colours)
    _save(fig, out_dir / "memory.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    pairs = {name: [(n, ms[0]) for n in s["recall_pairs"]
                    if (ms := mean_spread(seed_values(r, "recall", "by_pairs", str(n))))] for name, r in mech.items()}
    needle = {name: [(d, ms[0]) for d in s["needle_distances"]
                     if (ms := mean_spread(seed_values(r, "recall", "needle", str(d))))] for name, r in mech.items()}
    block = s["block_size"]
    k1 = _panel(a1, pairs, colours, ylabel="accuracy", xlabel="key-value pairs",
                lines_title="Associative recall vs pairs",
                bars_title=lambda n: f"Associative recall, {n} key-value pair{'s' * (n > 1)}")
    k2 = _panel(a2, needle, colours, ylabel="accuracy", xlabel="distance back (tokens; dashed: training context)",
                lines_title="Needle vs distance",
                bars_title=lambda d: f"Needle {d} tokens back ({'past' if d > block else 'within'} the "
                                     f"{block}-token training context)")
    if k2 == "lines":
        a2.axvline(block, color="grey", ls="--", lw=1)
    for ax, kind in ((a1, k1), (a2, k2)):
        if kind == "lines":   # bars name their mechanisms on the axis; one legend is enough for the lines
            ax.legend(fontsize=8)
            break
    _save(fig, out_dir / "recall.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    speed = {name: [(m["context"], m["decode_tokens_per_s"]) for m in by_ctx.values() if "skipped" not in m]
             for name, by_ctx in _memory_rows(results).items()}
    if _panel(ax, speed, colours, ylabel="decode tokens/s (batch 1)", xlabel="context (tokens)", xtick=context_label,
              lines_title="Decoding speed vs context", logy=("lines",), value=lambda y: f"{y:,.0f}",
              bars_title=lambda c: f"Decoding speed at {context_label(c)} tokens of context") == "lines":
        ax.legend(fontsize=8)
    _save(fig, out_dir / "speed.png")


def _memory_plot(ax, results: dict, colours: dict[str, str]) -> None:
    """State bytes (formula) as lines over the formula's contexts, the measured state as crosses, the peak while
    decoding (CUDA) dotted; with a single context in all, bars of the state."""
    s = results["settings"]
    rows = {name: [m for m in r.get("memory", {}).get("rows", []) if "skipped" not in m]
            for name, r in results["mechanisms"].items()}
    formula = {name: [(c, r["state_bytes"][str(c)]) for c in s["contexts"]]
               for name, r in results["mechanisms"].items()}
    measured = {name: [(m["context"], m["state_bytes_measured"]) for m in held] for name, held in rows.items()}
    xs = [x for pts in [*formula.values(), *measured.values()] for x, _ in pts]
    if plot_kind(xs) != "lines":
        state = {name: formula[name] or measured[name] for name in formula}
        _panel(ax, state, colours, ylabel="decoding state (bytes)", xlabel="context (tokens)", logy=("bars",),
               value=human_bytes, lines_title="Decoding state",
               bars_title=lambda c: f"Decoding state at {context_label(c)} tokens of context")
        return
    for name, pts in formula.items():
        style = _line_style(name, markers=False)
        if pts:
            ax.plot(*zip(*pts), color=colours[name], label=_label(name, formula, " state (formula)"), **style)
        if measured[name]:
            ax.scatter(*zip(*measured[name]), marker="x", s=60 if name != "ring" else 110, color=colours[name],
                       zorder=style["zorder"])
        peak = [(m["context"], m["peak_allocated_bytes_decoding"]) for m in rows[name]
                if "peak_allocated_bytes_decoding" in m]
        if peak:
            ax.plot(*zip(*peak), color=colours[name], label=f"{name} peak while decoding",
                    **_line_style(name) | {"ls": "-." if name == "ring" else ":"})
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes",
           title="Decoding memory vs context (x: state measured)")
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [context_label(c) for c in ticks])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=7)
