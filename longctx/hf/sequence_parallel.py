"""Sequence-parallel training of a transformers causal LM: each rank of a group runs the model on its shard.

    sp = SequenceParallel(group)                        # every rank of ``group`` does the same
    inputs, targets = sp.shard(input_ids, labels=labels, document_ids=docs)   # full rows in, this rank's part out
    logits = model(**inputs).logits                     # model loaded with attn_implementation="longctx_ring"
    loss = sp.loss(logits, targets)                     # token-weighted mean over the whole rows (all ranks)
    # long shards: sp.hidden_loss(model.get_output_embeddings(), model.get_decoder()(**inputs).last_hidden_state,
    # targets), the same loss in slices, never the whole logits
    loss.backward()
    sp.reduce_gradients(model)                          # sum of the ranks' parts: the unsharded model's gradients

``shard`` shifts the labels on the full rows (so the last token of a shard still predicts the first of the
next), ignores the label that would cross a document boundary, pads each row at its end to a multiple of the
layout's unit (``2 * world_size`` for zigzag; at most ``2 * world_size - 1`` tokens, ignored by the loss and,
being last, unseen by every real token), gives every token its global position (within its document when
packed) and hands out this rank's part. ``loss`` returns the global mean's value; its gradient is this rank's
share, so the summed gradients equal the unsharded model's. Data parallelism composes on another group: wrap
the model in DDP (or FSDP2) over the data-parallel group as usual and call ``reduce_gradients`` after
``backward`` (a sum over the sequence group and a mean over the data group commute).

Before sharding, the ranks check with one small ``all_gather`` that they hold the same rows (shape and a
checksum of ids, labels, positions and documents): every rank raises the same error otherwise.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..distributed.layout import required_multiple, shard
from .attention import RingGroup

IGNORE = -100


def document_ids(position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
                 length: int | None = None) -> Tensor:
    """Document number of every token of packed rows: from ``position_ids [B, T]`` (a document starts where the
    position does not grow by one) or from ``cu_seqlens [n + 1]`` (one row of ``length`` tokens, flash-attention's
    cumulative lengths: ``0, len_0, len_0 + len_1, …``). Returns int64 ``[B, T]`` (``[1, length]``)."""
    if (position_ids is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of position_ids and cu_seqlens")
    if position_ids is not None:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, tokens], got shape {tuple(position_ids.shape)}")
        starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return F.pad(starts.long().cumsum(1), (1, 0))
    cu = cu_seqlens.long().cpu()
    length = int(cu[-1]) if length is None else length
    if cu.dim() != 1 or cu[0] != 0 or (cu[1:] < cu[:-1]).any() or cu[-1] != length:
        raise ValueError(f"cu_seqlens must rise from 0 to the row length {length}, got {cu.tolist()}")
    return torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())[None].to(cu_seqlens.device)


def positions_in_documents(docs: Tensor) -> Tensor:
    """``[B, T]``: each token's position counted from the start of its document."""
    t = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    starts = F.pad(docs[:, 1:] != docs[:, :-1], (1, 0), value=True)
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(1).values
    return t - first


class SequenceParallel:
    """Split rows over the ranks of ``group`` (None: the default group; a single process when
    ``torch.distributed`` is not initialised) in ``layout`` for a model using ``"longctx_ring"``."""

    def __init__(self, group: dist.ProcessGroup | None = None, layout: str = "zigzag"):
        self.ring = RingGroup(group, layout)
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1

    def shard(self, input_ids: Tensor, labels: Tensor | None = None, position_ids: Tensor | None = None,
              document_ids: Tensor | None = None, pad_id: int = 0) -> tuple[dict, Tensor]:
        """``(inputs, targets)``: ``inputs`` for ``model(**inputs)`` (``input_ids``, ``position_ids``, ``ring``
        and, for packed rows, ``document_ids``: this rank's part) and ``targets [B, L]`` for :meth:`loss`.

        ``input_ids [B, T]``: the full rows, the same on every rank. ``labels`` default to ``input_ids``
        (next-token prediction; ``-100`` is ignored). Packed rows: ``document_ids [B, T]`` (see
        :func:`document_ids`); positions then restart in every document unless ``position_ids`` are given."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
        labels = input_ids if labels is None else labels
        for name, t in (("labels", labels), ("position_ids", position_ids), ("document_ids", document_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (positions_in_documents(document_ids) if document_ids is not None
                            else torch.arange(T, device=input_ids.device).expand(B, T))
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        if document_ids is not None:
            targets = targets.masked_fill(F.pad(document_ids[:, 1:] != document_ids[:, :-1], (0, 1)), IGNORE)
        self._check_same_rows(input_ids, targets, position_ids, document_ids)
        pad = -T % required_multiple(self.world_size, self.ring.layout)
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=pad_id)
            targets = F.pad(targets, (0, pad), value=IGNORE)
            last = position_ids[:, -1:]
            position_ids = torch.cat([position_ids, last + torch.arange(1, pad + 1, device=last.device)], 1)
            if document_ids is not None:            # the padding is a document of its own
                document_ids = F.pad(document_ids, (0, pad), value=int(document_ids.max()) + 1)
        part = lambda x: shard(x, self.world_size, self.rank, self.ring.layout, dim=1)  # noqa: E731
        inputs = {"input_ids": part(input_ids), "position_ids": part(position_ids), "ring": self.ring}
        if document_ids is not None:
            inputs["document_ids"] = part(document_ids.long())
        return inputs, part(targets)

    def _check_same_rows(self, input_ids: Tensor, targets: Tensor, position_ids: Tensor,
                         document_ids: Tensor | None) -> None:
        """Every rank must shard the same rows: one all_gather of shape and checksums."""
        if self.world_size == 1:
            return
        weights = torch.arange(1, input_ids.numel() + 1, device=input_ids.device).view_as(input_ids)
        sums = [int((x.long() * weights).sum()) if x is not None else -1
                for x in (input_ids, targets, position_ids, document_ids)]
        row = torch.tensor([*input_ids.shape, *sums], dtype=torch.int64, device=input_ids.device)
        table = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(table, row, group=self.ring.group)
        names = ("batch", "tokens", "input_ids", "labels", "position_ids", "document_ids")
        differ = [n for i, n in enumerate(names) if len({int(t[i]) for t in table}) > 1]
        if differ:
            raise ValueError(f"SequenceParallel.shard: the {self.world_size} ranks hold different rows "
                             f"({', '.join(differ)} differ); every rank must pass the same full rows and shard them "
                             "itself")

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy (float32) of this rank's ``logits [B, L, V]`` against ``targets [B, L]``, as a share of
        the mean over every rank's counted tokens: the value returned is the global mean, the gradient this
        rank's part of it."""
        total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return self._global_mean(total, targets)

    def hidden_loss(self, head: torch.nn.Module, hidden: Tensor, targets: Tensor, chunk: int = 8192) -> Tensor:
        """:meth:`loss` of ``head(hidden)`` without ever holding the whole ``[B, L, V]`` logits: ``hidden
        [B, L, W]`` (the last hidden states, ``model.get_decoder()(**inputs).last_hidden_state``; ``head`` is
        ``model.get_output_embeddings()``) in slices of ``chunk`` tokens, each slice's logits recomputed in the
        backward (checkpointing). The same value and gradients as ``loss(head(hidden), targets)``, for models whose
        logits are ``head(hidden)`` (Llama, SmolLM2, Mistral, Qwen; not one that rescales or caps its logits
        after the head). On an H100 a 64K-token SmolLM2 step fits with it and not without
        (``benchmarks/hf_ring_overhead.py``)."""
        if hidden.shape[:2] != targets.shape:
            raise ValueError(f"hidden [B, L, W] and targets [B, L] must agree, got {tuple(hidden.shape)} and "
                             f"{tuple(targets.shape)}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")

        def piece(h: Tensor, t: Tensor) -> Tensor:
            return F.cross_entropy(head(h).float().flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction="sum")

        total = sum((checkpoint(piece, hidden[:, s:s + chunk], targets[:, s:s + chunk], use_reentrant=False)
                     for s in range(0, hidden.shape[1], chunk)), hidden.new_zeros((), dtype=torch.float32))
        return self._global_mean(total, targets)

    def _global_mean(self, total: Tensor, targets: Tensor) -> Tensor:
        """``total`` (this rank's summed loss) over the count of every rank's counted tokens; the value is the
        global mean, the gradient this rank's share."""
        stats = torch.stack([total.detach(), (targets != IGNORE).sum().to(total.dtype)])
        if self.world_size > 1:
            dist.all_reduce(stats, group=self.ring.group)
        count = stats[1].clamp_min(1)
        return (total + (stats[0] - total.detach())) / count

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the group (after ``backward``): the unsharded model's gradient."""
        if self.world_size == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.ring.group)
