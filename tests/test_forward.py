"""Forward correctness of fascore against the independent oracle (SPEC sections 2-5, 7)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import (MULTI_BLOCK, assert_within_rule, band_ok, call_forward, causal_slopes,
                      check_forward, gen, make_qkv, multi_block_case, random_mask, randn)
from oracle import (FLT_MAX, attention_oracle, compressed_causal_mask, compressed_prefix_mask,
                    oracle_numels)

pytestmark = pytest.mark.usefixtures("engine")

LAYOUTS = ["BSH", "SBH", "BSND", "BNSD"]
CAUSAL = compressed_causal_mask()
PREFIX = compressed_prefix_mask()


# ----------------------------------------------------------------------------------------------
# Layouts, GQA, head dims, dtypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("G", [1, 2, 8])
def test_layouts_gqa(layout, G):
    N2 = 1 if G == 8 else 2
    inp = make_qkv(layout, B=2, N1=N2 * G, N2=N2, Sq=7, Skv=11, D=12, seed=G)
    check_forward(inp, scale=0.3)


@pytest.mark.parametrize("layout", LAYOUTS + ["TND"])
def test_dv_smaller_than_d(layout):
    kw = dict(seqlens_q=[5, 3], seqlens_kv=[4, 6]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=9, Skv=6, D=16, Dv=5, seed=3, **kw)
    res = check_forward(inp, scale=0.25)
    assert res[0].shape[-1] == (5 if layout in ("BSND", "BNSD", "TND") else 4 * 5)


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "TND"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(layout, dtype):
    kw = dict(seqlens_q=[6, 10], seqlens_kv=[6, 10]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=10, Skv=13, D=16, Dv=16, dtype=dtype, seed=4,
                   **kw)
    check_forward(inp, scale=0.25, atten_mask=CAUSAL, sparse_mode=3)
    check_forward(inp, scale=0.25)


def test_scale_is_rounded_to_float32():
    """SPEC 3 / decisions: scale is used as a float32 number, also for float64 inputs (where the
    tolerance is ~1e-12, far below the 1e-8 relative change of rounding 0.1 to float32)."""
    inp = make_qkv("BSH", B=1, N1=2, Sq=6, Skv=7, D=8, dtype=torch.float64, seed=44)
    inp["query"] = inp["query"] * 8
    check_forward(inp, scale=0.1)


def test_lowercase_layout():
    inp = make_qkv("BSND", B=1, N1=2, Sq=5, Skv=6, D=8, seed=5)
    inp["input_layout"] = "bsnd"
    check_forward(inp, scale=0.3)


@pytest.mark.parametrize("layout", LAYOUTS + ["TND"])
def test_rope(layout):
    kw = dict(seqlens_q=[4, 5], seqlens_kv=[7, 2]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=5, Skv=7, D=8, Dv=6, Dr=4, seed=6, **kw)
    check_forward(inp, scale=0.3)
    # the rope part really contributes
    plain = {k: v for k, v in inp.items() if k not in ("query_rope", "key_rope")}
    a = call_forward("v2", inp, scale=0.3)[0]
    b = attention_oracle(**plain, scale=0.3)[0]
    assert (a.double() - b).abs().max() > 1e-3


def test_v1_entry_point():
    inp = make_qkv("BSH", B=2, N1=2, Sq=9, Skv=7, D=8, seed=7)
    mask = random_mask((2, 1, 9, 7), 0.2, seed=7)
    pse = randn((2, 2, 9, 7), torch.float32, gen(8))
    check_forward(inp, api="v1", scale=0.5, pse=pse, atten_mask=mask, pre_tokens=3,
                  next_tokens=1, sparse_mode=0)


# ----------------------------------------------------------------------------------------------
# pse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("pse_shape", ["B,N1,Sq,Skv", "1,N1,Sq,Skv", "B,N1,1,Skv", "1,N1,1,Skv"])
def test_pse_tensor(pse_type, pse_shape):
    B, N1, Sq, Skv = 2, 4, 7, 9
    inp = make_qkv("BNSD", B=B, N1=N1, N2=2, Sq=Sq, Skv=Skv, D=8, seed=9)
    dims = dict(B=B, N1=N1, Sq=Sq, Skv=Skv)
    shape = [dims.get(s, 1) if s != "1" else 1 for s in pse_shape.split(",")]
    pse = randn(shape, torch.float32, gen(10), scale=2.0)
    check_forward(inp, scale=0.35, pse=pse, pse_type=pse_type)
    check_forward(inp, scale=0.35, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pse_low_precision(dtype):
    inp = make_qkv("BSH", B=2, N1=2, Sq=6, Skv=10, D=8, dtype=dtype, seed=11)
    pse = randn((2, 2, 6, 10), dtype, gen(11))
    check_forward(inp, scale=0.35, pse=pse, pse_type=1)
    check_forward(inp, scale=0.35, pse=pse, pse_type=0)


@pytest.mark.parametrize("pse_type", [2, 3])
@pytest.mark.parametrize("slope_shape", ["B,N1", "N1"])
@pytest.mark.parametrize("starts", [None, (2, 0), (0, 3), (5, 1)])
def test_alibi_in_kernel(pse_type, slope_shape, starts):
    B, N1, S = 2, 4, 9
    inp = make_qkv("BSND", B=B, N1=N1, N2=2, Sq=S, Skv=S, D=8, seed=12)
    slopes = torch.rand(B, N1, generator=gen(13)) * 0.8 + 0.1
    if slope_shape == "N1":
        slopes = slopes[0]
    kw = dict(scale=0.3, pse=slopes.float(), pse_type=pse_type)
    if starts is not None:
        kw["q_start_idx"], kw["kv_start_idx"] = [starts[0]], [starts[1]]
    check_forward(inp, **kw)  # no mask: every |distance| sign occurs, start indices matter
    check_forward(inp, atten_mask=CAUSAL, sparse_mode=3, **kw)


@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("mode", [2, 3, 0])
def test_compressed_alibi_pse(pse_type, mode):
    S = 1030
    inp = make_qkv("BNSD", B=1, N1=1, Sq=S, Skv=S, D=4, seed=14)
    pse = randn((1, 1, 1024, S), torch.float32, gen(15))  # NOT diagonal-constant on purpose
    if mode == 0:
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        mask[700:, 3] = True  # user mask entries beyond the causal pattern
        kw = dict(atten_mask=mask, pre_tokens=S, next_tokens=0)
    else:
        kw = dict(atten_mask=CAUSAL)
    check_forward(inp, scale=0.5, pse=pse, pse_type=pse_type, sparse_mode=mode, **kw)


def test_pse_with_1024_rows_at_sq_1024_is_a_full_pse():
    """SPEC 3: with Sq == 1024 a [.., 1024, Skv] pse is an ordinary full pse (no causal pattern
    needed, Skv may differ)."""
    inp = make_qkv("BNSD", B=1, N1=1, Sq=1024, Skv=6, D=2, seed=43)
    pse = randn((1, 1, 1024, 6), torch.float32, gen(43), scale=3.0)
    check_forward(inp, scale=0.5, pse=pse, pse_type=0)


def test_compressed_alibi_pse_batch_broadcast():
    S = 1029
    inp = make_qkv("BSH", B=2, N1=1, Sq=S, Skv=S, D=2, seed=16)
    pse = randn((2, 1, 1024, S), torch.float32, gen(17))
    check_forward(inp, scale=0.5, pse=pse, atten_mask=CAUSAL, sparse_mode=3)


def test_compressed_alibi_equals_full_alibi():
    """A diagonal-constant bias given compressed must act like the same bias given in full."""
    S = 1027
    inp = make_qkv("BNSD", B=1, N1=1, Sq=S, Skv=S, D=4, seed=18)
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    full = (-0.05 * (i - j).abs().float()).view(1, 1, S, S)
    comp = full[:, :, S - 1024:].contiguous()
    kw = dict(scale=0.5, atten_mask=CAUSAL, sparse_mode=2)
    res = check_forward(inp, pse=comp, **kw)
    ref = attention_oracle(**inp, pse=full, **kw)
    assert_within_rule("out", res[0], ref[0], attention_oracle(**inp, pse=full, dtype=torch.float32,
                                                               **kw)[0], torch.float32)


# ----------------------------------------------------------------------------------------------
# sparse modes
# ----------------------------------------------------------------------------------------------
SIZES = [(7, 11), (11, 7), (1, 9), (9, 1), (13, 13), (1, 1)]


def mode_kwargs(mode, B, N1, Sq, Skv, seed, mask_dtype=torch.bool):
    d = Skv - Sq
    if mode == 0:
        pre, nxt = 3, 2
        if not band_ok(pre, nxt, Sq, Skv):
            pre, nxt = Sq, Skv
        return dict(atten_mask=random_mask((B, 1, Sq, Skv), 0.25, seed, mask_dtype),
                    pre_tokens=pre, next_tokens=nxt)
    if mode == 1:
        return dict(atten_mask=random_mask((B, N1, Sq, Skv), 0.3, seed, mask_dtype),
                    pre_tokens=0, next_tokens=0)  # ignored in mode 1
    if mode in (2, 3):
        return dict(atten_mask=CAUSAL.to(mask_dtype))
    if mode == 4:
        pre, nxt = 2, 1
        if not band_ok(pre - d, nxt + d, Sq, Skv):
            pre, nxt = 2 + abs(d), 1 + abs(d)
        assert band_ok(pre - d, nxt + d, Sq, Skv)
        return dict(atten_mask=CAUSAL.to(mask_dtype), pre_tokens=pre, next_tokens=nxt)
    if mode == 5:
        return dict(atten_mask=random_mask((B, 1, Sq, Skv), 0.2, seed, mask_dtype),
                    prefix=[min(Skv, 3), 0][:B])
    if mode == 6:
        lo = max(0, d)
        return dict(atten_mask=PREFIX.to(mask_dtype), prefix=[lo, (lo + Skv + 1) // 2][:B])
    raise ValueError(mode)


@pytest.mark.parametrize("mode", range(7))
@pytest.mark.parametrize("Sq,Skv", SIZES)
def test_sparse_modes(mode, Sq, Skv):
    B, N1 = 2, 2
    inp = make_qkv("BSND", B=B, N1=N1, Sq=Sq, Skv=Skv, D=5, Dv=3, seed=mode * 31 + Sq)
    check_forward(inp, scale=0.4, sparse_mode=mode, **mode_kwargs(mode, B, N1, Sq, Skv, Sq))


@pytest.mark.parametrize("mode", [0, 1, 2, 5, 6])
def test_sparse_modes_uint8_masks(mode):
    B, N1, Sq, Skv = 2, 2, 6, 10
    inp = make_qkv("BSH", B=B, N1=N1, Sq=Sq, Skv=Skv, D=4, seed=19)
    kw = mode_kwargs(mode, B, N1, Sq, Skv, 19, mask_dtype=torch.uint8)
    if mode in (0, 1, 5):  # "any non-zero value means masked out"
        kw["atten_mask"] = kw["atten_mask"] * torch.randint(1, 200, kw["atten_mask"].shape,
                                                            generator=gen(3), dtype=torch.uint8)
    check_forward(inp, scale=0.4, sparse_mode=mode, **kw)


@pytest.mark.parametrize("shape", ["Sq,Skv", "1,1,Sq,Skv", "B,1,Sq,Skv", "B,N1,Sq,Skv"])
@pytest.mark.parametrize("mode", [0, 1])
def test_full_mask_shapes(shape, mode):
    B, N1, Sq, Skv = 2, 4, 5, 7
    inp = make_qkv("SBH", B=B, N1=N1, N2=2, Sq=Sq, Skv=Skv, D=4, seed=20)
    dims = dict(B=B, N1=N1, Sq=Sq, Skv=Skv)
    mshape = [int(s) if s.isdigit() else dims[s] for s in shape.split(",")]
    mask = random_mask(mshape, 0.3, 21)
    check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=mask, pre_tokens=4, next_tokens=1)


@pytest.mark.parametrize("mode", [2, 3, 4, 6])
def test_compressed_mask_with_unit_dims(mode):
    inp = make_qkv("BNSD", B=1, N1=2, Sq=6, Skv=9, D=4, seed=22)
    m = (PREFIX if mode == 6 else CAUSAL).view(1, 1, *(PREFIX if mode == 6 else CAUSAL).shape)
    kw = dict(prefix=[5]) if mode == 6 else {}
    check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=m, pre_tokens=1, next_tokens=0,
                  **kw)


@pytest.mark.parametrize("pre,nxt", [(0, 0), (2, -1), (-2, 4), (1, 0), (0, 3), (100, 100),
                                     (2147483647, 0), (0, 2147483647)])
@pytest.mark.parametrize("Sq,Skv", [(6, 9), (9, 6)])
def test_mode0_band(pre, nxt, Sq, Skv):
    if not band_ok(pre, nxt, Sq, Skv):
        pytest.skip("invalid band")
    inp = make_qkv("BSND", B=1, N1=2, Sq=Sq, Skv=Skv, D=4, seed=23)
    mask = torch.zeros(Sq, Skv, dtype=torch.bool)
    check_forward(inp, scale=0.4, atten_mask=mask, pre_tokens=pre, next_tokens=nxt)


@pytest.mark.parametrize("pre,nxt", [(0, 0), (3, -1), (-1, 2), (2147483647, 2147483647)])
@pytest.mark.parametrize("Sq,Skv", [(5, 9), (9, 5)])
def test_mode4_band(pre, nxt, Sq, Skv):
    d = Skv - Sq
    if not band_ok(pre - d, nxt + d, Sq, Skv):
        pytest.skip("invalid band")
    inp = make_qkv("BSND", B=2, N1=2, Sq=Sq, Skv=Skv, D=4, seed=24)
    check_forward(inp, scale=0.4, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=pre,
                  next_tokens=nxt)


@pytest.mark.parametrize("prefix", [[0, 9], [9, 2], [4, 4]])
@pytest.mark.parametrize("mask_heads", [1, 2])
def test_prefix_mode5(prefix, mask_heads):
    B, N1, Sq, Skv = 2, 2, 5, 9
    inp = make_qkv("BSH", B=B, N1=N1, Sq=Sq, Skv=Skv, D=4, seed=25)
    mask = random_mask((B, mask_heads, Sq, Skv), 0.15, 25)
    check_forward(inp, scale=0.4, sparse_mode=5, atten_mask=mask, prefix=prefix)


@pytest.mark.parametrize("mshape", [(5, 9), (1, 1, 5, 9), (1, 2, 5, 9)])
def test_prefix_mode5_single_batch_any_full_mask(mshape):
    inp = make_qkv("BSND", B=1, N1=2, Sq=5, Skv=9, D=4, seed=42)
    mask = random_mask(mshape, 0.2, 42)
    check_forward(inp, scale=0.4, sparse_mode=5, atten_mask=mask, prefix=[6])


@pytest.mark.parametrize("Sq,Skv,prefix", [(5, 9, [4, 9]), (9, 5, [0, 5]), (7, 7, [3, 0])])
def test_prefix_mode6(Sq, Skv, prefix):
    inp = make_qkv("BNSD", B=2, N1=2, Sq=Sq, Skv=Skv, D=4, seed=26)
    check_forward(inp, scale=0.4, sparse_mode=6, atten_mask=PREFIX, prefix=prefix)


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_no_mask_means_no_masking(mode):
    inp = make_qkv("BSND", B=2, N1=2, Sq=6, Skv=9, D=4, seed=27)
    kw = dict(pre_tokens=0, next_tokens=0) if mode in (0, 4) else {}
    res = check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=None, **kw)
    # nothing masked == plain dense attention
    ref = attention_oracle(**inp, scale=0.4)[0]
    assert (res[0].double() - ref).abs().max() < 1e-5


def test_sparse_mode_without_mask_warns_once_per_process(engine):
    code = textwrap.dedent(f"""
        import warnings, torch, fascore
        fascore.use_engine({engine!r}).__enter__()
        q = torch.randn(1, 3, 2, 4)
        def call(mode):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                fascore.npu_fusion_attention_v2(q, q, q, 2, "BSND", sparse_mode=mode)
            return sum(issubclass(x.category, UserWarning) for x in w)
        with warnings.catch_warnings(record=True) as w0:
            warnings.simplefilter("always")
            fascore.npu_fusion_attention_v2(q, q, q, 2, "BSND", sparse_mode=0)
        first0 = sum(issubclass(x.category, UserWarning) for x in w0)
        print(first0, call(2), call(3), call(4))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "0", "0"], out.stdout


# ----------------------------------------------------------------------------------------------
# TND
# ----------------------------------------------------------------------------------------------
TND_CASES = {
    "plain": dict(seqlens_q=[3, 5], seqlens_kv=[4, 2]),
    "empty_middle": dict(cum_q=[2, 2, 7], cum_kv=[3, 3, 6]),
    "empty_first": dict(cum_q=[0, 4, 9], cum_kv=[0, 5, 6]),
    "trailing_zeros": dict(cum_q=[3, 7, 0, 0], cum_kv=[5, 6, 0, 0]),
    "pad_rows": dict(seqlens_q=[4, 1, 3], seqlens_kv=[2, 5, 3], pad_q=3, pad_kv=2),
    "one_batch": dict(seqlens_q=[5], seqlens_kv=[8]),
}


@pytest.mark.parametrize("case", list(TND_CASES))
@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("mode", [0, 2, 3])
def test_tnd(case, softmax_layout, mode):
    inp = make_qkv("TND", N1=4, N2=2, D=6, Dv=5, seed=28, **TND_CASES[case])
    kw = {}
    if mode == 0:
        kw = dict(atten_mask=None)
    else:
        kw = dict(atten_mask=CAUSAL, sparse_mode=mode)
    res = check_forward(inp, scale=0.4, softmax_layout=softmax_layout, **kw)
    covered = max(inp["actual_seq_qlen"])
    assert (res[0][covered:] == 0).all() and (res[1][covered:] == 0).all()


@pytest.mark.parametrize("shape", ["max", "total"])
@pytest.mark.parametrize("mode", [0, 1])
def test_tnd_full_masks(shape, mode):
    lq, lk = [3, 0, 4, 2], [5, 2, 3, 4]
    inp = make_qkv("TND", N1=2, D=4, seed=29, seqlens_q=lq, seqlens_kv=lk, pad_q=1)
    mshape = (max(lq), max(lk)) if shape == "max" else (sum(lq) + 1, sum(lk))
    mask = random_mask(mshape, 0.3, 29)
    check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=mask, pre_tokens=3,
                  next_tokens=1)


@pytest.mark.parametrize("pre,nxt", [(1, 1), (0, 2), (3, 0)])
def test_tnd_mode4_and_6(pre, nxt):
    lq, lk = [3, 6, 4], [5, 6, 2]
    inp = make_qkv("TND", N1=2, D=4, seed=30, seqlens_q=lq, seqlens_kv=lk)
    ok = all(band_ok(pre - (k - q), nxt + (k - q), q, k) for q, k in zip(lq, lk))
    if ok:
        check_forward(inp, scale=0.4, sparse_mode=4, atten_mask=CAUSAL, pre_tokens=pre,
                      next_tokens=nxt)
    prefix = [max(0, k - q) + pre for q, k in zip(lq, lk)]
    prefix = [min(p, k) for p, k in zip(prefix, lk)]
    check_forward(inp, scale=0.4, sparse_mode=6, atten_mask=PREFIX, prefix=prefix)


# SPEC's split examples: a long causal sequence whose query (mode 8) or key (mode 7) axis is
# cut into pieces; the band batch carries the diagonal block.
SPLIT_CASES = [  # (mode, cumulative q, cumulative kv, pre, next)
    (7, [4, 8, 11], [6, 14, 18], 0, 3),  # last batch (Sq=3, Skv=4) is the band
    (7, [2, 7, 0], [3, 9, 0], 1, 1),  # trailing-zero padding; band is batch 1
    (7, [3, 3, 8, 8], [4, 6, 10, 13], 2, 0),  # an empty last batch: band is batch 2
    (8, [3, 7, 12], [3, 6, 8], 0, 2),  # first batch is the band
    (8, [0, 0, 4, 10], [0, 3, 7, 10], 2, 1),  # empty first batches: band is batch 2
    (8, [2, 7], [4, 4], 1, 0),  # second batch has Skv = 0 -> all its rows invalid
]


@pytest.mark.parametrize("mode,cq,ck,pre,nxt", SPLIT_CASES)
@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_split_modes_7_8(mode, cq, ck, pre, nxt, softmax_layout):
    inp = make_qkv("TND", N1=2, D=4, seed=31, cum_q=cq, cum_kv=ck)
    check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=CAUSAL, pre_tokens=pre,
                  next_tokens=nxt, softmax_layout=softmax_layout)


@pytest.mark.parametrize("mode", [3, 7, 8])
@pytest.mark.parametrize("pse_type", [2, 3])
def test_tnd_alibi_start_indices(mode, pse_type):
    lq = [4, 3, 5]
    inp = make_qkv("TND", N1=2, D=4, seed=32, seqlens_q=lq, seqlens_kv=lq)
    slopes = causal_slopes(2 * 3, seed=32).view(3, 2)
    # next_tokens=2 opens the band above the diagonal so that the start indices change results;
    # mode 8 needs actual_seq_qlen[0] - actual_seq_kvlen[0] + qs - ks == 0 (SPEC 3)
    check_forward(inp, scale=0.4, sparse_mode=mode, atten_mask=CAUSAL, pre_tokens=1,
                  next_tokens=2, pse=slopes, pse_type=pse_type, q_start_idx=[3],
                  kv_start_idx=[3 if mode == 8 else 1])
    check_forward(inp, scale=0.4, pse=slopes[0], pse_type=pse_type, q_start_idx=[0],
                  kv_start_idx=[4])


@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("mode", [0, 2, 3])
def test_tnd_compressed_pse(pse_type, mode):
    lens = [3, 6, 0, 5]
    inp = make_qkv("TND", N1=2, D=4, seed=33, seqlens_q=lens, seqlens_kv=lens)
    pse = randn((1, 2, 1024, 6), torch.float32, gen(34))
    if mode == 0:
        kw = dict(atten_mask=torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), pre_tokens=6,
                  next_tokens=0)
    else:
        kw = dict(atten_mask=CAUSAL, sparse_mode=mode)
    check_forward(inp, scale=0.4, pse=pse, pse_type=pse_type, **kw)
    pse_b = randn((4, 2, 1024, 6), torch.float32, gen(35))
    check_forward(inp, scale=0.4, pse=pse_b, pse_type=pse_type, **kw)


def test_tnd_batch_without_keys_full_mask():
    """A batch with Sq_b > 0 and Skv_b = 0: its rows are invalid (nothing takes part), also with
    a full mask (mode 0/1)."""
    q, k = randn((3, 1, 2), torch.float32, gen(45)), randn((4, 1, 2), torch.float32, gen(46))
    inp = dict(query=q, key=k, value=k, head_num=1, input_layout="TND",
               actual_seq_qlen=[1, 3, 3], actual_seq_kvlen=[0, 2, 4])
    check_forward(inp)
    check_forward(inp, sparse_mode=1, atten_mask=torch.zeros(2, 2, dtype=torch.bool))
    check_forward(inp, sparse_mode=0, atten_mask=torch.zeros(3, 4, dtype=torch.bool),
                  pre_tokens=1, next_tokens=1)


# ----------------------------------------------------------------------------------------------
# several tiles: sizes beyond typical block sizes (256 / 512), N = 1 to stay cheap
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MULTI_BLOCK))
def test_multi_block(name):
    inp, kw = multi_block_case(name)
    check_forward(inp, scale=0.35, **kw)


# ----------------------------------------------------------------------------------------------
# sink, invalid rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "TND"])
@pytest.mark.parametrize("mode", [0, 1, 3])
def test_sink(layout, mode):
    kw = dict(seqlens_q=[5, 4], seqlens_kv=[3, 7]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=6, Skv=8, D=4, seed=36, **kw)
    sink = torch.tensor([0.5, -1.0, 3.0, 8.0])  # head 3: sink dominates
    if mode == 0:
        mk = {}
    elif mode == 1:
        shape = (5, 7) if layout == "TND" else (2, 1, 6, 8)
        m = random_mask(shape, 0.3, 36)
        m[..., 2, :] = True  # a row where nothing takes part: max = sink, sum = 1, out 0
        mk = dict(atten_mask=m)
    else:
        mk = dict(atten_mask=CAUSAL)
    res = check_forward(inp, scale=0.4, sparse_mode=mode, sink=sink, **mk)
    if mode == 1 and layout == "BSH":
        assert torch.equal(res[1][:, :, 2, 0], sink.expand(2, 4))
        assert (res[2][:, :, 2] == 1).all() and (res[0][:, 2] == 0).all()


@pytest.mark.parametrize("inner_precise", [0, 1, 2, 3])
def test_invalid_rows(inner_precise):
    B, N1, Sq, Skv = 2, 2, 9, 4
    inp = make_qkv("BNSD", B=B, N1=N1, Sq=Sq, Skv=Skv, D=4, seed=37)
    mask = random_mask((B, N1, Sq, Skv), 0.3, 37)
    mask[:, :, 0] = True
    mask[1, 0, 5] = True
    res = check_forward(inp, scale=0.4, sparse_mode=1, atten_mask=mask,
                        inner_precise=inner_precise)
    assert (res[0][:, :, 0] == 0).all() and (res[0][1, 0, 5] == 0).all()
    assert (res[1][:, :, 0] == -FLT_MAX).all() and (res[2][:, :, 0] == FLT_MAX).all()
    # mode 3 with Sq > Skv: rows i < Sq - Skv see nothing
    res = check_forward(inp, scale=0.4, sparse_mode=3, atten_mask=CAUSAL,
                        inner_precise=inner_precise)
    assert (res[1][:, :, :5] == -FLT_MAX).all() and (res[0][:, :, :5] == 0).all()
    # mode 0 band leaving rows empty
    check_forward(inp, scale=0.4, atten_mask=torch.zeros(Sq, Skv, dtype=torch.bool),
                  pre_tokens=0, next_tokens=1, inner_precise=inner_precise)


# ----------------------------------------------------------------------------------------------
# returned values, inputs untouched, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "TND"])
def test_returned_seed_offset_numels(layout):
    kw = dict(seqlens_q=[3, 0, 5], seqlens_kv=[2, 4, 6], pad_q=2) if layout == "TND" else {}
    inp = make_qkv(layout, B=3, N1=2, Sq=5, Skv=7, D=4, seed=38, **kw)
    res = call_forward("v2", inp, scale=0.5, seed=1234, offset=56)
    expect = oracle_numels(inp["query"], inp["key"], 2, layout, inp.get("actual_seq_qlen"),
                           inp.get("actual_seq_kvlen"))
    assert expect == (2 * (3 * 2 + 0 + 5 * 6) if layout == "TND" else 3 * 2 * 5 * 7)
    assert res[4] == 1234 and res[5] == 56 and res[6] == expect
    assert all(type(x) is int for x in res[4:7])
    res = call_forward("v1", inp, scale=0.5, keep_prob=0.5, seed=5, offset=7)
    assert res[4] == 5 and res[5] == 7 and res[6] == expect


def test_inputs_not_modified():
    inp = make_qkv("BSH", B=2, N1=2, Sq=5, Skv=6, D=4, seed=39)
    pse = randn((2, 2, 5, 6), torch.float32, gen(39))
    mask = random_mask((2, 1, 5, 6), 0.3, 39)
    sink = torch.tensor([0.1, 0.2])
    tensors = [inp["query"], inp["key"], inp["value"], pse, mask, sink]
    before = [t.clone() for t in tensors]
    call_forward("v2", inp, pse=pse, atten_mask=mask, sink=sink, keep_prob=0.7, seed=3)
    for a, b in zip(tensors, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [
    dict(sparse_mode=9), dict(pse_type=4), dict(inner_precise=4), dict(keep_prob=0.0),
    dict(keep_prob=1.5), dict(softmax_layout="TND"), dict(padding_mask="ones"),
    dict(sparse_mode=2, atten_mask="bad_causal"), dict(sparse_mode=7, atten_mask="causal"),
])
def test_invalid_arguments_raise(fa, bad):
    inp = make_qkv("BSND", B=1, N1=2, Sq=4, Skv=4, D=4, seed=40)
    bad = dict(bad)
    if bad.get("atten_mask") == "bad_causal":
        m = CAUSAL.clone()
        m[100, 3] = True
        bad["atten_mask"] = m
    elif bad.get("atten_mask") == "causal":
        bad["atten_mask"] = CAUSAL
    if bad.get("padding_mask") == "ones":
        bad["padding_mask"] = torch.ones(1, 1, 4, 4)
    with pytest.raises(fa.FlashAttentionError) as ei:
        call_forward("v2", inp, **bad)
    assert isinstance(ei.value, ValueError) and ei.value.status == 161002


def test_tnd_decreasing_seqlen_rejected(fa):
    inp = make_qkv("TND", N1=2, D=4, seed=41, cum_q=[3, 5], cum_kv=[3, 5])
    with pytest.raises(fa.FlashAttentionError) as ei:
        call_forward("v2", dict(inp, actual_seq_qlen=[3, 2]))
    assert ei.value.status == 161002
    with pytest.raises(fa.FlashAttentionError) as ei:
        fa.npu_fusion_attention_v2(None, inp["key"], inp["value"], 2, "TND",
                                   actual_seq_qlen=[3, 5], actual_seq_kvlen=[3, 5])
    assert ei.value.status == 161001
