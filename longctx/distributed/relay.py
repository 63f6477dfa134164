"""What a sharded fixed-state mechanism sends between neighbouring ranks (contiguous layout, ranks in sequence
order), forward and backward, through ``RingComm.post``:

* ``relay_state(local, log_decay, comm)``: the state entering this rank's shard, an exclusive scan over the ranks
  of states that decay across each shard: ``I_0 = 0``, ``I_(r+1) = exp(a_r) I_r + X_r``. A sequential relay:
  rank ``r`` receives ``I_r`` from ``r - 1`` and sends ``I_(r+1)`` to ``r + 1``. Backward, rank ``r`` receives
  ``Λ_(r+1)`` (the whole gradient of the state leaving its shard, ``Λ_N = 0``) from ``r + 1`` and sends
  ``Λ_r = dI_r + exp(a_r) Λ_(r+1)`` to ``r - 1``; then ``dX_r = Λ_(r+1)`` and ``da_r = exp(a_r) <I_r, Λ_(r+1)>``.
  One state each way per rank, whatever the shard length.
* ``exchange_halo(tail, comm)``: the previous rank's last tokens (a sliding window's), all ranks at once; their
  gradients go back to the rank that owns them.

A peer that raised, died or hangs makes the waiting rank raise ``RingCommError`` (bounded by the group's timeout).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .comm import RingComm


class _StateRelay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, log_decay: Tensor, comm: RingComm) -> Tensor:
        incoming = torch.zeros_like(local, memory_format=torch.contiguous_format)
        if comm.rank > 0:
            comm.wait(comm.post(None, incoming), "the state entering its shard")
        if comm.rank < comm.world_size - 1:
            leaving = torch.exp(log_decay)[..., None, None] * incoming + local
            comm.wait(comm.post(leaving.contiguous(), None), "the state leaving its shard")
        ctx.save_for_backward(incoming, log_decay)
        ctx.comm = comm
        return incoming

    @staticmethod
    def backward(ctx, grad_incoming: Tensor):
        incoming, log_decay = ctx.saved_tensors
        comm = ctx.comm
        grad_leaving = torch.zeros_like(incoming)
        if comm.rank < comm.world_size - 1:
            comm.wait(comm.post(None, grad_leaving, backward=True), "the gradient of the state leaving its shard")
        decay = torch.exp(log_decay)[..., None, None]
        if comm.rank > 0:
            grad = (grad_incoming + decay * grad_leaving).contiguous()
            comm.wait(comm.post(grad, None, backward=True), "the gradient of the state entering its shard")
        grad_log_decay = (decay * incoming * grad_leaving).sum((-2, -1))
        return grad_leaving, grad_log_decay, None


def relay_state(local: Tensor, log_decay: Tensor, comm: RingComm) -> Tensor:
    """The state entering this rank's shard, ``[B, H, M, N]`` (zeros on rank 0), from every rank's own shard
    state ``local [B, H, M, N]`` (what its shard leaves from zero) and log-decay across its shard
    ``log_decay [B, H]``. Differentiable in both; a collective of the whole group, in rank order."""
    return _StateRelay.apply(local, log_decay, comm)


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail: Tensor, comm: RingComm) -> Tensor:
        ctx.comm, ctx.shape = comm, tail.shape
        halo = tail.new_empty(tail.shape) if comm.rank > 0 else tail.new_empty(*tail.shape[:2], 0, tail.shape[3])
        send = tail.contiguous() if comm.rank < comm.world_size - 1 else None
        comm.wait(comm.post(send, halo if comm.rank > 0 else None), "the last tokens of its shard")
        return halo

    @staticmethod
    def backward(ctx, grad_halo: Tensor):
        comm = ctx.comm
        grad_tail = grad_halo.new_zeros(ctx.shape)
        send = grad_halo.contiguous() if comm.rank > 0 else None
        recv = grad_tail if comm.rank < comm.world_size - 1 else None
        comm.wait(comm.post(send, recv, backward=True), "the gradient of the last tokens of its shard")
        return grad_tail, None


def exchange_halo(tail: Tensor, comm: RingComm) -> Tensor:
    """The previous rank's ``tail [B, H, W, X]`` (its shard's last ``W`` tokens), ``[B, H, 0, X]`` on rank 0, from
    this rank's own ``tail``: every rank sends to the next at once. Differentiable: the halo's gradient is added to
    the previous rank's ``tail``. A collective of the whole group."""
    return _Halo.apply(tail, comm)


__all__ = ["relay_state", "exchange_halo"]
