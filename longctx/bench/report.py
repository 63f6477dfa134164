"""The bench's outputs: the printed table, ``report.md`` and the PNG plots."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write, atomic_write_text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def context_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def table(results: dict) -> str:
    """Markdown table of every finished mechanism."""
    ctxs = results["settings"]["contexts"]
    mc = results["settings"]["measure_context"]
    mults = results["settings"]["eval_context_multiples"]
    head = (["mechanism", "params", "val bpb"] + [f"bpb @{m}× ctx" for m in mults]
            + ["recall acc", "train tok/s", f"decode tok/s @{context_label(mc)}",
               f"state measured @{context_label(mc)}"] + [f"state @{context_label(c)}" for c in ctxs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["mechanisms"].items():
        m = r["decode"]
        longer = [r["val_bpb_longer"][f"{k}x"] for k in mults]
        row = ([name, f"{r['params']:,}", f"{r['val_bpb']:.3f}"] + ["—" if x is None else f"{x:.3f}" for x in longer]
               + [f"{r['recall_acc']:.3f}", f"{r['train_tokens_per_s']:,.0f}", f"{m['decode_tokens_per_s']:,.1f}",
                  human_bytes(m["state_bytes_measured"])])
        row += [human_bytes(r["state_bytes"][str(c)]) for c in ctxs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> None:
    """``report.md``, ``loss.png`` and ``memory.png`` in ``out_dir`` (each written atomically)."""
    s, meta = results["settings"], results["meta"]
    md = [
        "# longctx bench report", "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device_name']} · torch {meta['torch']} · preset `{meta['preset']}` · seed {meta['seed']}"
        f" · dtype {s['dtype']}  ",
        f"Model: {s['n_layer']} layers, width {s['n_embd']}, {s['n_head']} heads / {s['n_kv_head']} KV heads, "
        f"context {s['block_size']}; text: {s['steps']} steps × {s['batch_size']} × {s['block_size']} tokens "
        f"({meta['data']}); recall: {s['recall_steps']} steps, {s['recall_pairs']} pairs at distance ≥ "
        f"{s['recall_min_distance']}.", "",
        table(results), "",
        "- *val bpb*: validation bits per byte (lower is better); *bpb @m× ctx*: the same evaluated at m times the "
        "training context (length generalisation; — when the validation text is too short). *recall acc*: "
        "multi-query associative recall on "
        "held-out sequences. *state*: decoding state (KV cache or its replacement) for batch 1 in the bench dtype, "
        "from each mechanism's `state_bytes`; *state measured*: bytes the step form actually held after "
        "decoding to that context.",
        "", "![loss curves](loss.png)", "", "![memory vs context](memory.png)", "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    _plots(results, out_dir)


def _plots(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["mechanisms"].items():
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="train loss (nats/byte)", title="Training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(out_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ctxs = results["settings"]["contexts"]
    for name, r in results["mechanisms"].items():
        line, = ax.plot(ctxs, [r["state_bytes"][str(c)] for c in ctxs], marker="o", label=f"{name} (formula)")
        m = r["decode"]
        ax.scatter([m["context"]], [m["state_bytes_measured"]], marker="x", s=80, color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode state (bytes)",
           title="Decode state memory vs context (x: measured)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out_dir / "memory.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
