"""Error messages that carry the fix, for the mistakes code ported from other libraries makes, and
numpy scalars accepted wherever Python numbers are."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fascore

FA = fascore.npu_fusion_attention
FA2 = fascore.npu_fusion_attention_v2
CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def msg(fn, *args, **kw):
    with pytest.raises(fascore.FlashAttentionError) as e:
        fn(*args, **kw)
    assert e.value.status == 161002
    return str(e.value)


Q4 = _r(2, 16, 4, 8)  # BSND: B=2, S=16, N=4, D=8


# --------------------------------------------------------------------------- layouts and shapes
@pytest.mark.parametrize("given,meant", [("BHSD", "BNSD"), ("bhsd", "BNSD"), ("BSHD", "BSND"), ("BLHD", "BSND"),
                                         ("THD", "TND"), ("NHD", "TND"), ("SBHD", "SBH"), ("B S N D", "BSND"),
                                         ("BSE", "BSH")])
def test_layouts_of_other_libraries_say_what_they_are(given, meant):
    m = msg(FA, Q4, Q4, Q4, 4, given)
    assert f"did you mean {meant!r}" in m and "must be one of" in m


def test_unknown_layout_has_no_guess():
    assert "did you mean" not in msg(FA, Q4, Q4, Q4, 4, "XYZ")


def test_rank_mismatch_names_the_layouts_of_that_rank():
    assert "'BSND' [B, S, N, D] or 'BNSD'" in msg(FA, Q4, Q4, Q4, 4, "BSH")
    q3 = _r(2, 16, 32)
    assert "'BSH' [B, S, N*D]" in msg(FA, q3, q3, q3, 4, "BSND") and "'TND'" in msg(FA, q3, q3, q3, 4, "BSND")


def test_dtype_mismatch_says_how_to_convert():
    assert "key.to(torch.float32)" in msg(FA, Q4, Q4.half(), Q4.half(), 4, "BSND")
    qi = torch.ones(2, 16, 4, 8, dtype=torch.int32)
    assert "query.float()" in msg(FA, qi, qi, qi, 4, "BSND")


def test_kv_heads_passed_as_head_num():
    k = _r(2, 16, 2, 8)
    m = msg(FA, Q4, k, k, 2, "BSND")
    assert "key's head count N2" in m and "head_num=4" in m
    q, kh = _r(1, 8, 512), _r(1, 8, 128)  # BSH: 8 query heads, 2 kv heads, D = 64
    m = msg(FA, q, kh, kh, 2, "BSH")
    assert "key/value head count" in m and "head_num=8 (D=64)" in m
    assert "number of query heads" in msg(FA, q, kh, kh, 3, "BSH")


def test_bsnd_bnsd_swapped():
    qb = Q4.transpose(1, 2).contiguous()  # [2, 4, 16, 8] is BNSD
    m = msg(FA, qb, qb, qb, 4, "BSND")
    assert "looks like BNSD" in m and "input_layout='BNSD'" in m


def test_query_and_key_swapped_in_gqa():
    k = _r(2, 16, 2, 8)
    assert "swapped" in msg(FA, k, Q4, Q4, 2, "BSND")


# --------------------------------------------------------------------------- scalars
@pytest.mark.parametrize("kp,needle", [(0.0, "for no dropout pass keep_prob=1.0"), (90.0, "not a percentage"),
                                       (-0.1, "1 - dropout_p")])
def test_keep_prob_hints(kp, needle):
    assert needle in msg(FA, Q4, Q4, Q4, 4, "BSND", keep_prob=kp)


def test_sparse_mode_hints():
    assert "TND's varlen modes" in msg(FA, Q4, Q4, Q4, 4, "BSND", sparse_mode=7, atten_mask=CAUSAL)
    t = _r(10, 2, 8)
    assert "sparse_mode=6 is the compressed prefix mode" in msg(FA, t, t, t, 2, "TND", sparse_mode=5,
                                                               actual_seq_qlen=[10], actual_seq_kvlen=[10])


def test_band_int32_says_the_default_is_unbounded():
    m = msg(FA2, Q4, Q4, Q4, 4, "BSND", pre_tokens=2**31)
    assert "pre_tokens=2147483648" in m and "unbounded" in m


def test_padding_mask_says_what_to_use():
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", padding_mask=torch.zeros(1))
    assert "atten_mask" in m and "TND" in m


@pytest.mark.parametrize("value,needle", [(2.0, "pass int(2.0) = 2"), (torch.tensor([4]).float(), "int(x)"),
                                          ("4", "a string"), (np.array([4, 4]), "numpy array")])
def test_integer_hints(value, needle):
    assert needle in msg(FA, Q4, Q4, Q4, value, "BSND")


def test_real_hint_for_tensors():
    assert "float(x), e.g. float(0.125)" in msg(FA, Q4, Q4, Q4, 4, "BSND", scale=torch.tensor(0.125))


# --------------------------------------------------------------------------- TND lengths
T = _r(600, 2, 8)


def test_decreasing_lengths_give_their_cumsum():
    m = msg(FA, T, T, T, 2, "TND", actual_seq_qlen=[100, 200, 50], actual_seq_kvlen=[100, 300, 600])
    assert "per-sequence lengths" in m and "[100, 300, 350]" in m and "cumsum" in m


def test_lengths_over_the_total():
    k = _r(300, 2, 8)
    m = msg(FA, T, k, k, 2, "TND", actual_seq_qlen=[100, 300], actual_seq_kvlen=[200, 600])
    assert "exceeds T2=300" in m and "swapped" in m


def test_missing_lengths_explain_the_format():
    m = msg(FA, T, T, T, 2, "TND")
    assert "cumulative end offset" in m and "[3, 8]" in m and "cu_seqlens[1:]" in m


def test_lengths_without_tnd():
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", actual_seq_qlen=[16, 32], actual_seq_kvlen=[16, 32])
    assert "only for layout TND" in m and "atten_mask" in m and "'TND'" in m


def test_flash_attn_leading_zero_on_one_side():
    m = msg(FA, T, T, T, 2, "TND", actual_seq_qlen=[0, 100, 600], actual_seq_kvlen=[100, 600])
    assert "leading 0" in m and "cu_seqlens[1:]" in m


def test_lists_from_tensors_and_numbers():
    assert ".long()" in msg(FA, T, T, T, 2, "TND", actual_seq_qlen=torch.tensor([600.0]), actual_seq_kvlen=[600])
    assert "pass a list, e.g. [x]" in msg(FA, T, T, T, 2, "TND", actual_seq_qlen=600, actual_seq_kvlen=[600])


# --------------------------------------------------------------------------- atten_mask
def test_float_01_mask():
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=torch.triu(torch.ones(16, 16), 1))
    assert "atten_mask.bool()" in m and "atten_mask == 0" in m


def test_float_additive_mask():
    add = torch.zeros(16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    assert "atten_mask != 0" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=add)
    add_min = torch.zeros(16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    assert "atten_mask != 0" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=add_min)


def test_float_bias_as_mask_and_integer_mask():
    assert "pse_type=0" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=_r(16, 16))
    assert "atten_mask.bool()" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=torch.zeros(16, 16, dtype=torch.int64))


@pytest.mark.parametrize("shape,needle", [((2, 16, 16), "unsqueeze(1)"), ((2, 1, 1, 16), "key-padding"),
                                          ((2, 16), "key-padding"), ((2048, 2048), "compressed mask"),
                                          ((2, 2, 16, 16), "one mask for all heads")])
def test_full_mask_shape_hints(shape, needle):
    assert needle in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=torch.zeros(*shape, dtype=torch.bool))


def test_transposed_mask_and_mode5_batch():
    q, k = _r(2, 12, 4, 8), _r(2, 20, 4, 8)
    assert "atten_mask.T" in msg(FA, q, k, k, 4, "BSND", atten_mask=torch.zeros(20, 12, dtype=torch.bool))
    assert "expand it over the batch" in msg(FA, q, k, k, 4, "BSND", atten_mask=torch.zeros(12, 20, dtype=torch.bool),
                                             sparse_mode=5, prefix=[1, 2])


def test_tnd_mask_with_unit_dims():
    t = _r(10, 2, 8)
    assert "squeeze" in msg(FA, t, t, t, 2, "TND", atten_mask=torch.zeros(1, 1, 10, 10, dtype=torch.bool),
                            actual_seq_qlen=[10], actual_seq_kvlen=[10])


def test_compressed_mask_near_misses():
    full = torch.zeros(16, 16, dtype=torch.bool)
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=full, sparse_mode=3)
    assert "the same whatever Sq and Skv" in m and "sparse_mode=0 or 1" in m
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=~CAUSAL, sparse_mode=3)
    assert "complement" in m and "keep-mask" in m and "~atten_mask" in m
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=torch.ones(2048, 2048, dtype=torch.bool).triu(0), sparse_mode=2)
    assert "diagonal=1" in m
    assert "atten_mask.T" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=CAUSAL.T.contiguous(), sparse_mode=2)
    wrong_block = torch.cat([CAUSAL, torch.zeros(1024, 2048, dtype=torch.bool)])
    assert "[1024, 2048] block" in msg(FA, Q4, Q4, Q4, 4, "BSND", atten_mask=wrong_block, sparse_mode=6,
                                       prefix=[16, 16])


def test_prefix_required_says_the_form():
    q = _r(2, 16, 4, 8)
    m = msg(FA, q, q, q, 4, "BSND", atten_mask=torch.zeros(2, 1, 16, 16, dtype=torch.bool), sparse_mode=5)
    assert "prefix=[P] * 2" in m


# --------------------------------------------------------------------------- pse, sink, dropout_mask
def test_pse_hints():
    assert "pse.to(torch.float32)" in msg(FA, Q4, Q4, Q4, 4, "BSND", pse=_r(2, 4, 16, 16).half())
    assert "ALiBi slopes" in msg(FA, Q4, Q4, Q4, 4, "BSND", pse=_r(4))
    assert "[None, None].expand(1, 4, 16, 16)" in msg(FA, Q4, Q4, Q4, 4, "BSND", pse=_r(16, 16))
    assert "unsqueeze(0)" in msg(FA, Q4, Q4, Q4, 4, "BSND", pse=_r(4, 16, 16))
    assert "one bias for all heads" in msg(FA, Q4, Q4, Q4, 4, "BSND", pse=_r(2, 1, 16, 16))
    q, k = _r(2, 12, 4, 8), _r(2, 20, 4, 8)
    assert "transpose(-1, -2)" in msg(FA, q, k, k, 4, "BSND", pse=_r(2, 4, 20, 12))


def test_slopes_hints():
    assert "pse.float()" in msg(FA2, Q4, Q4, Q4, 4, "BSND", pse=_r(4).half(), pse_type=2)
    assert "4-D pse is a bias" in msg(FA2, Q4, Q4, Q4, 4, "BSND", pse=_r(2, 4, 16, 16), pse_type=2)
    q, k = _r(2, 12, 4, 8), _r(2, 20, 4, 8)
    assert "pse_type=0" in msg(FA2, q, k, k, 4, "BSND", pse=_r(4), pse_type=2)


def test_sink_and_dropout_mask_hints():
    assert "sink.float()" in msg(FA, Q4, Q4, Q4, 4, "BSND", sink=_r(4).half())
    keep = torch.ones(2 * 4 * 16 * 16, dtype=torch.bool)
    m = msg(FA, Q4, Q4, Q4, 4, "BSND", keep_prob=0.9, dropout_mask=keep)
    assert "pack 8 per byte" in m and "least significant" in m


# --------------------------------------------------------------------------- numpy scalars
def test_numpy_scalars_are_numbers():
    q, k = _r(2, 16, 4, 8), _r(2, 16, 2, 8)
    ref = FA2(q, k, k, 4, "BSND", scale=0.25, keep_prob=0.9, seed=7, atten_mask=CAUSAL, sparse_mode=4,
              pre_tokens=3, next_tokens=1)
    got = FA2(q, k, k, np.int64(4), "BSND", scale=np.float32(0.25), keep_prob=np.float64(0.9), seed=np.uint32(7),
              atten_mask=CAUSAL, sparse_mode=np.int8(4), pre_tokens=np.int32(3), next_tokens=np.int16(1))
    assert torch.equal(ref[0], got[0]) and got[4:] == ref[4:]
    assert type(got[4]) is int and type(got[5]) is int


def test_numpy_lengths_and_prefix():
    t = _r(30, 2, 8)
    ref = FA(t, t, t, 2, "TND", actual_seq_qlen=[10, 30], actual_seq_kvlen=[10, 30])[0]
    for cq in ([np.int64(10), np.int64(30)], np.array([10, 30]), np.array([10, 30], dtype=np.int32)):
        assert torch.equal(FA(t, t, t, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=cq)[0], ref)
    q = _r(2, 16, 4, 8)
    m5 = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    assert torch.equal(FA(q, q, q, 4, "BSND", atten_mask=m5, sparse_mode=5, prefix=np.array([3, 4]))[0],
                       FA(q, q, q, 4, "BSND", atten_mask=m5, sparse_mode=5, prefix=[3, 4])[0])


def test_numpy_in_aclnn_and_grad():
    q = _r(2, 16, 4, 8)
    out, smax, ssum, *_ = FA(q, q, q, 4, "BSND", scale=0.3)
    dy = torch.ones_like(out)
    a = fascore.npu_fusion_attention_grad(q, q, q, dy, 4, "BSND", softmax_max=smax, softmax_sum=ssum,
                                          attention_in=out, scale_value=0.3)
    b = fascore.npu_fusion_attention_grad(q, q, q, dy, np.int64(4), "BSND", softmax_max=smax, softmax_sum=ssum,
                                          attention_in=out, scale_value=np.float64(0.3))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


def test_numpy_bools_and_arrays_are_still_rejected():
    assert "must be an integer" in msg(FA, Q4, Q4, Q4, np.bool_(True), "BSND")
    assert "must be a real number" in msg(FA, Q4, Q4, Q4, 4, "BSND", scale=np.array([0.1, 0.2]))
