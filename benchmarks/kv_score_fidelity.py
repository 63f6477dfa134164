"""How well does each KV scorer predict the attention a key will actually receive? (CPU is fine.)

On a pretrained model (default SmolLM2-135M-Instruct) and a text from the corpus's perplexity region: run the
model once over ``--tokens`` tokens with eager attention, take the cache as it stands after the first
``--split`` tokens, and for every layer and KV head compare each scorer's score of those keys with the attention
mass they really receive from the later queries (summed over the later queries, averaged over the query heads
of the KV head). Reports, averaged over layers and KV heads: Spearman rank correlation, and recall@budget =
the share of the truly most-attended ``budget`` keys that the scorer's top ``budget`` contains (the protected
recent window is left out of both, as the cache keeps it anyway). ``recency`` is StreamingLLM's order, ``random``
the chance level.

    PYTHONPATH=. python benchmarks/kv_score_fidelity.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longctx.atomic import atomic_write_json
from longctx.data import load_text
from longctx.kv import build_scorer, calibrate
from longctx.kv.model import load_model
from longctx.kv.needle import corpus_region, take_tokens


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation along the last dim (ties broken by order; fine for continuous scores)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def recall_at(pred: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    top_p = torch.zeros_like(pred, dtype=torch.bool).scatter(-1, pred.topk(k, -1).indices, True)
    top_t = torch.zeros_like(truth, dtype=torch.bool).scatter(-1, truth.topk(k, -1).indices, True)
    return (top_p & top_t).sum(-1).to(torch.float64) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="local transformers model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--split", type=int, default=1024, help="keys before this position are scored")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the scored keys for recall@budget")
    ap.add_argument("--window", type=int, default=64, help="recent keys left out (the cache protects them)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not 0 < args.split - args.window < args.tokens:
        raise ValueError(f"need 0 < split - window < tokens, got split={args.split}, window={args.window}, "
                         f"tokens={args.tokens}")
    torch.manual_seed(0)
    model, tok = load_model(args.model, attn_implementation="eager")
    text = load_text()
    stats = calibrate(model, take_tokens(tok, corpus_region(text, "calibration"), 0, 2048)[None])
    ids = take_tokens(tok, corpus_region(text, "perplexity"), 0, args.tokens)[None]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_attentions=True)
    n_kv = model.config.num_key_value_heads
    S, t = args.split - args.window, args.split - 1        # scored keys: positions 0 .. S-1; scoring time t
    k = max(1, int(args.budget * S))
    scorers = {"triattention": build_scorer("triattention", stats=stats), "keynorm": build_scorer("keynorm")}
    sums = {name: {"spearman": 0.0, "recall": 0.0} for name in [*scorers, "recency", "random"]}
    per_layer = []
    n_layers = len(out.attentions)
    for layer, attn in enumerate(out.attentions):                        # [1, H, T, T]
        H = attn.shape[1]
        truth = attn[0, :, args.split:, :S].sum(1).view(n_kv, H // n_kv, S).mean(1).to(torch.float64)  # [Hkv, S]
        keys = out.past_key_values.layers[layer].keys[:, :, :S]          # rotated, as a cache holds them
        pos = torch.arange(S).expand(1, n_kv, S)
        preds = {name: s.score(keys, None, pos, t, layer, {})[0] for name, s in scorers.items()}
        preds["recency"] = pos[0].to(torch.float64)
        preds["random"] = torch.rand(n_kv, S, dtype=torch.float64)
        row = {"layer": layer}
        for name, p in preds.items():
            rho, rec = spearman(p, truth).mean().item(), recall_at(p, truth, k).mean().item()
            sums[name]["spearman"] += rho / n_layers
            sums[name]["recall"] += rec / n_layers
            row[name] = {"spearman": rho, "recall": rec}
        per_layer.append(row)
    result = {"model": stats.model_name or "SmolLM2-135M-Instruct", "tokens": args.tokens, "split": args.split,
              "window": args.window, "scored_keys": S, "budget_keys": k, "mean_over_layers_and_kv_heads": sums,
              "per_layer": per_layer}
    path = atomic_write_json(Path(args.out) / "kv_score_fidelity.json", result)
    print(f"{S} keys scored at t={t}, truth = attention from the {args.tokens - args.split} later queries; "
          f"recall@{k}")
    print("| scorer | Spearman | recall@budget |\n|---|---|---|")
    for name, v in sums.items():
        print(f"| {name} | {v['spearman']:.3f} | {v['recall']:.3f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
