"""fascore.attention: flash-attn / SDPA conventions over npu_fusion_attention_v2.

Checked against PyTorch's SDPA in float64 (causal both alignments, windows, keep-masks, bias with
its gradient, GQA, varlen per sequence), against fascore's reference engine (the mapped call in
float64), for dropout statistics, the log-sum-exp, torch.compile fullgraph and its messages.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fascore
from fascore.api.attention import mapping
from conftest import band_keep

TOL = 2e-5  # float32 fascore vs float64 SDPA on O(1) values


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def qkv(b=2, sq=37, skv=53, n=4, n2=None, d=16, dv=None, layout="BSND", seed=0, dtype=torch.float32):
    g = _gen(seed)
    n2 = n2 or n

    def shp(s, h, dd):
        return (b, s, h, dd) if layout == "BSND" else (b, h, s, dd)
    return (torch.randn(*shp(sq, n, d), generator=g).to(dtype), torch.randn(*shp(skv, n2, d), generator=g).to(dtype),
            torch.randn(*shp(skv, n2, dv or d), generator=g).to(dtype))


def sdpa(q, k, v, mask=None, causal=False, scale=None, layout="BSND"):
    """SDPA in float64 on BSND / BNSD inputs (GQA by repeating kv heads); rows with nothing to
    attend to are 0 (as in fascore and flash-attn), not SDPA's NaN."""
    if layout == "BSND":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        mask = mask.double()
    o = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=causal,
                                       scale=scale)
    o = torch.nan_to_num(o, nan=0.0)
    return o.transpose(1, 2) if layout == "BSND" else o


def band(sq, skv, lo, hi, alignment):
    return band_keep(sq, skv, lo, hi, skv - sq if alignment == "bottom_right" else 0)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- causal, windows, masks
@pytest.mark.parametrize("layout", ["BSND", "BNSD"])
@pytest.mark.parametrize("sq,skv", [(37, 53), (53, 37), (40, 40)])
@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_causal_both_alignments_match_sdpa(layout, sq, skv, alignment):
    q, k, v = qkv(sq=sq, skv=skv, n=4, n2=2, layout=layout)
    out = fascore.attention(q, k, v, layout=layout, causal=True, causal_alignment=alignment)
    if alignment == "top_left":
        ref = sdpa(q, k, v, causal=True, layout=layout)  # SDPA's is_causal is top-left
    else:
        ref = sdpa(q, k, v, mask=band(sq, skv, None, 0, alignment), layout=layout)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == q.dtype
    assert err(out, ref) < TOL


def test_alignments_differ_where_sq_differs_from_skv():
    q, k, v = qkv(sq=20, skv=30)
    a = fascore.attention(q, k, v, causal=True, causal_alignment="bottom_right")
    b = fascore.attention(q, k, v, causal=True, causal_alignment="top_left")
    assert err(a, b) > 1e-2
    q, k, v = qkv(sq=30, skv=30)
    assert torch.equal(fascore.attention(q, k, v, causal=True, causal_alignment="bottom_right"),
                       fascore.attention(q, k, v, causal=True, causal_alignment="top_left"))


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("window,causal", [((5, 3), False), ((7, -1), True), ((4, 0), False), ((-1, 6), False),
                                           ((0, 0), False)])
@pytest.mark.parametrize("sq,skv", [(37, 53), (53, 37)])
def test_window_matches_sdpa(alignment, window, causal, sq, skv):
    q, k, v = qkv(sq=sq, skv=skv)
    out = fascore.attention(q, k, v, window=window, causal=causal, causal_alignment=alignment)
    lo = None if window[0] == -1 else -window[0]
    hi = 0 if causal else (None if window[1] == -1 else window[1])
    assert err(out, sdpa(q, k, v, mask=band(sq, skv, lo, hi, alignment))) < TOL


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("shape", [(2, 1, 37, 53), (37, 53), (2, 4, 37, 53), (2, 1, 1, 53), (1, 4, 37, 53)])
@pytest.mark.parametrize("causal", [False, True])
def test_keep_mask_in_sdpa_polarity(alignment, shape, causal):
    q, k, v = qkv(sq=37, skv=53)
    keep = torch.rand(*shape, generator=_gen(5)) < 0.7
    out = fascore.attention(q, k, v, attn_mask=keep, causal=causal, causal_alignment=alignment)
    ref_mask = keep & band(37, 53, None, 0, alignment) if causal else keep
    assert err(out, sdpa(q, k, v, mask=ref_mask)) < TOL


def test_float_attn_mask_is_an_additive_bias_as_in_sdpa():
    q, k, v = qkv(sq=16, skv=16)
    m = torch.zeros(16, 16).masked_fill(torch.rand(16, 16, generator=_gen(2)) < 0.3, float("-inf"))
    m.fill_diagonal_(0.0)
    assert err(fascore.attention(q, k, v, attn_mask=m), sdpa(q, k, v, mask=m)) < TOL


# --------------------------------------------------------------------------- bias and its gradient
@pytest.mark.parametrize("bshape", [(1, 4, 24, 40), (2, 4, 24, 40), (24, 40), (2, 1, 1, 40), (4, 1, 40)])
def test_bias_with_gradient_matches_sdpa(bshape):
    q, k, v = qkv(sq=24, skv=40, n=4, n2=2, dv=8)
    bias = torch.randn(*bshape, generator=_gen(3))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    out = fascore.attention(*leaves[:3], attn_bias=leaves[3], causal=True)
    dy = torch.randn(out.shape, generator=_gen(4))
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, bias)]
    ref = sdpa(*ref_leaves[:3], mask=ref_leaves[3] + torch.zeros(24, 40, dtype=torch.float64).masked_fill(
        ~band(24, 40, None, 0, "bottom_right"), float("-inf")))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert err(out, ref) < TOL
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert g.shape == r.shape, name
        assert err(g, r) < 1e-4, name


def test_alibi_square_maps_to_in_kernel_alibi_and_matches_the_bias():
    q, k, v = qkv(sq=32, skv=32, n=4)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    m = mapping(q, k, v, alibi_slopes=slopes, causal=True)
    assert m["pse_type"] == 2 and m["pse"] is slopes and m["sparse_mode"] == 3
    dist = (torch.arange(32)[None, :] - torch.arange(32)[:, None]).abs().double()
    bias = -slopes.double()[:, None, None] * dist
    causal = torch.zeros(32, 32, dtype=torch.float64).masked_fill(~band(32, 32, None, 0, "top_left"), float("-inf"))
    out = fascore.attention(q, k, v, alibi_slopes=slopes, causal=True)
    assert err(out, sdpa(q, k, v, mask=(bias + causal)[None])) < TOL


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_alibi_with_sq_ne_skv_is_flash_attns_bias(alignment):
    q, k, v = qkv(b=2, sq=20, skv=28, n=2)
    slopes = torch.tensor([[0.3, 0.1], [0.2, 0.05]])
    d = 8 if alignment == "bottom_right" else 0
    dist = (torch.arange(28)[None, :] - torch.arange(20)[:, None] - d).abs().double()
    bias = -slopes.double()[:, :, None, None] * dist  # flash-attn: -slope * |i + Skv - Sq - j|
    out = fascore.attention(q, k, v, alibi_slopes=slopes, causal_alignment=alignment)
    assert err(out, sdpa(q, k, v, mask=bias)) < TOL


# --------------------------------------------------------------------------- prefix
def test_prefix_lm_matches_sdpa():
    q, k, v = qkv(b=2, sq=24, skv=32)
    out = fascore.attention(q, k, v, causal=True, prefix=[3, 20])
    assert mapping(q, k, v, causal=True, prefix=[3, 20])["sparse_mode"] == 6
    for b, p in enumerate((3, 20)):
        keep = band(24, 32, None, 0, "bottom_right") | (torch.arange(32)[None, :] < p)
        assert err(out[b:b + 1], sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask=keep)) < TOL
    keep_user = torch.rand(2, 1, 24, 32, generator=_gen(8)) < 0.8
    out = fascore.attention(q, k, v, causal=True, prefix=[3, 20], attn_mask=keep_user)
    for b, p in enumerate((3, 20)):
        keep = keep_user[b] & (band(24, 32, None, 0, "bottom_right") | (torch.arange(32)[None, :] < p))
        assert err(out[b:b + 1], sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask=keep[None])) < TOL


# --------------------------------------------------------------------------- varlen
LENS_Q, LENS_K = [5, 0, 17, 9, 12], [7, 3, 11, 9, 20]


def _varlen(seed=0, n=4, n2=2, d=16):
    g = _gen(seed)
    cq, ck = [0, *itertools.accumulate(LENS_Q)], [0, *itertools.accumulate(LENS_K)]
    return (torch.randn(cq[-1] + 2, n, d, generator=g), torch.randn(ck[-1], n2, d, generator=g),
            torch.randn(ck[-1], n2, d, generator=g), cq, ck)


def _per_sequence(q, k, v, cq, ck, keep_of):
    """SDPA per sequence (keep_of(b, sq, skv) -> its keep-mask), packed like the input."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for b in range(len(cq) - 1):
        sq, skv = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if sq == 0:
            continue
        qs, ks, vs = q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]]
        out[cq[b]:cq[b + 1]] = sdpa(qs, ks, vs, mask=keep_of(b, sq, skv))[0]
    return out


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("what", ["causal", "window", "window+causal", "mask", "mask+causal", "none"])
def test_varlen_matches_sdpa_per_sequence(alignment, what):
    q, k, v, cq, ck = _varlen()
    kw = dict(cu_seqlens_q=torch.tensor(cq, dtype=torch.int32), cu_seqlens_k=ck, causal_alignment=alignment,
              max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K))
    lo, hi = None, None
    if "causal" in what:
        kw["causal"], hi = True, 0
    if "window" in what:
        kw["window"], lo = ((4, -1) if "causal" in what else (4, 2)), -4
        hi = 0 if "causal" in what else 2
    keep_t = torch.rand(q.shape[0], k.shape[0], generator=_gen(9)) < 0.75
    if "mask" in what:
        kw["attn_mask"] = keep_t

    def keep_of(b, sq, skv):
        m = band(sq, skv, lo, hi, alignment)
        if "mask" in what:
            m &= keep_t[cq[b]:cq[b] + sq, ck[b]:ck[b] + skv]
        return m
    out, lse = fascore.attention(q, k, v, return_lse=True, **kw)
    assert out.shape == (q.shape[0], 4, 16) and lse.shape == (4, q.shape[0])
    ref = _per_sequence(q, k, v, cq, ck, keep_of)
    assert err(out, ref) < TOL
    assert bool((out[cq[-1]:] == 0).all()) and bool(torch.isinf(lse[:, cq[-1]:]).all())  # rows in no sequence


def test_varlen_corner_mask_form():
    q, k, v, cq, ck = _varlen(1)
    keep = torch.rand(max(LENS_Q), max(LENS_K), generator=_gen(10)) < 0.7
    out = fascore.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, attn_mask=keep, causal=True)
    ref = _per_sequence(q, k, v, cq, ck, lambda b, sq, skv: keep[:sq, :skv] & band(sq, skv, None, 0, "bottom_right"))
    assert err(out, ref) < TOL


def test_varlen_flash_attn_call_shape_infers_tnd():
    """flash_attn_varlen_func's call: 3-D tensors and cu_seqlens, no layout argument."""
    q, k, v, cq, ck = _varlen(2)
    a = fascore.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
    b = fascore.attention(q, k, v, layout="THD", cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- reference, lse, dropout
def test_matches_the_reference_engine_of_the_mapped_call():
    q, k, v = qkv(sq=40, skv=56, n=4, n2=1, dtype=torch.bfloat16)
    bias = torch.randn(1, 4, 40, 56, generator=_gen(11)).to(torch.bfloat16)
    kw = dict(window=(9, 4), attn_bias=bias, scale=0.3)
    out = fascore.attention(q, k, v, **kw)
    m = mapping(q, k, v, **kw)
    assert m["sparse_mode"] == 4 and m["pre_tokens"] == 9 and m["next_tokens"] == 4 and m["pse_type"] == 0
    with fascore.use_engine("reference"):
        m64 = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in m.items()}
        ref64 = fascore.npu_fusion_attention_v2(**m64)[0]
        same = fascore.npu_fusion_attention_v2(**m)[0]
    eps = 2.0 ** -7 * max(1.0, ref64.abs().max().item())
    assert err(out, ref64) <= 2 * err(same, ref64) + eps
    assert torch.equal(out, fascore.npu_fusion_attention_v2(**m)[0])  # exactly the mapped call


def test_lse_is_the_log_sum_exp_and_minus_inf_for_empty_rows():
    q, k, v = qkv(sq=12, skv=12, d=8)
    keep = torch.ones(12, 12, dtype=torch.bool)
    keep[3] = False  # row 3 attends to nothing
    out, lse = fascore.attention(q, k, v, attn_mask=keep, return_lse=True, scale=0.4)
    s = torch.einsum("bind,bjnd->bnij", q.double(), k.double()) * 0.4
    ref = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)
    assert lse.shape == (2, 4, 12) and lse.dtype == torch.float32
    assert bool(torch.isneginf(lse[:, :, 3]).all()) and bool((out[:, 3] == 0).all())
    fin = torch.isfinite(ref)
    assert (lse.double()[fin] - ref[fin]).abs().max().item() < 1e-5


def test_dropout_statistics_and_reproducibility():
    """q = k = 0 and V = identity give out * keep_prob * Skv = Z, the keep mask itself."""
    b, n, s = 2, 2, 256
    q = torch.zeros(b, s, n, s)  # D = Dv = s (Dv <= D)
    v = torch.eye(s)[None, :, None, :].expand(b, s, n, s).contiguous()
    p = 0.3
    out = fascore.attention(q, q, v, dropout_p=p, scale=1.0, seed=1234)
    z = out * (1 - p) * s
    assert bool(((z - z.round()).abs() < 1e-3).all()) and set(z.round().unique().tolist()) <= {0.0, 1.0}
    kept = z.round().mean().item()
    assert abs(kept - (1 - p)) < 0.01  # 262144 elements: 0.01 is > 10 sigma
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.01  # unbiased: rows still sum to 1 on average
    again = fascore.attention(q, q, v, dropout_p=p, scale=1.0, seed=1234)
    assert torch.equal(out, again)
    other = fascore.attention(q, q, v, dropout_p=p, scale=1.0, seed=99)
    assert not torch.equal(out, other)
    with fascore.use_engine("reference"):
        assert torch.equal(fascore.attention(q, q, v, dropout_p=p, scale=1.0, seed=1234), out)


def test_dropout_gradients_match_the_reference():
    q, k, v = qkv(sq=24, skv=24, n=2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fascore.attention(*leaves, dropout_p=0.2, seed=77, causal=True)
    g = torch.autograd.grad(out.sum(), leaves)
    with fascore.use_engine("reference"):
        leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
        ref = fascore.attention(*leaves64, dropout_p=0.2, seed=77, causal=True)
        g64 = torch.autograd.grad(ref.sum(), leaves64)
    assert err(out, ref) < TOL
    for a, r in zip(g, g64):
        assert err(a, r) < 1e-4


def test_default_scale_is_one_over_sqrt_d_and_deterministic():
    q, k, v = qkv(d=64)
    assert mapping(q, k, v)["scale"] == 64 ** -0.5
    a = fascore.attention(q, k, v, deterministic=False)
    assert torch.equal(a, fascore.attention(q, k, v)) and err(a, sdpa(q, k, v)) < TOL


# --------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    q, k, v = qkv(sq=32, skv=48, n=4, n2=2)
    bias = torch.randn(1, 4, 32, 48, generator=_gen(12))

    def block(q, k, v, bias):
        return fascore.attention(q, k, v, causal=True, attn_bias=bias, window=(16, -1))

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    out = compiled(*leaves)
    g = torch.autograd.grad(out.sum(), leaves)
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    ref = block(*eager_leaves)
    g_ref = torch.autograd.grad(ref.sum(), eager_leaves)
    assert err(out, ref) < 1e-6
    for a, r in zip(g, g_ref):
        assert err(a, r) < 1e-5


# --------------------------------------------------------------------------- the mapping and messages
def test_mapping_table_rows():
    q, k, v = qkv(sq=8, skv=12)
    assert mapping(q, k, v, causal=True)["sparse_mode"] == 3
    assert mapping(q, k, v, causal=True, causal_alignment="top_left")["sparse_mode"] == 2
    m = mapping(q, k, v, window=(3, 1), causal_alignment="top_left")  # mode 4 is bottom-right: shifted by d = 4
    assert (m["sparse_mode"], m["pre_tokens"], m["next_tokens"]) == (4, 7, -3)
    m = mapping(q, k, v, dropout_p=0.1, seed=5)
    assert m["keep_prob"] == pytest.approx(0.9) and m["seed"] == 5
    m = mapping(q, k, v, attn_mask=torch.ones(8, 12, dtype=torch.bool), causal=True)
    assert (m.get("sparse_mode", 0), m["next_tokens"]) == (0, 4) and not bool(m["atten_mask"].any())
    tq, tk, tv, cq, ck = _varlen()
    m = mapping(tq, tk, tv, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert m["input_layout"] == "TND" and m["actual_seq_qlen"] == cq[1:] and m["actual_seq_kvlen"] == ck[1:]


@pytest.mark.parametrize("kw,match", [
    (dict(layout="BHSDX"), "layout='BHSDX'"),
    (dict(causal=True, window=(4, 2)), "causal already means right = 0"),
    (dict(dropout_p=1.0), "dropout_p=1.0"),
    (dict(causal_alignment="bottom-right"), "causal_alignment"),
    (dict(window=(4,)), "window="),
    (dict(attn_bias=torch.zeros(8, 12, dtype=torch.float64)), "attn_bias dtype"),
    (dict(attn_bias=torch.zeros(3, 8, 12)), "attn_bias shape"),
    (dict(attn_mask=torch.zeros(8, 12, dtype=torch.int64)), "attn_mask dtype"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (dict(cu_seqlens_q=[0, 8]), "cu_seqlens_q is for packed varlen"),
    (dict(prefix=[1, 2]), "prefix"),
])
def test_messages_name_the_argument(kw, match):
    q, k, v = qkv(sq=8, skv=12)
    with pytest.raises(fascore.FlashAttentionError, match=match):
        fascore.attention(q, k, v, **kw)


def test_varlen_messages():
    q, k, v, cq, ck = _varlen()
    with pytest.raises(fascore.FlashAttentionError, match="start with 0"):
        fascore.attention(q, k, v, cu_seqlens_q=cq[1:], cu_seqlens_k=ck)
    with pytest.raises(fascore.FlashAttentionError, match="max_seqlen_k"):
        fascore.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_k=3)
    with pytest.raises(fascore.FlashAttentionError, match="attn_bias with layout TND"):
        fascore.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, attn_bias=torch.zeros(1))


def test_operator_errors_say_they_come_from_attention():
    q, k, v = qkv(sq=8, skv=12, n=4, n2=3)  # 4 query heads, 3 kv heads
    with pytest.raises(fascore.FlashAttentionError, match=r"^fascore.attention: .*head_num \(q's head count\)=4"):
        fascore.attention(q, k, v)
