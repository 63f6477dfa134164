"""longctx inside transformers: exact and ring attention as ``attn_implementation`` names, and sequence-parallel
training of any causal LM whose attention goes through transformers' ``AttentionInterface`` (Llama, Qwen2, …).

    import longctx.hf                               # registers "longctx" and "longctx_ring"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="longctx_ring")
    sp = longctx.hf.SequenceParallel()              # under torchrun: the default group
    inputs, targets = sp.shard(input_ids)
    loss = sp.loss(model(**inputs).logits, targets)

``attention.py``: the attention functions; ``sequence_parallel.py``: sharding rows, the loss, the gradients.
"""
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import EXACT, RING, RingGroup, exact_attention, no_mask, sharded_attention
from .sequence_parallel import SequenceParallel, document_ids, positions_in_documents


def register() -> None:
    """Register ``"longctx"`` and ``"longctx_ring"`` (and their mask function) with transformers (done on import;
    idempotent)."""
    AttentionInterface.register(EXACT, exact_attention)
    AttentionInterface.register(RING, sharded_attention)
    for name in (EXACT, RING):
        AttentionMaskInterface.register(name, no_mask)


register()

__all__ = ["EXACT", "RING", "RingGroup", "SequenceParallel", "document_ids", "exact_attention",
           "positions_in_documents", "register", "sharded_attention"]
