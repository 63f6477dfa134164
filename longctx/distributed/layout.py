"""How a sequence is split over the ranks of a ring, and each rank's global token positions.

Two layouts of a length-``T`` sequence over ``N`` ranks:

* ``"contiguous"``: rank ``r`` holds tokens ``[r*T/N, (r+1)*T/N)``. Simple, but under a causal mask the
  last rank attends to everything and the first to almost nothing.
* ``"zigzag"``: the sequence is cut into ``2N`` equal chunks and rank ``r`` holds chunks ``r`` and
  ``2N-1-r``, in that order. Every rank then has the same causal work (the load-balanced layout).

Each rank's tokens keep their global positions (``local_positions``), which RoPE must use.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def required_multiple(world_size: int, layout: str) -> int:
    """The total sequence length must be a multiple of this: ``2 * world_size`` (zigzag) or ``world_size``."""
    check_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 2 * world_size if layout == "zigzag" else world_size


def check_seq_len(total_len: int, world_size: int, layout: str) -> None:
    """Raise a clear error unless ``total_len`` splits evenly in ``layout`` over ``world_size`` ranks."""
    m = required_multiple(world_size, layout)
    if total_len <= 0 or total_len % m:
        what = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(f"the {layout} layout over {world_size} ranks needs a total sequence length that is a "
                         f"multiple of {what} = {m}, got {total_len}")


def local_positions(total_len: int, world_size: int, rank: int, layout: str = "zigzag",
                    device: torch.device | str | None = None) -> Tensor:
    """Global positions ``[total_len // world_size]`` (int64, increasing) of the tokens rank ``rank`` holds."""
    check_seq_len(total_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if layout == "contiguous":
        n = total_len // world_size
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    c = total_len // (2 * world_size)
    lo, hi = rank * c, (2 * world_size - 1 - rank) * c
    return torch.cat([torch.arange(lo, lo + c, device=device), torch.arange(hi, hi + c, device=device)])


def shard(x: Tensor, world_size: int, rank: int, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Rank ``rank``'s part of the full sequence ``x`` (sequence along ``dim``); a new tensor."""
    pos = local_positions(x.shape[dim], world_size, rank, layout, device=x.device)
    return x.index_select(dim, pos)


def unshard(shards: list[Tensor], layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Inverse of ``shard``: the full sequence from every rank's part, ``shards[r]`` being rank ``r``'s."""
    n = len(shards)
    if n == 0:
        raise ValueError("unshard needs at least one shard")
    local = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"all shards must share one shape, got {[tuple(s.shape) for s in shards]}")
    total = local * n
    pos = torch.cat([local_positions(total, n, r, layout, device=shards[0].device) for r in range(n)])
    stacked = torch.cat(shards, dim=dim)
    full = torch.empty_like(stacked)
    return full.index_copy_(dim, pos, stacked)


def gather(local: Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """All-gather every rank's part of a sequence and reassemble the full sequence on every rank.

    Collective (every rank of ``group`` must call it); not differentiable.
    """
    n = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, layout, dim)


__all__ = ["LAYOUTS", "check_layout", "required_multiple", "check_seq_len", "local_positions", "shard", "unshard",
           "gather"]
