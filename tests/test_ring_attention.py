"""Ring attention on CPU with gloo: world sizes 1-4 spawned here, each rank's output and q/k/v gradients
compared with exact single-process attention (float64 autograd oracle) on fresh random inputs; the layout
helpers; clear errors for bad lengths; a rank that raises, dies or hangs makes the others fail in bounded time.

One spawn per world size runs every case (spawning is the slow part); the tests then read its results.
The helpers ``run_ranks`` and ``rank_inputs`` are shared with ``test_ring_gpt.py``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import rel_err
from longctx.attention import attention, attention_reference
from longctx.distributed import (RingCommError, gather, local_positions, required_multiple, ring_attention, shard,
                                 unshard)
from longctx.distributed.ring import block_kind, kernel_runs

JOB_TIMEOUT_S = 120     # wall-clock bound for one spawned job, start-up included
PG_TIMEOUT_S = 30       # the process group's own bound on any collective or point-to-point wait


# --- spawning ---------------------------------------------------------------------------------------------

def _rank_main(rank: int, world_size: int, tmp: str, job, kwargs: dict, pg_timeout: float) -> None:
    """Entry of one spawned rank: join the gloo group, run ``job(rank, world_size, **kwargs)``, and write
    ``{"ok", "result" | "error"}`` as JSON to ``tmp/rank{rank}.json``."""
    torch.set_num_threads(1)
    t0 = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout))
        status = {"ok": True, "result": job(rank, world_size, **kwargs)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        status = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    status["seconds"] = time.monotonic() - t0
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(status))
    if status["ok"] and dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(world_size: int, job, timeout: float = JOB_TIMEOUT_S, pg_timeout: float = PG_TIMEOUT_S,
              **kwargs) -> list[dict]:
    """Run ``job`` on ``world_size`` spawned gloo ranks; each rank's status dict, in rank order.

    A rank that wrote no status (it died, or outlived ``timeout`` and was killed) gets ``ok: False`` with
    the reason. The rendezvous is a file in a fresh temporary directory, so no port is fixed or shared.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, tmp, job, kwargs, pg_timeout), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        statuses = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                statuses.append({"ok": False, "error": f"rank {r} still running after {timeout} s: killed"})
                continue
            f = Path(tmp, f"rank{r}.json")
            statuses.append(json.loads(f.read_text()) if f.exists() else
                            {"ok": False, "error": f"rank {r} exited with code {p.exitcode} and no status"})
        return statuses


def results_of(statuses: list[dict]) -> list:
    """The ranks' results; fails with every failing rank's error and traceback."""
    bad = [f"rank {r}: {s['error']}\n{s.get('traceback', '')}" for r, s in enumerate(statuses) if not s["ok"]]
    if bad:
        pytest.fail("\n".join(bad))
    return [s["result"] for s in statuses]


# --- the cases each world size runs ------------------------------------------------------------------------

def _case(name, dtype="float64", causal=True, layout="zigzag", hq=4, hkv=2, d=64, per_rank=6, batch=2, docs=False):
    return dict(name=name, dtype=dtype, causal=causal, layout=layout, hq=hq, hkv=hkv, d=d, per_rank=per_rank,
                batch=batch, docs=docs)


CASES = [
    _case("f64 causal zigzag gqa"),
    _case("f64 causal contiguous gqa", layout="contiguous"),
    _case("f64 noncausal zigzag gqa", causal=False),
    _case("f64 noncausal contiguous mha", causal=False, layout="contiguous", hq=2, hkv=2),
    _case("f64 causal zigzag mha d128", hq=2, hkv=2, d=128, per_rank=4),
    _case("f64 causal zigzag mqa odd chunk", hq=4, hkv=1, per_rank=10),
    _case("f32 causal zigzag gqa", dtype="float32", per_rank=8),
    _case("f32 causal contiguous gqa", dtype="float32", layout="contiguous", per_rank=8),
    _case("f32 noncausal zigzag gqa", dtype="float32", causal=False),
    _case("f32 noncausal contiguous gqa", dtype="float32", causal=False, layout="contiguous"),
    _case("f64 causal zigzag gqa packed", docs=True, per_rank=10),
    _case("f64 causal contiguous mqa packed", layout="contiguous", hq=4, hkv=1, docs=True, per_rank=7),
    _case("f32 noncausal zigzag gqa packed", dtype="float32", causal=False, docs=True),
]
# measured over 6 seeds, world sizes 1-4, every rank: float64 <= 1.6e-15 (dq), float32 <= 4.6e-7 (float32 blocks
# merged against the float64 oracle; out, dq, dk, dv)
TOL = {"float64": 2e-14, "float32": 2e-6}


def rank_inputs(seed: int, shape_q, shape_kv, dtype=torch.float64):
    """The same random full-sequence ``q, k, v, dout`` on every rank (seeded), in float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(*shape_kv, generator=g, dtype=torch.float64)
    v = torch.randn(*shape_kv, generator=g, dtype=torch.float64)
    dout = torch.randn(*shape_q, generator=g, dtype=torch.float64)
    return q, k, v, dout


def packed_documents(seed: int, batch: int, total: int) -> torch.Tensor:
    """``[B, T]`` document numbers: each row cut at 3 random places (documents of any length, 1 included)."""
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.zeros(batch, total, dtype=torch.int64)
    for b in range(batch):
        starts[b, torch.randperm(total - 1, generator=g)[:3] + 1] = 1
    return starts.cumsum(1)


def masked_reference(q, k, v, docs, causal):
    """Float64 softmax attention where a query sees the keys of its own document (and, causal, not later)."""
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    mask = docs[:, :, None] == docs[:, None, :]
    if causal:
        mask &= torch.ones(mask.shape[1:], dtype=torch.bool).tril()
    return scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 1)


def _run_case(rank: int, world_size: int, case: dict, seed: int) -> dict:
    """Ring attention on this rank's shard vs the float64 oracle on the full sequence: relative errors."""
    dt, lay = getattr(torch, case["dtype"]), case["layout"]
    T = case["per_rank"] * world_size
    B, hq, hkv, d = case["batch"], case["hq"], case["hkv"], case["d"]
    q, k, v, dout = rank_inputs(seed, (B, hq, T, d), (B, hkv, T, d))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    docs = packed_documents(seed, B, T) if case["docs"] else None
    if docs is None:
        ref_out, _ = attention_reference(*ref_in, causal=case["causal"])
    else:
        ref_out = masked_reference(*ref_in, docs, case["causal"])
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)

    local = [shard(t, world_size, rank, lay).to(dt).requires_grad_() for t in (q, k, v)]
    local_docs = shard(docs, world_size, rank, lay, dim=1) if docs is not None else None
    out = ring_attention(*local, causal=case["causal"], layout=lay, document_ids=local_docs)
    grads = torch.autograd.grad(out, local, shard(dout, world_size, rank, lay).to(dt))
    err = {"out": rel_err(out, shard(ref_out, world_size, rank, lay)),
           "gathered": rel_err(gather(out.detach(), layout=lay), ref_out)}
    for name, gr, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        err[name] = rel_err(gr, shard(rg, world_size, rank, lay))
        err[name + "_dtype_ok"] = gr.dtype == dt
    err["out_dtype_ok"] = out.dtype == dt
    return err


def _bad_length(rank: int, world_size: int) -> dict:
    """A zigzag shard whose total length is not a multiple of 2 * world_size: the error, on every rank."""
    q = torch.randn(1, 2, 3, 8)
    try:
        ring_attention(q, q, q, layout="zigzag")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def all_cases_job(rank: int, world_size: int, seed: int) -> dict:
    res = {c["name"]: _run_case(rank, world_size, c, seed + i) for i, c in enumerate(CASES)}
    res["bad length"] = _bad_length(rank, world_size)
    return res


def spawned_per_world_size(job, **kwargs):
    """``get(world_size) -> (per-rank results of job, seed)``: each world size spawned once, when first asked, with
    a fresh seed (from the test's seeded generator) passed to ``job`` as ``seed=``."""
    cache: dict[int, tuple] = {}

    def get(world_size: int):
        if world_size not in cache:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            cache[world_size] = (results_of(run_ranks(world_size, job, seed=seed, **kwargs)), seed)
        return cache[world_size]
    return get


@pytest.fixture(scope="module")
def ring_runs():
    """World size -> (per-rank results of every case, seed)."""
    return spawned_per_world_size(all_cases_job)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ring_matches_exact_attention(ring_runs, world_size, case):
    results, seed = ring_runs(world_size)
    tol = TOL[case["dtype"]]
    for rank, res in enumerate(results):
        e = res[case["name"]]
        msg = f"rank {rank} of {world_size}, seed {seed}: {e}"
        assert max(e["out"], e["gathered"], e["dq"], e["dk"], e["dv"]) < tol, msg
        assert e["out_dtype_ok"] and e["dq_dtype_ok"] and e["dk_dtype_ok"] and e["dv_dtype_ok"], msg


@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_length_names_the_multiple(ring_runs, world_size):
    results, _ = ring_runs(world_size)
    for res in results:
        assert res["bad length"]["error"] is not None
        assert f"multiple of 2 * world_size = {2 * world_size}" in res["bad length"]["error"]


# --- single process ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_layout_round_trip_and_positions(layout, world_size, gen):
    T = 2 * world_size * 5
    x = torch.randn(2, 3, T, 4, generator=gen)
    parts = [shard(x, world_size, r, layout) for r in range(world_size)]
    assert torch.equal(unshard(parts, layout), x)
    pos = torch.cat([local_positions(T, world_size, r, layout) for r in range(world_size)])
    assert torch.equal(pos.sort().values, torch.arange(T))          # every token exactly once
    for r, p in enumerate(parts):
        assert torch.equal(p, x[:, :, local_positions(T, world_size, r, layout)])
    if layout == "zigzag":
        c = T // (2 * world_size)
        assert local_positions(T, world_size, 0, layout).tolist() == list(range(c)) + list(range(T - c, T))


def test_zigzag_schedule_balances_causal_work():
    """Per rank: the diagonal block plus one half block per other rank; the halves cover exactly the
    visible (query, key) pairs of the full causal mask."""
    n, c = 4, 3
    T = 2 * n * c
    visible = torch.zeros(T, T, dtype=torch.int64)
    for rank in range(n):
        qpos = local_positions(T, n, rank)
        for step in range(n):
            src = (rank - step) % n
            kpos = local_positions(T, n, src)
            kind = block_kind(step, rank, n, True, "zigzag")
            qp = qpos[c:] if kind == "q_hi" else qpos
            kp = kpos[:c] if kind == "kv_lo" else kpos
            block = (kp[None, :] <= qp[:, None]) if kind == "diag" else torch.ones(len(qp), len(kp), dtype=torch.bool)
            assert kind == "diag" or bool((kp[None, :] <= qp[:, None]).all()), "an unmasked block hides a mask"
            visible[qp[:, None], kp[None, :]] += block.long()
    assert torch.equal(visible, torch.tril(torch.ones(T, T, dtype=torch.int64)))


@pytest.mark.parametrize("causal", [True, False])
def test_single_process_is_exact_attention_and_gradchecks(causal, gen):
    """Without torch.distributed the ring is one rank: exact attention, and gradcheck passes in float64."""
    q = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    # measured exactly 0 over 8 seeds (one rank runs the same attention call); 1e-14 allows a float64 merge
    assert rel_err(ring_attention(q, k, v, causal=causal), attention(q, k, v, causal=causal)) < 1e-14
    assert torch.autograd.gradcheck(lambda a, b, c: ring_attention(a, b, c, causal=causal), (q, k, v))


def test_bad_arguments_are_named():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="k and v of one shape"):
        ring_attention(q, q, q[..., :8])
    with pytest.raises(ValueError, match="kernel must be one of"):
        ring_attention(q, q, q, kernel="magic")
    with pytest.raises(ValueError, match="does not run on device cpu"):
        ring_attention(q, q, q, kernel="flash")
    with pytest.raises(ValueError, match="multiple of 2 \\* world_size = 8"):
        shard(torch.randn(1, 1, 12, 2), 4, 0)
    assert required_multiple(4, "contiguous") == 4
    assert kernel_runs("cpu", torch.device("cpu"), torch.float32, 4, 2, 16)
    assert not kernel_runs("flash", torch.device("cpu"), torch.float32, 4, 2, 16)   # probed, not crashed


# --- failures: bounded, with a clear error ------------------------------------------------------------------

def _failing_job(rank: int, world_size: int, how: str) -> dict:
    """Rank 1 fails (``how``: raise, exit, hang) before its ring call; rank 0 calls ring attention.

    Both ranks first meet at a barrier: a rank that exits while the other is still connecting the group fails
    ``init_process_group`` on its peer, which is not the failure under test.
    """
    dist.barrier()
    if rank == 1:
        if how == "raise":
            raise RuntimeError("planted failure on rank 1")
        if how == "exit":
            os._exit(3)
        time.sleep(5)                       # longer than the process group's timeout
        raise RuntimeError("rank 1 woke up after hanging")
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q).sum().backward()
    except RingCommError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None}


@pytest.mark.parametrize("how", ["raise", "exit", "hang"])
def test_a_failing_rank_makes_the_others_fail_in_bounded_time(how):
    t0 = time.monotonic()
    statuses = run_ranks(2, _failing_job, timeout=60, pg_timeout=2, how=how)
    elapsed = time.monotonic() - t0
    assert not statuses[1]["ok"]
    assert statuses[0]["ok"], statuses[0]
    res = statuses[0]["result"]
    assert res["error"] is not None and "a peer raised, died or timed out" in res["error"], res
    assert res["seconds"] < 10, res
    assert elapsed < 60
