"""The README's throughput figure from several ``longctx throughput`` results of one model: a later file's row
replaces an earlier one's of the same mechanism, context and batch (a rerun after a fix).

    python3 benchmarks/throughput_figure.py OUT.png A.json [B.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from longctx.bench.throughput import plot_throughput


def merged(paths: list[str]) -> dict:
    rows: dict = {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        for r in res["rows"]:
            rows[(r["mechanism"], r["context"], str(r["batch_label"]))] = r
    return {**res, "rows": list(rows.values())}


if __name__ == "__main__":
    plot_throughput(merged(sys.argv[2:]), Path(sys.argv[1]))
