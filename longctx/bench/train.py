"""Training and evaluation loops shared by the bench and the tests."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..data import get_batch, recall_accuracy, recall_batch
from ..model import GPT

Batch = Callable[[torch.Generator], tuple[Tensor, Tensor]]


def train(model: GPT, next_batch: Batch, steps: int, lr: float, seed: int, desc: str = "train",
          progress: bool = True) -> dict:
    """AdamW with warm-up and cosine decay on batches from ``next_batch(generator)``.

    Returns ``{"curve": [[step, loss], ...], "tokens_per_s": float, "seconds": float}``.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    curve, tokens = [], 0
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        x, y = (t.to(device) for t in next_batch(g))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += x.numel()
        if step % max(1, steps // 50) == 0 or step == steps - 1:
            curve.append([step, loss.item()])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"curve": curve, "tokens_per_s": tokens / seconds, "seconds": seconds}


#: Evaluation runs at most this many tokens per forward (at least one row): long contexts stay within memory
#: for every mechanism (power4's chunked form expands each token to C(d+3, 4) features). Rows have equal
#: lengths and equal numbers of scored positions, so the mean over the pieces is the mean over the batch.
EVAL_TOKENS = 2048


def in_rows(x: Tensor, y: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    rows = max(1, EVAL_TOKENS // x.shape[1])
    return x.split(rows), y.split(rows)


@torch.no_grad()
def eval_loss(model: GPT, data: Tensor, block_size: int, batches: int, batch_size: int, seed: int) -> float:
    """Mean cross-entropy (nats per token) over ``batches`` random windows of ``data``."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, batch_size, block_size, g, device)
        losses += [model(xs, ys)[1].item() for xs, ys in zip(*in_rows(x, y))]
    return sum(losses) / len(losses)


def bits_per_byte(loss_nats: float) -> float:
    """Tokens are bytes, so bits per byte is the loss in bits."""
    return loss_nats / math.log(2)


def recall_batches(seq_len: int, n_pairs: int | list[int], batch_size: int, min_distance: int) -> Batch:
    """Recall batches with ``n_pairs`` pairs, or with a list: each batch draws its number of pairs from it."""
    counts = [n_pairs] if isinstance(n_pairs, int) else list(n_pairs)

    def next_batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
        # one count draws nothing extra, so a single-count run sees the same batches as before mixing existed
        n = counts[int(torch.randint(len(counts), (), generator=g))] if len(counts) > 1 else counts[0]
        return recall_batch(batch_size, seq_len, n, g, min_distance)
    return next_batch


@torch.no_grad()
def eval_recall(model: GPT, seq_len: int, n_pairs: int, min_distance: int, batches: int, batch_size: int,
                seed: int) -> float:
    """Accuracy on held-out recall sequences (a seed the training never draws)."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(batches):
        x, y = recall_batch(batch_size, seq_len, n_pairs, g, min_distance)
        accs += [recall_accuracy(model(xs.to(device))[0], ys.to(device)) for xs, ys in zip(*in_rows(x, y))]
    return sum(accs) / len(accs)
