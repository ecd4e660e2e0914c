"""fascore.npu_ring_attention_update (torch_npu's keywords) against the dense definition.

Two partial results over disjoint key sets of the same query rows are built with the dense
softmax formula in float64 (SPEC §5 statistics, invalid rows as (-FLT_MAX, +FLT_MAX) with output
0); their merge must equal the dense result over the union of the keys. Also: rows invalid on
both sides, TND's per-batch statistics layout, chaining real fascore calls, errors, and the old
``ring_attention_update`` spellings (deprecated, same results).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fascore
from fascore import FlashAttentionError, npu_ring_attention_update, ring_attention_update

FLT_MAX = 3.4028234663852886e38


def dense(L, V, allowed):
    """Dense attention over the allowed columns: (out [B,N,S,D], m [B,N,S], l [B,N,S]) in float64."""
    Lm = L.masked_fill(~allowed, float("-inf"))
    valid = allowed.any(-1)
    m = Lm.amax(-1)
    m_use = torch.where(valid, m, torch.zeros_like(m))
    e = torch.exp(Lm - m_use.unsqueeze(-1))
    l = e.sum(-1)
    out = (e / torch.where(valid, l, torch.ones_like(l)).unsqueeze(-1)) @ V
    m = torch.where(valid, m, torch.full_like(m, -FLT_MAX))
    l = torch.where(valid, l, torch.full_like(l, FLT_MAX))
    return out, m, l


def stats8(x):
    return x.float().unsqueeze(-1).expand(*x.shape, 8).contiguous()


def to_sbh(o):
    b, n, s, d = o.shape
    return o.permute(2, 0, 1, 3).reshape(s, b, n * d)


def problem(seed, B=2, N=3, S=11, K=13, D=4):
    """Logits, values, and a random split of the keys with rows empty on one, the other, or both sides."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, N, S, K, generator=g, dtype=torch.float64) * 3
    V = torch.randn(B, N, K, D, generator=g, dtype=torch.float64)
    allowed = torch.rand(B, N, S, K, generator=g) < 0.7
    side1 = torch.rand(B, N, S, K, generator=g) < 0.5
    a1, a2 = allowed & side1, allowed & ~side1
    a1[:, :, 0] = False            # row 0: only side 2
    a2[:, :, 1] = False            # row 1: only side 1
    a1[:, :, 2] = a2[:, :, 2] = False  # row 2: invalid on both sides
    a1[0, 1, 3] = a2[0, 1, 3] = False
    return L, V, a1, a2


def assert_merge_matches(got, want_out, want_m, want_l, dtype):
    out, m, l = got
    for t in got:
        assert torch.isfinite(t.double()).all(), "inf or NaN in the merge"
    assert m.dtype == torch.float32 and l.dtype == torch.float32 and out.dtype == dtype
    assert torch.equal(m, stats8(want_m)), "max: the max of float32-rounded maxima is the rounded max"
    inv = want_m == -FLT_MAX
    assert (l[..., 0][inv] == FLT_MAX).all() and (m[..., 0][inv] == -FLT_MAX).all()
    torch.testing.assert_close(l[..., 0][~inv].double(), want_l[~inv], rtol=1e-6, atol=0)
    tol = {torch.float64: 1e-6, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), want_out.double(), rtol=0, atol=tol)
    assert torch.equal(m, m[..., :1].expand_as(m)) and torch.equal(l, l[..., :1].expand_as(l))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_sbh_matches_dense_definition(dtype, seed):
    L, V, a1, a2 = problem(seed)
    o1, m1, l1 = dense(L, V, a1)
    o2, m2, l2 = dense(L, V, a2)
    ow, mw, lw = dense(L, V, a1 | a2)
    args = (to_sbh(o1).to(dtype), stats8(m1), stats8(l1), to_sbh(o2).to(dtype), stats8(m2), stats8(l2))
    before = [a.clone() for a in args]
    got = npu_ring_attention_update(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, before)), "inputs were modified"
    assert_merge_matches(got, to_sbh(ow), mw, lw, dtype)
    out = got[0].view(*got[0].shape[:2], 3, -1)
    assert (out[2] == 0).all() and (out[3, 0, 1] == 0).all(), "rows invalid on both sides must be 0"
    # symmetric: swapping the sides gives the same bits
    swapped = npu_ring_attention_update(*args[3:], *args[:3], input_layout="SBH")
    assert all(torch.equal(a, b) for a, b in zip(got, swapped))


def test_both_invalid_everywhere_stays_invalid():
    o = torch.zeros(4, 2, 6)
    m = torch.full((2, 3, 4, 8), -FLT_MAX)
    s = torch.full((2, 3, 4, 8), FLT_MAX)
    out, mm, ss = npu_ring_attention_update(o, m, s, o.clone(), m.clone(), s.clone())
    assert torch.equal(out, o) and torch.equal(mm, m) and torch.equal(ss, s)


def test_extreme_maxima_do_not_overflow():
    """A side whose max is far above the other's: weights underflow to 0, never inf/NaN."""
    o1, o2 = torch.ones(1, 1, 4), torch.full((1, 1, 4), 2.0)
    m1, m2 = torch.full((1, 1, 1, 8), 3.0e38), torch.full((1, 1, 1, 8), -3.0e38)
    l1, l2 = torch.full((1, 1, 1, 8), 2.0), torch.full((1, 1, 1, 8), 5.0)
    out, m, l = npu_ring_attention_update(o1, m1, l1, o2, m2, l2)
    assert torch.equal(out, o1) and torch.equal(m, m1) and torch.equal(l, l1)


def tnd_stats(x, cum, softmax_layout, T):
    """[N, T] row statistic -> TND [T, N, 8] in SPEC §2's memory order (rows after the batches: 0)."""
    N = x.shape[0]
    if softmax_layout == "TND":
        return stats8(x.t())
    flat, prev = [], 0
    for e in cum:
        flat.append(stats8(x[:, prev:e]).reshape(-1))
        prev = e
    flat.append(torch.zeros((T - prev) * N * 8))
    return torch.cat(flat).view(T, N, 8)


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("cum,leading_zero", [([3, 3, 7, 11], False), ([3, 3, 7, 11], True), ([5, 9, 0, 0], False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tnd_matches_dense_definition(softmax_layout, cum, leading_zero, dtype):
    T, N, D = 11, 3, 4
    L, V, a1, a2 = problem(7, B=1, N=N, S=T, K=9, D=D)
    eff = [c for c in cum if c] or [0]
    end = eff[-1]
    for a in (a1, a2):  # rows outside every batch: statistics 0, output 0 on both sides
        a[:, :, end:] = False
    res = []
    for a in (a1, a2, a1 | a2):
        o, m, l = dense(L, V, a)
        o, m, l = o[0].permute(1, 0, 2), m[0], l[0]
        o[end:] = 0
        m[:, end:] = 0
        l[:, end:] = 0
        res.append((o, tnd_stats(m, eff, softmax_layout, T), tnd_stats(l, eff, softmax_layout, T), m, l))
    seq = ([0] + cum) if leading_zero else cum
    for seq_arg in (seq, torch.tensor(seq, dtype=torch.int64)):
        got = npu_ring_attention_update(res[0][0].to(dtype), res[0][1], res[0][2], res[1][0].to(dtype), res[1][1],
                                        res[1][2], actual_seq_qlen=seq_arg, input_layout="TND",
                                        input_softmax_layout=softmax_layout or "SBH")
        out, m, l = got
        assert torch.equal(m, res[2][1])
        valid = (res[2][1] != -FLT_MAX) & (res[2][2] != 0)
        torch.testing.assert_close(l[valid].double(), res[2][2][valid].double(), rtol=1e-6, atol=0)
        assert torch.equal(l[~valid], res[2][2][~valid])
        tol = 2e-6 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(out.double(), res[2][0], rtol=0, atol=tol)
        assert (out[end:] == 0).all()


def test_chaining_fascore_calls_equals_the_full_call():
    """npu_fusion_attention_v2 over two key halves, merged, equals the call over all keys (SBH),
    including rows that a user mask empties on both sides."""
    g = torch.Generator().manual_seed(3)
    S, K, B, N, D = 12, 20, 2, 2, 8
    q = torch.randn(S, B, N * D, generator=g)
    k = torch.randn(K, B, N * D, generator=g)
    v = torch.randn(K, B, N * D, generator=g)
    mask = torch.rand(S, K, generator=g) < 0.3
    mask[5] = True  # row 5: nothing takes part
    kw = dict(scale=0.3, sparse_mode=1)
    full = fascore.npu_fusion_attention_v2(q, k, v, N, "SBH", atten_mask=mask, **kw)
    h = 9
    p1 = fascore.npu_fusion_attention_v2(q, k[:h], v[:h], N, "SBH", atten_mask=mask[:, :h].contiguous(), **kw)
    p2 = fascore.npu_fusion_attention_v2(q, k[h:], v[h:], N, "SBH", atten_mask=mask[:, h:].contiguous(), **kw)
    out, m, l = npu_ring_attention_update(p1[0], p1[1], p1[2], p2[0], p2[1], p2[2])
    torch.testing.assert_close(out, full[0], rtol=0, atol=2e-6)
    # the halves' logits come from GEMMs of other shapes: equal up to float32 rounding, not bitwise
    torch.testing.assert_close(m, full[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(l, full[2], rtol=1e-6, atol=0)
    assert (m[:, :, 5] == -FLT_MAX).all() and (l[:, :, 5] == FLT_MAX).all() and (out[5] == 0).all()


def test_chaining_fascore_tnd_calls():
    g = torch.Generator().manual_seed(4)
    N, D = 2, 8
    cq, ckv = [4, 9, 15], [5, 12, 20]
    q = torch.randn(15, N, D, generator=g)
    k = torch.randn(20, N, D, generator=g)
    v = torch.randn(20, N, D, generator=g)
    full = fascore.npu_fusion_attention(q, k, v, N, "TND", scale=0.4, actual_seq_qlen=cq, actual_seq_kvlen=ckv)
    # split every batch's keys into its first 2 and the rest
    starts = [0, 5, 12]
    first = torch.cat([torch.arange(s, s + 2) for s in starts])
    rest = torch.cat([torch.arange(s + 2, e) for s, e in zip(starts, ckv)])
    c1, c2 = [2, 4, 6], [3, 8, 14]
    p1 = fascore.npu_fusion_attention(q, k[first], v[first], N, "TND", scale=0.4, actual_seq_qlen=cq, actual_seq_kvlen=c1)
    p2 = fascore.npu_fusion_attention(q, k[rest], v[rest], N, "TND", scale=0.4, actual_seq_qlen=cq, actual_seq_kvlen=c2)
    out, m, l = npu_ring_attention_update(p1[0], p1[1], p1[2], p2[0], p2[1], p2[2],
                                          actual_seq_qlen=torch.tensor([0] + cq), input_layout="TND")
    torch.testing.assert_close(out, full[0], rtol=0, atol=2e-6)
    # the halves' logits come from GEMMs of other shapes: equal up to float32 rounding, not bitwise
    torch.testing.assert_close(m, full[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(l, full[2], rtol=1e-6, atol=0)


@given(cuts=st.lists(st.integers(1, 12), min_size=2, max_size=2, unique=True), seed=st.integers(0, 1000))
def test_three_way_merge_any_order(cuts, seed):
    """Keys split in three at random points: ((a, b), c) and (a, (b, c)) both give the dense result."""
    L, V, a1, a2 = problem(seed, K=13)
    allowed = a1 | a2
    lo, hi = sorted(cuts)
    cols = torch.arange(13)
    parts = [allowed & (cols < lo), allowed & (cols >= lo) & (cols < hi), allowed & (cols >= hi)]
    ps = [dense(L, V, p) for p in parts]
    ps = [(to_sbh(o).float(), stats8(m), stats8(l)) for o, m, l in ps]
    want = dense(L, V, allowed)
    left = npu_ring_attention_update(*npu_ring_attention_update(*ps[0], *ps[1]), *ps[2])
    right = npu_ring_attention_update(*ps[0], *npu_ring_attention_update(*ps[1], *ps[2]))
    for got in (left, right):
        assert_merge_matches(got, to_sbh(want[0]), want[1], want[2], torch.float32)


def _args():
    o = torch.zeros(4, 2, 6)
    s = torch.zeros(2, 3, 4, 8)
    return [o, s, s.clone(), o.clone(), s.clone(), s.clone()]


@pytest.mark.parametrize("change,kw,match", [
    (None, dict(input_layout="BSH"), "input_layout='BSH'"),
    (None, dict(input_layout="TND"), "T, N, 8"),
    (None, dict(actual_seq_qlen=[4]), "only for input_layout 'TND'"),
    ((3, torch.zeros(4, 2, 6, dtype=torch.float16)), {}, "cur_attn_out"),
    ((1, torch.zeros(2, 3, 4, 8, dtype=torch.float64)), {}, "float32"),
    ((5, torch.zeros(2, 3, 4, 7)), {}, "shape"),
    ((1, torch.zeros(2, 3, 5, 8)), {}, "shape"),
    ((0, torch.zeros(4, 2, 7)), {}, "cur_attn_out"),
    ((0, None), {}, "prev_attn_out=None"),
    ((0, torch.zeros(4, 2, 6, dtype=torch.int32)), {}, "dtype"),
    (None, dict(input_softmax_layout="BNSD"), "input_softmax_layout='BNSD'"),
])
def test_sbh_errors(change, kw, match):
    args = _args()
    if change is not None:
        args[change[0]] = change[1]
        if change[0] == 0 and change[1] is not None and change[1].dtype == torch.float32:
            args[3] = torch.zeros(4, 2, 6)  # only prev changes: mismatch
    with pytest.raises(FlashAttentionError, match=match) as ei:
        npu_ring_attention_update(*args, **kw)
    assert ei.value.status == 161002


def test_tnd_errors():
    o = torch.zeros(6, 2, 4)
    s = torch.zeros(6, 2, 8)
    args = (o, s, s, o, s, s)
    with pytest.raises(FlashAttentionError, match="required"):
        npu_ring_attention_update(*args, input_layout="TND")
    with pytest.raises(FlashAttentionError, match="non-decreasing"):
        npu_ring_attention_update(*args, actual_seq_qlen=[4, 2, 6], input_layout="TND")
    with pytest.raises(FlashAttentionError, match="exceeds T"):
        npu_ring_attention_update(*args, actual_seq_qlen=[4, 7], input_layout="TND")
    with pytest.raises(FlashAttentionError, match="list of ints"):
        npu_ring_attention_update(*args, actual_seq_qlen=[1.5], input_layout="TND")
    npu_ring_attention_update(*args, actual_seq_qlen=[0, 2, 6], input_layout="tnd",
                              input_softmax_layout="tnd")  # case-insensitive, leading 0


def test_signature_is_torch_npus():
    import inspect
    sig = inspect.signature(npu_ring_attention_update)
    assert list(sig.parameters) == ["prev_attn_out", "prev_softmax_max", "prev_softmax_sum", "cur_attn_out",
                                    "cur_softmax_max", "cur_softmax_sum", "actual_seq_qlen", "input_layout",
                                    "input_softmax_layout"]
    kinds = [p.kind for p in sig.parameters.values()]
    assert kinds[6:] == [inspect.Parameter.KEYWORD_ONLY] * 3
    assert [sig.parameters[n].default for n in ("actual_seq_qlen", "input_layout", "input_softmax_layout")] == \
        [None, "SBH", ""]
    assert fascore.npu_ring_attention_update is npu_ring_attention_update
    assert "npu_ring_attention_update" in fascore.__all__


def test_softmax_layout_is_read_only_with_tnd():
    """input_softmax_layout only applies to TND (torch_npu's doc); "SBH" is "" there."""
    args = _args()
    base = npu_ring_attention_update(*args)
    for lay in ("SBH", "TND"):
        assert all(torch.equal(a, b) for a, b in zip(npu_ring_attention_update(*args, input_softmax_layout=lay), base))
    g = torch.Generator().manual_seed(2)
    o = [torch.randn(7, 2, 4, generator=g) for _ in range(2)]
    st = [torch.rand(7, 2, 1, generator=g).expand(7, 2, 8).contiguous() + 0.5 for _ in range(4)]
    tnd = dict(actual_seq_qlen=[3, 7], input_layout="TND")
    a = npu_ring_attention_update(o[0], st[0], st[1], o[1], st[2], st[3], **tnd)
    b = npu_ring_attention_update(o[0], st[0], st[1], o[1], st[2], st[3], input_softmax_layout="SBH", **tnd)
    c = npu_ring_attention_update(o[0], st[0], st[1], o[1], st[2], st[3], input_softmax_layout="TND", **tnd)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])  # another memory order of the same statistics


def test_old_spellings_warn_and_agree():
    g = torch.Generator().manual_seed(5)
    o = [torch.randn(7, 2, 4, generator=g) for _ in range(2)]
    st = [torch.rand(7, 2, 1, generator=g).expand(7, 2, 8).contiguous() + 0.5 for _ in range(4)]
    args = (o[0], st[0], st[1], o[1], st[2], st[3])
    want = npu_ring_attention_update(*args, actual_seq_qlen=[3, 7], input_layout="TND", input_softmax_layout="TND")
    for call in (lambda: ring_attention_update(*args, [3, 7], "TND", softmax_layout="TND"),
                 lambda: ring_attention_update(*args, actual_seq_qlen=[3, 7], layout="TND", softmax_layout="TND")):
        with pytest.warns(DeprecationWarning, match="deprecated"):
            got = call()
        assert all(torch.equal(x, y) for x, y in zip(got, want))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keywords through the old name: no warning
        got = ring_attention_update(*args, actual_seq_qlen=[3, 7], input_layout="TND", input_softmax_layout="TND")
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    with pytest.raises(FlashAttentionError, match="input_layout only"):
        ring_attention_update(*args, layout="TND", input_layout="TND")
