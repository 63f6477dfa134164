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
            + [f"state B/token @{context_label(ctxs[-1])}"])
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
                    + [per_token(r["state_bytes"][str(ctxs[-1])] / ctxs[-1])])
    return _row_table(head, rows)


def _memory_rows(results: dict) -> dict[str, dict[int, dict]]:
    return {name: {row["context"]: row for row in r["memory"]["rows"]}
            for name, r in results["mechanisms"].items() if "memory" in r}


def memory_table(results: dict) -> str:
    """Decoding measured at each context: state bytes held, peak allocated while decoding (CUDA), tok/s."""
    ctxs = results["settings"]["measure_contexts"]
    cuda = results["meta"]["device"].startswith("cuda")
    head = ["mechanism"] + [f"@{context_label(c)}: state{' / peak' if cuda else ''} / tok/s" for c in ctxs]
    rows = []
    for name, by_ctx in _memory_rows(results).items():
        cells = [name]
        for c in ctxs:
            m = by_ctx.get(c)
            if m is None or "skipped" in m:
                cells.append("not measured")
                continue
            parts = [human_bytes(m["state_bytes_measured"])]
            if cuda:
                parts.append(human_bytes(m["peak_allocated_bytes_decoding"]))
            cells.append(" / ".join(parts + [f"{m['decode_tokens_per_s']:,.1f}"]))
        rows.append(cells)
    return _row_table(head, rows)


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
        "- *val bpb*: validation bits per byte (lower is better); *bpb @m× ctx*: the same model evaluated at m "
        "times its training context (length generalisation; — when the validation text is too short). "
        "*recall n pairs*: multi-query associative recall on held-out sequences with n key-value pairs; "
        "*needle @d*: one pair exactly d tokens before its query (d past the training context tests length "
        "generalisation too). With several seeds: mean ± half the range. *state*: decoding state for batch 1 "
        "in the bench dtype from each mechanism's `state_bytes` (formula); *state B/token*: "
        "the same divided by the context.", "",
        "## Decoding, measured", "",
        memory_table(results), "",
        "Each context is reached by prefilling random tokens into a static decoding state (RayTention, whose state "
        "is the token ids, gets random ids put in place: its prefill computes nothing it keeps), then, after "
        f"untimed warm-up steps, {s['decode_steps']} tokens are decoded and timed (batch 1) on the fast path: "
        "each step replayed from a CUDA graph on a GPU (RayTention's uncaptured), static eager steps on a CPU. "
        "*state*: bytes the state really holds at the context"
        + ("; *peak*: peak allocated device memory while decoding (weights, the static buffers and transients)"
           if meta["device"].startswith("cuda") else "")
        + ". A context whose prefill was projected to take too long is *not measured*.", "",
    ]
    if "ring" in s["exclude"]:
        md += ["*ring*: on one GPU the ring mechanism computes exactly full attention (same model, same numbers); "
               "its multi-GPU speed and memory come from `benchmarks/ring_attention.py` (benchmarks/README.md).", ""]
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


def _plots(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech, s = results["mechanisms"], results["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in mech.items():
        runs = [x["text"] for x in r["runs"].values() if "text" in x]
        if runs:
            steps, losses = zip(*runs[0]["curve"])
            ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="train loss (nats/byte)", title=f"Training loss (seed {s['seeds'][0]})")
    ax.legend()
    _save(fig, out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in mech.items():
        ctxs = s["contexts"]
        line, = ax.plot(ctxs, [r["state_bytes"][str(c)] for c in ctxs], label=f"{name} state (formula)")
        held = [m for m in r.get("memory", {}).get("rows", []) if "skipped" not in m]
        ax.scatter([m["context"] for m in held], [m["state_bytes_measured"] for m in held], marker="x", s=60,
                   color=line.get_color())
        if held and "peak_allocated_bytes_decoding" in held[0]:
            ax.plot([m["context"] for m in held], [m["peak_allocated_bytes_decoding"] for m in held], ls=":",
                    marker="o", color=line.get_color(), label=f"{name} peak while decoding")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes",
           title="Decoding memory vs context (x: state measured)")
    ax.legend(fontsize=7)
    _save(fig, out_dir / "memory.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, r in mech.items():
        pairs = [mean_spread(seed_values(r, "recall", "by_pairs", str(n))) for n in s["recall_pairs"]]
        needle = [mean_spread(seed_values(r, "recall", "needle", str(d))) for d in s["needle_distances"]]
        if all(pairs):
            a1.plot(s["recall_pairs"], [m for m, _ in pairs], marker="o", label=name)
        if all(needle):
            a2.plot(s["needle_distances"], [m for m, _ in needle], marker="o", label=name)
    a1.set(xscale="log", xlabel="key-value pairs", ylabel="accuracy", title="Associative recall vs pairs")
    a2.axvline(s["block_size"], color="grey", ls="--", lw=1)
    a2.set(xscale="log", xlabel="distance back (tokens; dashed: training context)", ylabel="accuracy",
           title="Needle vs distance")
    a1.legend(fontsize=8)
    _save(fig, out_dir / "recall.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_ctx in _memory_rows(results).items():
        held = [m for c, m in sorted(by_ctx.items()) if "skipped" not in m]
        ax.plot([m["context"] for m in held], [m["decode_tokens_per_s"] for m in held], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)",
           title="Decoding speed vs context")
    ax.legend(fontsize=8)
    _save(fig, out_dir / "speed.png")
