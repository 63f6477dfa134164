"""Ranks that disagree are refused: every rank of a gloo group raises the same clear ValueError, in bounded
time, when the ranks' shards differ in dtype, shape or length or they ask for different attention; a rank
that refuses its own inputs makes the others raise too; matching shards still give exact attention, with
one small collective per forward call and none in the backward; a group of one needs no collective.

One spawn per world size runs every probe in turn (spawning is the slow part) on the same group, so each
probe also shows that the group is still usable after the errors before it. A hang is bounded twice: the
process group's timeout turns a stuck collective into an error within ``PG_TIMEOUT_S``, and ``run_ranks``
kills the ranks after ``JOB_TIMEOUT_S``.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import attempt, rel_err
from longctx.attention import attention_reference
from longctx.distributed import ring_attention, shard
from longctx.distributed.comm import by_rank
from test_ring_attention import rank_inputs, results_of, run_ranks

JOB_TIMEOUT_S = 90
PG_TIMEOUT_S = 10
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "gather", "all_to_all")


def _count_collectives() -> list[int]:
    """From now on, in this process: the bytes each rank contributes to each collective, one entry per call."""
    calls: list[int] = []
    for name in COLLECTIVES:
        fn = getattr(dist, name)

        def counting(*args, _fn=fn, _name=name, **kwargs):
            t = args[1] if _name in ("all_gather", "all_gather_into_tensor", "gather") else args[0]
            t = t[0] if isinstance(t, list) else t
            calls.append(t.numel() * t.element_size())
            return _fn(*args, **kwargs)
        setattr(dist, name, counting)
    return calls


def _mismatch_probes(rank: int) -> dict:
    """Name -> the ring call of this rank; rank 1 is the odd one out in each."""
    odd = rank == 1

    def call(shape_q, shape_kv=None, dtype=torch.float32, **kw):
        q = torch.randn(shape_q, dtype=dtype)
        k = torch.randn(shape_kv or shape_q, dtype=dtype)
        return lambda: ring_attention(q, k, k.clone(), **kw)

    return {
        "dtype": call((1, 2, 8, 16), dtype=torch.float64 if odd else torch.float32),
        # same number of elements, different geometry: the transfers fit, the result would be wrong
        "shape": call((1, 8, 4, 16) if odd else (1, 4, 8, 16)),
        "length": call((1, 2, 4 if odd else 8, 16)),
        "kv heads": call((1, 4, 8, 16), (1, 1 if odd else 2, 8, 16)),
        "causal": call((1, 2, 8, 16), causal=not odd),
        "layout": call((1, 2, 8, 16), layout="contiguous" if odd else "zigzag"),
        "scale": call((1, 2, 8, 16), scale=0.5 if odd else None),
        # agree, but the shard length does not fit the zigzag layout (2 * world_size chunks)
        "zigzag fit": call((1, 2, 3, 16)),
        # rank 1 refuses its own inputs (k and v of different shapes) before any transfer
        "refused": (lambda: ring_attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16),
                                           torch.randn(1, 2, 8, 8))) if odd else call((1, 2, 8, 16)),
    }


def _exact_job(rank: int, world_size: int, seed: int, calls: list[int]) -> dict:
    """Matching float64 shards: ring attention vs the float64 oracle; collectives of forward and backward."""
    B, hq, hkv, d, T = 2, 4, 2, 16, 4 * world_size
    q, k, v, dout = rank_inputs(seed, (B, hq, T, d), (B, hkv, T, d))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_reference(*ref_in, causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    local = [shard(t, world_size, rank, "zigzag").requires_grad_() for t in (q, k, v)]
    before = len(calls)
    out = ring_attention(*local)
    forward_calls = calls[before:]
    grads = torch.autograd.grad(out, local, shard(dout, world_size, rank, "zigzag"))
    errs = [rel_err(out, shard(ref_out, world_size, rank, "zigzag"))]
    errs += [rel_err(g, shard(rg, world_size, rank, "zigzag")) for g, rg in zip(grads, ref_grads)]
    return {"err": max(errs), "forward_bytes": forward_calls, "backward_bytes": calls[before + len(forward_calls):]}


def _group_of_one_job(rank: int, seed: int, calls: list[int]) -> dict:
    """Each rank alone in a group of its own: plain exact attention on its whole sequence, no collective."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]   # every rank creates every group
    q, k, v, _ = rank_inputs(seed + rank, (1, 2, 6, 8), (1, 1, 6, 8))
    before = len(calls)
    out = ring_attention(q, k, v, group=groups[rank])
    return {"err": rel_err(out, attention_reference(q, k, v, causal=True)[0]), "bytes": calls[before:]}


def agreement_job(rank: int, world_size: int, seed: int) -> dict:
    torch.manual_seed(seed + rank)
    calls = _count_collectives()
    res = {}
    for name, fn in _mismatch_probes(rank).items():
        res[name] = attempt(fn)
    res["exact"] = _exact_job(rank, world_size, seed, calls)
    res["group of one"] = _group_of_one_job(rank, seed, calls)
    return res


@pytest.fixture(scope="module")
def agreement_runs():
    """World size -> (per-rank results of every probe, seed); each world size spawned once, lazily."""
    cache: dict[int, tuple] = {}

    def get(world_size: int):
        if world_size not in cache:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            statuses = run_ranks(world_size, agreement_job, timeout=JOB_TIMEOUT_S, pg_timeout=PG_TIMEOUT_S, seed=seed)
            cache[world_size] = (results_of(statuses), seed)
        return cache[world_size]
    return get


def _same_value_error_everywhere(results: list[dict], probe: str) -> str:
    errs = [res[probe] for res in results]
    for rank, e in enumerate(errs):
        assert e["type"] == "ValueError", f"rank {rank}: {e}"
        assert e["seconds"] < PG_TIMEOUT_S, f"rank {rank} waited for the group's timeout: {e}"
    assert len({e["error"] for e in errs}) == 1, f"the ranks raised different errors: {errs}"
    return errs[0]["error"]


WORLD_SIZES = [2, 3]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mismatched_dtype_is_named_on_every_rank(agreement_runs, world_size):
    msg = _same_value_error_everywhere(agreement_runs(world_size)[0], "dtype")
    assert "dtype" in msg and "torch.float32" in msg and "torch.float64" in msg, msg
    assert "torch.float64 on rank 1" in msg, msg


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_same_numel_different_shapes_are_named(agreement_runs, world_size):
    msg = _same_value_error_everywhere(agreement_runs(world_size)[0], "shape")
    assert "[1, 4, 8, 16]" in msg and "[1, 8, 4, 16]" in msg, msg
    assert "query heads" in msg and "shard length" in msg, msg


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("probe, words", [("length", ["shard length", "8 on rank", "4 on rank 1"]),
                                          ("kv heads", ["key/value heads", "[1, 1, 8, 16]"]),
                                          ("causal", ["causal", "False on rank 1"]),
                                          ("layout", ["layout", "'contiguous' on rank 1"]),
                                          ("scale", ["scale", "0.5 on rank 1"])])
def test_other_disagreements_are_named(agreement_runs, world_size, probe, words):
    msg = _same_value_error_everywhere(agreement_runs(world_size)[0], probe)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_agreeing_shards_that_do_not_fit_the_layout_are_refused_alike(agreement_runs, world_size):
    msg = _same_value_error_everywhere(agreement_runs(world_size)[0], "zigzag fit")
    assert f"multiple of 2 * world_size = {2 * world_size}" in msg, msg


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_rank_refusing_its_inputs_stops_the_others(agreement_runs, world_size):
    results = agreement_runs(world_size)[0]
    own = results[1]["refused"]
    assert own["type"] == "ValueError" and "k and v of one shape" in own["error"], own
    for rank, res in enumerate(results):
        if rank != 1:
            e = res["refused"]
            assert e["type"] == "ValueError" and "rank 1" in e["error"] and "refused" in e["error"], e
            assert e["seconds"] < PG_TIMEOUT_S, e


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_matching_shards_are_exact_with_one_small_collective(agreement_runs, world_size):
    results, seed = agreement_runs(world_size)
    for rank, res in enumerate(results):
        e = res["exact"]
        # float64 ring merge against the float64 oracle (out, dq, dk, dv): measured <= 9.2e-16 over 6 seeds
        assert e["err"] < 1e-14, (rank, seed, e)
        assert len(e["forward_bytes"]) == 1 and e["forward_bytes"][0] <= 128, e    # one all_gather, <= 16 int64
        assert e["backward_bytes"] == [], e                                        # the backward reuses it


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_group_of_one_works_without_a_collective(agreement_runs, world_size):
    results, seed = agreement_runs(world_size)
    for rank, res in enumerate(results):
        # float64, one block of 6 keys: measured <= 2.1e-16 over 6 seeds
        assert res["group of one"]["err"] < 2e-15, (rank, seed, res["group of one"])
        assert res["group of one"]["bytes"] == [], res["group of one"]


def test_rank_lists_are_short():
    assert by_rank([4, 8, 4]) == "4 on ranks 0, 2 vs 8 on rank 1"
    assert by_rank([2] * 6 + [1, 2]) == "2 on ranks 0-5, 7 vs 1 on rank 6"
