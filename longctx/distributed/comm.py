"""A ring communicator: every rank sends a buffer to the next rank and receives one from the previous rank.

``RingShift`` passes one buffer around the ring with two slots (double buffering): ``start()`` posts the
send of the current slot and the receive into the spare one (``batch_isend_irecv``), the caller computes
on the current slot meanwhile, and ``finish()`` waits and swaps the slots. On CUDA the transfer runs on
NCCL's stream, ordered after the work already queued, so the next buffer arrives while the current one is
being used. ``RingComm.post`` sends one way only, to the next rank or (``backward``) to the previous one: the
state relay and the halo of the sharded fixed-state mechanisms (``relay.py``). A failed or timed-out transfer (a peer that raised, died or hangs)
raises ``RingCommError``. ``RingComm.all_gather`` is the one collective: every rank's small tensor, for
``check_agreement``, which makes every rank raise the same error where the ranks' inputs disagree.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


class RingCommError(RuntimeError):
    """A ring transfer failed: a peer raised, died, or did not answer within the process group's timeout."""


class RingComm:
    """The ring over the ranks of ``group`` (default: the default process group; one rank when
    ``torch.distributed`` is not initialised). ``who`` names the operation in error messages."""

    def __init__(self, group: dist.ProcessGroup | None = None, who: str = "ring attention"):
        self.group, self.who = group, who
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        elif group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        else:
            self.rank, self.world_size = 0, 1
        if self.world_size > 1:
            g = group if group is not None else dist.group.WORLD
            self.next_rank = dist.get_global_rank(g, (self.rank + 1) % self.world_size)
            self.prev_rank = dist.get_global_rank(g, (self.rank - 1) % self.world_size)

    @classmethod
    def alone(cls) -> "RingComm":
        """A ring of this process only, whether or not ``torch.distributed`` is initialised."""
        comm = cls.__new__(cls)
        comm.group, comm.who, comm.rank, comm.world_size = None, "ring attention", 0, 1
        return comm

    def send_recv(self, send: Tensor, recv: Tensor) -> list:
        """Post: ``send`` to the next rank, ``recv`` from the previous one. Returns the pending works."""
        ops = [dist.P2POp(dist.isend, send, self.next_rank, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group)]
        return dist.batch_isend_irecv(ops)

    def post(self, send: Tensor | None, recv: Tensor | None, backward: bool = False) -> list:
        """Post ``send`` to the next rank and a receive into ``recv`` from the previous one (``backward``: to
        the previous, from the next); either may be None. Returns the pending works (``wait`` them)."""
        if send is None and recv is None:
            return []
        to, frm = (self.prev_rank, self.next_rank) if backward else (self.next_rank, self.prev_rank)
        ops = ([dist.P2POp(dist.isend, send, to, self.group)] if send is not None else []) + \
              ([dist.P2POp(dist.irecv, recv, frm, self.group)] if recv is not None else [])
        return dist.batch_isend_irecv(ops)

    def all_gather(self, t: Tensor, what: str) -> Tensor:
        """Every rank's ``t``, stacked in rank order: ``[world_size, *t.shape]``. A collective: every rank of
        the group calls it (on the group's device: CPU for gloo, CUDA for NCCL)."""
        if self.world_size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, t, group=self.group)
        except RuntimeError as e:  # as in ``wait``: a peer that raised before joining, died or hangs
            raise RingCommError(
                f"{self.who}: rank {self.rank} of {self.world_size} could not gather {what} from the other "
                f"ranks: a peer raised, died or timed out ({type(e).__name__}: {e})") from e
        return torch.stack(parts)

    def wait(self, works: list, what: str) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:  # gloo and NCCL report peer failures and timeouts as RuntimeError subclasses
            raise RingCommError(
                f"{self.who}: rank {self.rank} of {self.world_size} could not exchange {what} with ranks "
                f"{self.prev_rank} (previous) / {self.next_rank} (next): a peer raised, died or timed out "
                f"({type(e).__name__}: {e})") from e


class RingShift:
    """One buffer travelling around the ring, double-buffered. ``current`` is the slot this rank holds."""

    def __init__(self, comm: RingComm, first: Tensor, what: str):
        self.comm, self.what = comm, what
        self.current = first
        self._spare: Tensor | None = None
        self._works: list | None = None

    def start(self) -> None:
        """Send ``current`` to the next rank and start receiving the previous rank's buffer."""
        if self.comm.world_size == 1:
            return
        if self._works is not None:
            raise RuntimeError("RingShift.start called twice without finish")
        if self._spare is None:
            self._spare = self.current.new_empty(self.current.shape)
        self._works = self.comm.send_recv(self.current, self._spare)

    def finish(self) -> Tensor:
        """Wait for the transfer; the received buffer becomes ``current``."""
        if self.comm.world_size == 1:
            return self.current
        if self._works is None:
            raise RuntimeError("RingShift.finish called without start")
        self.comm.wait(self._works, self.what)
        self._works = None
        self.current, self._spare = self._spare, self.current
        return self.current


def check_agreement(comm: RingComm, names: tuple[str, ...], facts: list[int] | None, device: torch.device,
                    decode: Callable[[str, int], object], explain: Callable[[list[dict]], str]) -> None:
    """Raise the same ValueError on every rank unless all ranks of ``comm`` hold the same ``facts`` (one int64
    code per name of ``names``); ``facts=None``: this rank refused its inputs (it raises its own error; the
    others learn it here and raise at once).

    One ``all_gather`` of ``1 + len(names)`` int64 per rank on ``device`` (CPU for gloo, CUDA for NCCL, where
    reading the result back is one host synchronisation). The message names what differs and which ranks hold
    which value (``decode(name, code)``), then ``explain(rows)``, ``rows`` every rank's decoded facts."""
    row = [1, *facts] if facts is not None else [0] * (1 + len(names))
    table = comm.all_gather(torch.tensor(row, dtype=torch.int64, device=device), "the shapes of their shards")
    table = table.tolist()
    if facts is None:
        return
    refused = [r for r, t in enumerate(table) if not t[0]]
    if refused:
        their = "its" if len(refused) == 1 else "their"
        raise ValueError(f"{comm.who}: {ranks_text(refused)} of the group refused {their} inputs (see the error "
                         f"raised there), so every rank stops")
    differ = [i for i, _ in enumerate(names) if len({t[1 + i] for t in table}) > 1]
    if not differ:
        return
    rows = [dict(zip(names, (decode(name, c) for name, c in zip(names, t[1:])))) for t in table]
    what = "; ".join(f"{names[i]}: {by_rank([r[names[i]] for r in rows])}" for i in differ)
    raise ValueError(f"{comm.who}: the {len(table)} ranks of the group disagree on {what}. {explain(rows)}")


def shard_shapes(rows: list[dict], length: str = "L") -> str:
    """``by_rank`` of each rank's q / k / v shapes from its decoded agreement facts (``"batch size"``, ``"query
    heads"``, ``"key/value heads"``, ``"head_dim"``, ``"value head_dim"``, ``"dtype"``); ``length``: the name of
    the fact holding the shard length, or a letter when the lengths may differ."""
    def shapes(r: dict) -> str:
        n = r.get(length, length)
        return (f"q [{r['batch size']}, {r['query heads']}, {n}, {r['head_dim']}], k [{r['batch size']}, "
                f"{r['key/value heads']}, {n}, {r['head_dim']}], v [{r['batch size']}, {r['key/value heads']}, {n}, "
                f"{r['value head_dim']}] ({r['dtype']})")
    return by_rank([shapes(r) for r in rows])


def ranks_text(ranks: list[int]) -> str:
    """``"rank 3"``, ``"ranks 0, 2"``, ``"ranks 0-5, 7"``."""
    runs, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None]):
        if b != a + 1:
            runs.append(str(a) if a == start else f"{start}-{a}")
            start = b
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def by_rank(values: list) -> str:
    """``"4 on ranks 0, 2 vs 8 on rank 1"``: each value and the ranks holding it, in order of first rank."""
    holders: dict = {}
    for r, x in enumerate(values):
        holders.setdefault(x, []).append(r)
    return " vs ".join(f"{x} on {ranks_text(rs)}" for x, rs in holders.items())


__all__ = ["RingComm", "RingShift", "RingCommError", "check_agreement", "by_rank", "ranks_text", "shard_shapes"]
