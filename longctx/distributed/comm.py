"""A ring communicator: every rank sends a buffer to the next rank and receives one from the previous rank.

``RingShift`` passes one buffer around the ring with two slots (double buffering): ``start()`` posts the
send of the current slot and the receive into the spare one (``batch_isend_irecv``), the caller computes
on the current slot meanwhile, and ``finish()`` waits and swaps the slots. On CUDA the transfer runs on
NCCL's stream, ordered after the work already queued, so the next buffer arrives while the current one is
being used. A failed or timed-out transfer (a peer that raised, died or hangs) raises ``RingCommError``.
``RingComm.all_gather`` is the one collective: every rank's small tensor, for the ranks to check agreement.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class RingCommError(RuntimeError):
    """A ring transfer failed: a peer raised, died, or did not answer within the process group's timeout."""


class RingComm:
    """The ring over the ranks of ``group`` (default: the default process group; one rank when
    ``torch.distributed`` is not initialised)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
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
        comm.group, comm.rank, comm.world_size = None, 0, 1
        return comm

    def send_recv(self, send: Tensor, recv: Tensor) -> list:
        """Post: ``send`` to the next rank, ``recv`` from the previous one. Returns the pending works."""
        ops = [dist.P2POp(dist.isend, send, self.next_rank, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group)]
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
                f"ring attention: rank {self.rank} of {self.world_size} could not gather {what} from the other "
                f"ranks: a peer raised, died or timed out ({type(e).__name__}: {e})") from e
        return torch.stack(parts)

    def wait(self, works: list, what: str) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:  # gloo and NCCL report peer failures and timeouts as RuntimeError subclasses
            raise RingCommError(
                f"ring attention: rank {self.rank} of {self.world_size} could not exchange {what} with ranks "
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


__all__ = ["RingComm", "RingShift", "RingCommError"]
