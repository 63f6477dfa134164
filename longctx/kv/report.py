"""The outputs of ``longctx kv-eval``: per-configuration summary, ``report.md``, ``needle_heatmap.png`` and
``accuracy_vs_budget.png`` (each written atomically)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..atomic import atomic_write, atomic_write_text
from ..bench.report import human_bytes

HEATMAP_BUDGET = "25%"


def summarise(results: dict) -> dict[int, dict[str, dict]]:
    """``{length: {config: row}}`` over every finished cell. A row has ``method, budget, budget_tokens``,
    ``needle_acc, needle_n, acc_by_depth`` (needle cells), ``ppl, ppl_ratio, kv_bytes, kv_ratio,
    bookkeeping_bytes, n_pruned`` (perplexity cells; ratios against ``full``), ``decode_tok_s``, ``errors``."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))     # length → config → field → values
    for cell in results["cells"].values():
        for key, e in cell["results"].items():
            bucket = acc[cell["length"]][key]
            bucket["meta"] = [e]
            if "error" in e:
                bucket["errors"].append(e["error"])
            elif cell["task"] == "needle":
                bucket["correct"].append(bool(e["correct"]))
                bucket[f"depth={cell['depth']:g}"].append(bool(e["correct"]))
                bucket["decode_tokens"].append(e["decode_tokens"])
                bucket["decode_seconds"].append(e["decode_seconds"])
            else:
                bucket["nll"].append(e["nll_sum"])
                bucket["n"].append(e["n_tokens"])
                bucket["kv_bytes"].append(e["kv_bytes"])
                bucket["bookkeeping_bytes"].append(e["bookkeeping_bytes"])
                bucket["n_pruned"].append(e["n_pruned"])
    out: dict[int, dict[str, dict]] = {}
    for length in sorted(acc):
        rows = {}
        for key, b in acc[length].items():
            m = b["meta"][0]
            row = {"method": m["method"], "budget": m["budget"], "budget_tokens": m["budget_tokens"],
                   "errors": sorted(set(b["errors"]))}
            if b["correct"]:
                row["needle_acc"] = sum(b["correct"]) / len(b["correct"])
                row["needle_n"] = len(b["correct"])
                row["acc_by_depth"] = {k[6:]: sum(v) / len(v) for k, v in b.items() if k.startswith("depth=")}
                seconds = sum(b["decode_seconds"])
                row["decode_tok_s"] = sum(b["decode_tokens"]) / seconds if seconds > 0 else None
            if b["n"]:
                row["ppl"] = math.exp(sum(b["nll"]) / sum(b["n"]))
                row["ppl_n_tokens"] = sum(b["n"])
                row["kv_bytes"] = sum(b["kv_bytes"]) / len(b["kv_bytes"])
                row["bookkeeping_bytes"] = sum(b["bookkeeping_bytes"]) / len(b["bookkeeping_bytes"])
                row["n_pruned"] = max(b["n_pruned"])
            rows[key] = row
        full = rows.get("full", {})
        for row in rows.values():
            if "ppl" in row and "ppl" in full:
                row["ppl_ratio"] = row["ppl"] / full["ppl"]
                row["kv_ratio"] = row["kv_bytes"] / full["kv_bytes"]
            if "needle_acc" in row and full.get("needle_acc"):
                row["acc_ratio"] = row["needle_acc"] / full["needle_acc"]
        out[length] = rows
    return out


def _fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def table(results: dict) -> str:
    """Markdown tables, one per context length."""
    parts = []
    for length, rows in summarise(results).items():
        head = ["method", "budget", "kept tokens", "needle acc", "acc / full", "ppl", "ppl / full",
                "KV measured", "KV / full", "pruned", "decode tok/s"]
        lines = [f"**Context {length} tokens**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, r in rows.items():
            if r["errors"]:
                lines.append(f"| {r['method']} | {r['budget']} | " + f"error: {r['errors'][0][:80]} |" + " |" * 8)
                continue
            acc = r.get("needle_acc")
            row = [r["method"], r["budget"], _fmt(r["budget_tokens"], "d", "all"),
                   f"{acc:.2f} ({r['needle_n']})" if acc is not None else "–", _fmt(r.get("acc_ratio"), ".2f"),
                   _fmt(r.get("ppl"), ".3f"), _fmt(r.get("ppl_ratio"), ".3f"),
                   human_bytes(r["kv_bytes"]) if "kv_bytes" in r else "–", _fmt(r.get("kv_ratio"), ".3f"),
                   _fmt(r.get("n_pruned"), "d"), _fmt(r.get("decode_tok_s"), ".1f")]
            lines.append("| " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_report(results: dict, out_dir: str | Path) -> None:
    """``report.md``, ``needle_heatmap.png`` and ``accuracy_vs_budget.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    meta, s, plan = results["meta"], results["settings"], results.get("plan", {})
    md = [
        "# longctx kv-eval report", "",
        f"Command: `{meta['command']}`  ",
        f"Model: {s['model']} ({s['dtype']}) · device: {meta['device_name']} · torch {meta['torch']} · "
        f"transformers {meta['transformers']} · seed {s['seed']} · wall time {meta['seconds'] / 60:.1f} min  ",
        f"Plan: lengths {plan.get('lengths')}, depths {plan.get('depths')}, {plan.get('trials')} needle trials per "
        f"cell, {plan.get('ppl_samples')} perplexity windows per length ({s['ppl_tokens']} scored tokens each, fed "
        f"{s['ppl_chunk']} at a time).  ",
        f"TriAttention stats: {meta.get('stats_source')} (id {s['stats']}).  ",
        f"kvpress: {meta['kvpress']}" + ("" if s.get("kvpress") else " — its presses were not evaluated."), "",
        table(results), "",
        f"- Protocol ({s['protocol']}): {_protocol(s['protocol'])}; perplexity: the context is prefilled and "
        "compressed, then the continuation is fed through the compressed cache. The caches prune themselves again "
        "whenever a layer holds budget + 128 tokens.",
        "- *budget*: tokens kept per layer and KV head, as a fraction of the context length (or tokens). "
        "*needle acc*: fraction of prompts (count in brackets) whose greedy answer contains the 6-digit code. "
        "*ppl*: perplexity of the held-out continuation; *KV measured*: bytes of the key/value tensors held at the "
        "end of the perplexity run (positions and scorer state excluded; they add "
        + _bookkeeping_note(results) + "). *pruned*: prunes per layer in one perplexity run. "
        "*decode tok/s*: one-token steps while answering (batch 1).",
        "", "![needle accuracy by length and depth](needle_heatmap.png)", "",
        "![accuracy and perplexity vs budget](accuracy_vs_budget.png)", "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    _plots(results, out_dir)


def _protocol(name: str) -> str:
    from .run_eval import PROTOCOLS

    return "needle task: " + PROTOCOLS.get(name, name)


def _bookkeeping_note(results: dict) -> str:
    ratios = [r["bookkeeping_bytes"] / r["kv_bytes"] for rows in summarise(results).values() for r in rows.values()
              if r.get("kv_bytes") and r.get("bookkeeping_bytes")]
    return f"at most {100 * max(ratios):.1f}% more" if ratios else "nothing"


def _plots(results: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results)
    lengths = sorted(summary)
    budgets = results["settings"]["budgets"]
    shown = HEATMAP_BUDGET if HEATMAP_BUDGET in budgets else budgets[len(budgets) // 2]
    methods = [m for m in results["settings"]["methods"]]
    extra = sorted({r["method"] for rows in summary.values() for r in rows.values()} - set(methods))
    methods += extra
    depths = sorted({float(d) for rows in summary.values() for r in rows.values()
                     for d in r.get("acc_by_depth", {})})

    fig, axes = plt.subplots(1, len(methods), figsize=(2.3 * len(methods) + 1.2, 0.45 * len(lengths) + 2.4),
                             squeeze=False, sharey=True, constrained_layout=True)
    image = None
    for ax, method in zip(axes[0], methods):
        key = method if method == "full" else f"{method}@{shown}"
        grid = [[summary[n].get(key, {}).get("acc_by_depth", {}).get(f"{d:g}", math.nan) for d in depths]
                for n in lengths]
        if not depths:
            ax.text(0.5, 0.5, "no needle results", ha="center", va="center", transform=ax.transAxes)
            continue
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                          extent=(-0.5, len(depths) - 0.5, -0.5, len(lengths) - 0.5))
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i][j] < 0.5 else "black")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("needle depth")
    axes[0][0].set_ylabel("context (tokens)")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="accuracy")
    fig.suptitle(f"Needle retrieval accuracy, budget {shown} (full: no compression)", fontsize=10)
    atomic_write(out_dir / "needle_heatmap.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 7), squeeze=False)
    for col, n in enumerate(lengths):
        rows = summary[n]
        full = rows.get("full", {})
        for method in methods:
            if method == "full":
                continue
            pts = sorted(((r["budget_tokens"] / n, r) for r in rows.values()
                          if r["method"] == method and not r["errors"]), key=lambda p: p[0])
            if not pts:
                continue
            x = [p[0] for p in pts]
            line, = axes[0][col].plot(x, [p[1].get("needle_acc", math.nan) for p in pts], marker="o", label=method)
            axes[1][col].plot(x, [p[1].get("ppl_ratio", math.nan) for p in pts], marker="o", label=method,
                              color=line.get_color())
        if "needle_acc" in full:
            axes[0][col].axhline(full["needle_acc"], color="black", ls="--", lw=1, label="full")
        axes[1][col].axhline(1.0, color="black", ls="--", lw=1, label="full")
        axes[0][col].set(title=f"context {n}", ylabel="needle accuracy", ylim=(-0.03, 1.03))
        axes[1][col].set(xlabel="budget (fraction of context kept)", ylabel="perplexity / full-cache perplexity")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out_dir / "accuracy_vs_budget.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
