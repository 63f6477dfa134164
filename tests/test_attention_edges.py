"""The edges of longctx.attention: bad input refused with a message that names it, empty inputs, NaN and inf.

Values are compared with ``definition`` below (float64, IEEE arithmetic all the way, no row treated specially).
"""
import inspect
import itertools

import pytest
import torch

from longctx.attention import attention, attention_reference, merge_attention, sdpa
from conftest import rel_err, run_script

NAN, INF = float("nan"), float("inf")


def definition(q, k, v, causal, scale=None):
    """float64 ``(out, lse)`` of softmax attention as written on paper: ``lse_i = log sum_j exp(s_ij)`` and
    ``out_i = sum_j exp(s_ij - lse_i) v_j`` over the keys ``j`` that row ``i`` sees (bottom-right causal mask),
    with no special case: NaN and inf go where float arithmetic takes them, and a row with no key gives lse
    ``-inf`` and out 0 (an empty sum)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    tq, tk = q.shape[2], k.shape[2]
    sees = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        sees = torch.arange(tk)[None] <= torch.arange(tq)[:, None] + tk - tq
    s = s.masked_fill(~sees, -INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    terms = p[..., None] * v[:, :, None]                          # [B, H, Tq, Tk, Dv]
    return terms.where(sees[..., None], 0.0).sum(-2), lse          # a hidden key adds nothing, NaN or not


def qkv(gen, b=2, hq=4, hkv=2, tq=5, tk=7, d=8, dv=None, dtype=torch.float32):
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, tk, d if dv is None else dv, generator=gen, dtype=dtype)
    return q, k, v


# merge_attention ------------------------------------------------------------------------------------------------

def partial_results(gen, shape=(2, 3, 5, 4)):
    out_a, out_b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lse_a, lse_b = torch.randn(shape[:-1], generator=gen), torch.randn(shape[:-1], generator=gen)
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("change", [
    "out_b fewer rows", "out_b batch 1", "out_b other head_dim", "lse_b one row", "lse_b batch 1",
    "lses with head_dim 1", "lses without batch", "lses shaped as outs",
])
def test_merge_refuses_mismatched_shapes_naming_both(change, gen):
    """Every shape mismatch is a ValueError naming both shapes, broadcastable ones included (no broadcasting)."""
    out_a, lse_a, out_b, lse_b = partial_results(gen)
    if change == "out_b fewer rows":
        out_b, lse_b = out_b[:, :, :1], lse_b[:, :, :1]
    elif change == "out_b batch 1":
        out_b, lse_b = out_b[:1], lse_b[:1]
    elif change == "out_b other head_dim":
        out_b = out_b[..., :2]
    elif change == "lse_b one row":
        lse_b = lse_b[:, :, :1]
    elif change == "lse_b batch 1":
        lse_b = lse_b[:1]
    elif change == "lses with head_dim 1":
        lse_a, lse_b = lse_a[..., None], lse_b[..., None]
    elif change == "lses without batch":
        lse_a, lse_b = lse_a[0], lse_b[0]
    else:
        lse_a, lse_b = out_a.clone(), out_b.clone()
    pair = ((out_a, out_b) if out_a.shape != out_b.shape else (lse_a, lse_b) if lse_a.shape != lse_b.shape
            else (out_a, lse_a))
    with pytest.raises(ValueError) as err:
        merge_attention(out_a, lse_a, out_b, lse_b)
    for t in pair:
        assert str(tuple(t.shape)) in str(err.value)


@pytest.mark.parametrize("change,error,match", [
    ("out_b float64", TypeError, "float32 and torch.float64"),
    ("lse_b float64", TypeError, "float32 and torch.float64"),
    ("outs int64", TypeError, "floating point"),
    ("out_b on meta", ValueError, "device"),
    ("lse_a 3-D out 3-D", ValueError, "4-D"),
])
def test_merge_refuses_mismatched_dtypes_and_devices(change, error, match, gen):
    out_a, lse_a, out_b, lse_b = partial_results(gen)
    if change == "out_b float64":
        out_b = out_b.double()
    elif change == "lse_b float64":
        lse_b = lse_b.double()
    elif change == "outs int64":
        out_a, out_b = out_a.long(), out_b.long()
    elif change == "out_b on meta":
        out_b, lse_b = out_b.to("meta"), lse_b.to("meta")
    else:
        out_a, lse_a, out_b, lse_b = out_a[0], lse_a[0], out_b[0], lse_b[0]
    with pytest.raises(error, match=match):
        merge_attention(out_a, lse_a, out_b, lse_b)


def test_merge_keeps_mixed_out_and_lse_dtypes(gen):
    """A bf16 out with a float32 lse on each side (what fused kernels return) is a valid pair."""
    q, k, v = qkv(gen, tq=6, tk=10)
    ref_o, ref_l = definition(q, k, v, False)
    a = attention(q.bfloat16(), k[:, :, :4].bfloat16(), v[:, :, :4].bfloat16(), return_lse=True)
    b = attention(q.bfloat16(), k[:, :, 4:].bfloat16(), v[:, :, 4:].bfloat16(), return_lse=True)
    out, lse = merge_attention(*a, *b)
    assert rel_err(out, ref_o) < 2e-2 and rel_err(lse, ref_l) < 1e-2


# check_qkv, through every public edge -----------------------------------------------------------------------------

EDGES = {
    "attention": lambda q, k, v: attention(q, k, v),
    "attention lse": lambda q, k, v: attention(q, k, v, return_lse=True),
    "attention_reference": lambda q, k, v: attention_reference(q, k, v),
    "sdpa": lambda q, k, v: sdpa(q, k, v),
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("bad,error,match", [
    (lambda q, k, v: (q, k[:, :0], v[:, :0]), ValueError, r"at least one head.*\(2, 0, 5, 8\)"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, r"head_dim.*at least 1"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating point.*int64"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor, got list"),
    (lambda q, k, v: (q, k[0], v), ValueError, r"k must be 4-D.*\(2, 5, 8\)"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, r"query heads \(3\).*multiple of key/value heads \(2\)"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "one dtype.*float64"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device.*meta"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "agree in heads and seq"),
])
def test_bad_qkv_is_refused_by_name(edge, bad, error, match):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(error, match=match):
        EDGES[edge](*bad(q, k, v))


@pytest.mark.parametrize("edge", ["attention", "attention lse", "attention_reference", "sdpa"])
@pytest.mark.parametrize("scale", [NAN, INF, -INF, 0.0, -0.5, torch.tensor(NAN)])
def test_non_finite_or_non_positive_scale_is_refused(edge, scale, gen):
    q, k, v = qkv(gen)
    call = {"attention": lambda: attention(q, k, v, scale=scale),
            "attention lse": lambda: attention(q, k, v, scale=scale, return_lse=True),
            "attention_reference": lambda: attention_reference(q, k, v, scale=scale),
            "sdpa": lambda: sdpa(q, k, v, scale=scale)}[edge]
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        call()


@pytest.mark.parametrize("edge", ["attention", "attention lse", "attention_reference"])
def test_causal_must_be_a_bool(edge, gen):
    """``causal="false"`` is truthy: it masked silently before."""
    q, k, v = qkv(gen)
    call = {"attention": lambda: attention(q, k, v, causal="false"),
            "attention lse": lambda: attention(q, k, v, causal="false", return_lse=True),
            "attention_reference": lambda: attention_reference(q, k, v, causal="false")}[edge]
    with pytest.raises(TypeError, match="causal must be True or False, got 'false'"):
        call()


def test_scale_of_a_wrong_type_is_refused(gen):
    q, k, v = qkv(gen)
    with pytest.raises(TypeError, match="scale must be a number"):
        attention(q, k, v, scale="0.5")
    ref_o, ref_l = definition(q, k, v, True, scale=2)
    o, lse = attention(q, k, v, causal=True, scale=2, return_lse=True)    # an int is a number
    assert rel_err(o, ref_o) < 1e-5 and rel_err(lse, ref_l) < 1e-5


# empty inputs -------------------------------------------------------------------------------------------------

# Run in a fresh Python: before the guard, an empty sequence with return_lse=True killed the process (SIGFPE in
# PyTorch's CPU flash kernel), which would have taken the test run with it.
EMPTY_SCRIPT = """
import json, sys
import torch
from longctx.attention import attention, attention_reference, merge_attention, sdpa
INF = float("inf")
""" + inspect.getsource(definition) + """
torch.manual_seed(int(sys.argv[1]))
close = lambda a, ref: bool(torch.allclose(a.double(), ref, rtol=1e-5, atol=1e-6))  # -inf matches -inf
res = []
for b, hq, hkv, tq, tk, dv in [(2, 4, 2, 0, 7, 8), (2, 4, 2, 5, 0, 8), (2, 4, 2, 0, 0, 8), (0, 4, 2, 5, 7, 8),
                               (2, 0, 2, 5, 7, 8), (2, 4, 2, 5, 7, 0), (2, 4, 2, 1, 0, 8)]:
    q, k, v = torch.randn(b, hq, tq, 8), torch.randn(b, hkv, tk, 8), torch.randn(b, hkv, tk, dv)
    for causal in (False, True):
        if causal and tq > tk:
            continue
        ref_o, ref_l = definition(q, k, v, causal)
        calls = {"attention": lambda: (attention(q, k, v, causal=causal), None),
                 "attention lse": lambda: attention(q, k, v, causal=causal, return_lse=True),
                 "attention_reference": lambda: attention_reference(q, k, v, causal=causal),
                 "sdpa": lambda: (sdpa(q, k, v, is_causal=causal), None)}
        for name, call in calls.items():
            o, l = call()
            res.append(dict(case=[b, hq, hkv, tq, tk, dv, causal], edge=name, out=list(o.shape), dtype=str(o.dtype),
                            out_close=close(o, ref_o), lse=None if l is None else list(l.shape),
                            lse_close=None if l is None else close(l, ref_l)))
# The partial result over no keys merges exactly: the other side comes back unchanged.
q, k, v = torch.randn(2, 4, 6, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64), \\
    torch.randn(2, 2, 9, 8, dtype=torch.float64)
none = attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
every = attention(q, k, v, return_lse=True)
merged = [merge_attention(*none, *every), merge_attention(*every, *none)]
ref_o, ref_l = definition(q, k, v, False)
merge_err = max(((o - ref_o).norm() / ref_o.norm() + (l - ref_l).norm() / ref_l.norm()).item() for o, l in merged)
# Gradients flow through an empty key set (to zeros).
q.requires_grad_(True)
attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)[0].sum().backward()
print(json.dumps(dict(res=res, merge_err=merge_err, grad_zero=bool(torch.equal(q.grad, torch.zeros_like(q))))))
"""


def test_empty_inputs_give_empty_or_keyless_results_without_a_crash(gen):
    """Tq = 0, Tk = 0, B = 0, Hq = 0 or Dv = 0, causal or not, with and without the lse: the definition's result
    (empty; or out 0 and lse -inf per query where there are no keys), in a process that survives."""
    got = run_script(EMPTY_SCRIPT, gen, "cpu", interpret=False)
    assert len(got["res"]) == 4 * 12
    for r in got["res"]:
        b, hq, _, tq, _, dv, _ = r["case"]
        assert r["out"] == [b, hq, tq, dv] and r["dtype"] == "torch.float32" and r["out_close"], r
        assert r["lse"] in (None, [b, hq, tq]) and r["lse_close"] in (None, True), r
    assert got["merge_err"] < 1e-12
    assert got["grad_zero"]


def test_value_head_dim_other_than_key_head_dim(gen):
    """``Dv != D`` is part of the contract; PyTorch's CPU flash kernel refuses it, so it must not be called."""
    q, k, v = qkv(gen, tq=5, tk=9, d=8, dv=12)
    for causal in (False, True):
        ref_o, ref_l = definition(q, k, v, causal)
        o, lse = attention(q, k, v, causal=causal, return_lse=True)
        assert rel_err(o, ref_o) < 1e-5 and rel_err(lse, ref_l) < 1e-5
        assert rel_err(attention(q, k, v, causal=causal), ref_o) < 1e-5


def test_reference_rows_above_the_mask_have_finite_gradients(gen):
    """``attention_reference`` with causal ``Tq > Tk``: the rows that see no key give out 0, lse -inf, and no NaN
    in any gradient."""
    q, k, v = (t.double().requires_grad_(True) for t in qkv(gen, b=1, hq=2, hkv=1, tq=6, tk=3, d=4))
    out, lse = attention_reference(q, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3])) and torch.isneginf(lse[:, :, :3]).all()
    assert torch.autograd.gradcheck(lambda *a: attention_reference(*a, causal=True)[0], (q, k, v))


# NaN and inf ----------------------------------------------------------------------------------------------------

def results(q, k, v, causal):
    """``{edge: (out, lse or None)}`` for every public edge that takes these inputs."""
    got = {"attention": (attention(q, k, v, causal=causal), None),
           "attention lse": attention(q, k, v, causal=causal, return_lse=True),
           "attention_reference": attention_reference(q, k, v, causal=causal)}
    if not causal or q.shape[2] == k.shape[2]:  # SDPA's causal mask is top-left
        got["sdpa"] = (sdpa(q, k, v, is_causal=causal), None)
    return got


def assert_like_definition(got, ref, where, both_ways=True):
    """Non-finite wherever the definition is; finite values close to it; with ``both_ways``, finite wherever the
    definition is finite too."""
    lost = ~torch.isfinite(ref) & torch.isfinite(got)
    assert not lost.any(), f"{where}: finite where the definition is not, at {lost.nonzero().tolist()}"
    if both_ways:
        extra = torch.isfinite(ref) & ~torch.isfinite(got)
        assert not extra.any(), f"{where}: non-finite where the definition is finite, at {extra.nonzero().tolist()}"
    both = torch.isfinite(ref) & torch.isfinite(got)
    assert rel_err(got[both], ref[both]) < 1e-5, where


def test_nan_query_gives_a_nan_row(gen):
    """The report that opened this: a NaN query came back as an all-zero row with lse 0 from ``attention`` and
    ``attention_reference``."""
    q, k, v = qkv(gen)
    q[1, 2, 3, 0] = NAN
    for edge, (out, lse) in results(q, k, v, causal=False).items():
        assert out[1, 2, 3].isnan().all(), edge
        assert lse is None or lse[1, 2, 3].isnan(), edge
        row = torch.ones(out.shape[:3], dtype=torch.bool)
        row[1, 2, 3] = False
        assert torch.isfinite(out[row]).all() and (lse is None or torch.isfinite(lse[row]).all()), edge


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_inputs_follow_the_definition(where, value, causal, gen):
    """One NaN or inf entry in q, k or v, in the first, a middle or the last row, for square, chunk-after-cache
    and one-query shapes, through every edge: non-finite exactly where the definition is, never a finite number
    in its place. (A NaN or inf value may also reach rows that a causal mask hides it from, as PyTorch's kernels
    do; the other direction is checked for values too.)"""
    for (tq, tk), row in itertools.product([(6, 6), (3, 8), (1, 5)], ["first", "middle", "last"]):
        q, k, v = qkv(gen, b=1, hq=2, hkv=1, tq=tq, tk=tk, d=4)
        t = {"q": q, "k": k, "v": v}[where]
        i = {"first": 0, "middle": t.shape[2] // 2, "last": t.shape[2] - 1}[row]
        t[0, 0, i, int(torch.randint(4, (), generator=gen))] = value
        ref_o, ref_l = definition(q, k, v, causal)
        for edge, (out, lse) in results(q, k, v, causal).items():
            case = f"{edge}, {where}[{i}] = {value}, Tq={tq}, Tk={tk}"
            assert_like_definition(out, ref_o, case, both_ways=where != "v")
            if lse is not None:
                assert_like_definition(lse, ref_l, case + " (lse)")


@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["to -inf", "to +inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_finite_inputs_whose_scores_overflow_follow_the_definition(sign, causal, gen):
    """Finite q and k whose products overflow float32 (|q|, |k| ~ 1e20): a row whose every score is -inf has no
    softmax (NaN, lse -inf), not the out 0, lse 0 that the CPU flash kernel gives; +inf scores give NaN."""
    q, k, v = qkv(gen, b=1, hq=2, hkv=1, tq=4, tk=4, d=4)
    k = torch.full_like(k, sign * 1e20)
    q[0, 0, 1] = 1e20                                           # row 1: every score is 2e40 * sign in float32: ±inf
    for edge, (out, lse) in results(q, k, v, causal).items():
        assert out[0, 0, 1].isnan().all(), (edge, out[0, 0, 1])
        if lse is not None:
            assert not torch.isfinite(lse[0, 0, 1]) and (sign > 0 or lse[0, 0, 1] == -INF), (edge, lse[0, 0, 1])


@pytest.mark.parametrize("where", ["q", "k"])
def test_sdpa_with_a_mask_keeps_nan(where, gen):
    """With a mask any key may be a row's only one: a NaN query gives a NaN row, a NaN key NaN in every row that
    sees it. (SDPA adds a mask to the scores, so a NaN key may reach rows the mask hides it from too.)"""
    q, k, v = qkv(gen, b=1, hq=2, hkv=1, tq=6, tk=6, d=4)
    mask = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)  # window 2
    {"q": q, "k": k}[where][0, 0, 3, 1] = NAN
    nan_rows = sdpa(q, k, v, attn_mask=mask)[0].isnan().all(-1)
    if where == "q":
        expect = torch.zeros(2, 6, dtype=torch.bool)
        expect[0, 3] = True
        assert torch.equal(nan_rows, expect)
    else:  # both query heads read the one KV head; rows 3 and 4 hold key 3 in their window
        assert nan_rows[:, 3:5].all()



CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's fused CUDA kernels need a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
HALF_AND_SINGLE = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", ["q nan", "k nan", "v nan", "k inf", "k -inf", "v inf"])
def test_half_precision_and_cuda_follow_the_definition_on_non_finite_inputs(device, case, dtype, gen):
    """The contract at the dtypes and on the device where other kernels run: CUDA's fused kernels (cuDNN, flash,
    memory-efficient; no host check guards them) and the CPU's half-precision ones (which lose the ``±inf`` scores
    of an infinite key: fixed by ``_cpu_half_loses_inf``). For square causal, square full and one-query shapes,
    head dim 64: never a finite number where the float64 definition is NaN or inf (more NaN is allowed where a
    mask hides a NaN value, as on the CPU); elsewhere the definition's values within the dtype's rounding."""
    bound = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-5}[dtype]   # rounding of q, k, v and out
    what, value = case.split()
    for (tq, tk), causal in [((64, 64), True), ((64, 64), False), ((1, 96), False)]:
        q, k, v = qkv(gen, b=2, hq=4, hkv=2, tq=tq, tk=tk, d=64)
        t = {"q": q, "k": k, "v": v}[what]
        t[1, 1 if what != "q" else 2, t.shape[2] // 2, 5] = float(value)
        q, k, v = (x.to(dtype) for x in (q, k, v))
        ref_o, ref_l = definition(q, k, v, causal)
        for edge, (out, lse) in results(q.to(device), k.to(device), v.to(device), causal).items():
            where = f"{edge}, {case}, {dtype}, {device}, Tq={tq}, Tk={tk}, causal={causal}"
            assert out.dtype == dtype, where
            for got, ref in ((out, ref_o), (lse, ref_l)):
                if got is None:
                    continue
                got = got.cpu().double()
                lost = ~torch.isfinite(ref) & torch.isfinite(got)
                assert not lost.any(), f"{where}: finite where the definition is not, at {lost.nonzero()[:4].tolist()}"
                both = torch.isfinite(ref) & torch.isfinite(got)
                if both.any():
                    assert rel_err(got[both], ref[both]) < bound, where


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_scores_overflowing_float32_give_a_nan_row_at_every_dtype_and_device(device, dtype, gen):
    """Finite q and k of 1e20 (bf16 holds them; fp16 cannot): the row whose scores overflow float32 to +inf gives
    NaN, in every edge, on CUDA's kernels too."""
    for (tq, tk), causal in [((64, 64), True), ((1, 96), False)]:
        q, k, v = qkv(gen, b=1, hq=2, hkv=1, tq=tq, tk=tk, d=64)
        k = torch.full_like(k, 1e20)
        q[0, 1, tq // 2] = 1e20
        q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
        for edge, (out, lse) in results(q, k, v, causal).items():
            assert out[0, 1, tq // 2].isnan().all(), (edge, device, dtype, out[0, 1, tq // 2])
            assert lse is None or not torch.isfinite(lse[0, 1, tq // 2]), (edge, device, dtype)
