"""Self-tests of the oracle (tests/oracle.py).  They do not touch fascore.

The oracle is checked against (a) published Philox known-answer vectors and SPEC section 5's stream, (b) torch's own
scaled_dot_product_attention, (c) a scalar, loop-per-element re-statement of SPEC sections 3-5
written separately below, and (d) hand-written "takes part" tables for every sparse mode."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from conftest import cumsum, gen, layout_shape, make_qkv, randn
from oracle import (FLT_MAX, attention_oracle, compressed_causal_mask, compressed_prefix_mask,
                    ascend_byte, ascend_keep_bits, flat_keep_bits, pack_bits, philox4x32,
                    philox4x32_10, takes_part, tnd_batches, unpack_dropout_mask)

# ----------------------------------------------------------------------------------------------
# Philox / bit packing
# ----------------------------------------------------------------------------------------------
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert philox4x32_10(ctr, key) == expected


def test_ascend_stream_mapping():
    """SPEC section 5: key (seed lo, seed hi), 7 rounds, counter ceil(offset/16) + e // 16 as
    (c lo, c hi, 0, 0), the 16 little-endian bytes of the 4 words are elements 16c .. 16c+15."""
    seed = (0x299F31D0 << 32) | 0xA4093822
    key = (0xA4093822, 0x299F31D0)
    for offset in (0, 1, 15, 16, 17, 40):
        c0 = -(-offset // 16)
        words = philox4x32((c0, 0, 0, 0), key, 7)
        want = [(w >> (8 * k)) & 0xFF for w in words for k in range(4)]
        assert [ascend_byte(seed, offset, e) for e in range(16)] == want
        words = philox4x32((c0 + 1, 0, 0, 0), key, 7)
        assert ascend_byte(seed, offset, 16 + 5) == (words[1] >> 8) & 0xFF
    # the counter carries into its high word: offset 16 * (2^32 - 1) starts at counter 2^32 - 1
    off = 16 * (2**32 - 1)
    assert ascend_byte(seed, off, 16) == philox4x32((0, 1, 0, 0), key, 7)[0] & 0xFF
    assert ascend_byte(seed, off, 0) == philox4x32((0xFFFFFFFF, 0, 0, 0), key, 7)[0] & 0xFF
    # 7 rounds differ from Random123's default 10
    assert philox4x32((0, 0, 0, 0), (0, 0), 7) != philox4x32_10((0, 0, 0, 0), (0, 0))
    # seed taken mod 2^64
    assert ascend_byte(-1, 3, 7) == ascend_byte(2**64 - 1, 3, 7)


def test_ascend_keep_threshold_and_padding():
    """keep iff byte <= keep_prob * 255; rows numbered with Skv padded to 16."""
    seed, offset, kp = 77, 5, 0.5
    bits = ascend_keep_bits(seed, offset, kp, [(2, 3)], 2)  # N1 = 2, Sq = 2, Skv = 3 -> row 16
    want = [ascend_byte(seed, offset, (n * 2 + i) * 16 + j) <= 127.5 for n in range(2) for i in range(2)
            for j in range(3)]
    assert bits.tolist() == want
    # TND: batches follow each other, each N1 * Sq_b * Skv16_b
    bits = ascend_keep_bits(seed, offset, kp, [(1, 17), (2, 2)], 1)
    want = [ascend_byte(seed, offset, j) <= 127.5 for j in range(17)]
    want += [ascend_byte(seed, offset, 32 + i * 16 + j) <= 127.5 for i in range(2) for j in range(2)]
    assert bits.tolist() == want
    # exact real comparison: the double nearest 1/255 lies just below it, so only byte 0 is kept
    assert Fraction(1 / 255) * 255 < 1
    bits = flat_keep_bits(seed, 0, 400, 1 / 255)
    assert bits.tolist() == [ascend_byte(seed, 0, f) == 0 for f in range(400)] and any(bits.tolist())
    bits = flat_keep_bits(seed, 0, 400, 0.75)  # 191.25
    assert bits.tolist() == [ascend_byte(seed, 0, f) <= 191 for f in range(400)]
    frac = flat_keep_bits(12345, 0, 8000, 0.25).float().mean().item()
    assert abs(frac - 0.25) < 0.03


def test_bit_unpacking_lsb_first():
    m = torch.tensor([0x01, 0x80, 0b10100000], dtype=torch.uint8)
    bits = unpack_dropout_mask(m, 20).tolist()
    assert bits[:8] == [True] + [False] * 7
    assert bits[8:16] == [False] * 7 + [True]
    assert bits[16:20] == [False] * 4
    keep = torch.rand(77, generator=gen(3)) < 0.5
    assert torch.equal(unpack_dropout_mask(pack_bits(keep), 77), keep)


def test_compressed_masks():
    c = compressed_causal_mask()
    assert c.shape == (2048, 2048) and c[0, 1] and not c[1, 1] and not c[5, 0]
    assert int(c.sum()) == 2048 * 2047 // 2
    p = compressed_prefix_mask()
    assert p.shape == (3072, 2048)
    assert torch.equal(p[:2048], c)
    assert not p[2048:, :1024].any() and p[2048:, 1024:].all()


# ----------------------------------------------------------------------------------------------
# Hand-written "takes part" tables
# ----------------------------------------------------------------------------------------------
def T(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows]).unsqueeze(0)


def test_takes_part_tables():
    # Sq=3, Skv=5 (d = 2)
    assert torch.equal(takes_part(2, 3, 5, None, 0, 0), T(["10000", "11000", "11100"]))
    assert torch.equal(takes_part(3, 3, 5, None, 0, 0), T(["11100", "11110", "11111"]))
    # mode 4: -pre <= j - i - d <= next with pre=1, next=0: j in [i+d-1, i+d]
    assert torch.equal(takes_part(4, 3, 5, None, 1, 0), T(["01100", "00110", "00011"]))
    # Sq=5, Skv=3 (d = -2)
    assert torch.equal(takes_part(3, 5, 3, None, 0, 0),
                       T(["000", "000", "100", "110", "111"]))
    # mode 0 band pre=1 next=1 with a user mask masking (0, 0)
    um = torch.zeros(1, 3, 4, dtype=torch.bool)
    um[0, 0, 0] = True
    assert torch.equal(takes_part(0, 3, 4, um, 1, 1), T(["0100", "1110", "0111"]))
    assert torch.equal(takes_part(1, 3, 4, um, 0, 0), T(["0111", "1111", "1111"]))
    # mode 6 prefix: Sq=3 Skv=4 (d=1), prefix 3
    assert torch.equal(takes_part(6, 3, 4, None, 0, 0, prefix_b=3),
                       T(["1110", "1110", "1111"]))
    # mode 5 = mode 6 AND user mask
    assert torch.equal(takes_part(5, 3, 4, um, 0, 0, prefix_b=3),
                       T(["0110", "1110", "1111"]))
    # modes 7/8: band batch uses mode 4's rule, the others 3 / 2
    assert torch.equal(takes_part(7, 2, 4, None, 0, 0, band_batch=True), T(["0010", "0001"]))
    assert torch.equal(takes_part(7, 2, 4, None, 0, 0), T(["1110", "1111"]))
    assert torch.equal(takes_part(8, 2, 4, None, 0, 0), T(["1000", "1100"]))


def test_tnd_batches():
    assert tnd_batches([2, 5], [3, 3]) == [(0, 2, 0, 3), (2, 3, 3, 0)]
    assert tnd_batches([2, 2, 5, 0, 0], [1, 4, 6, 0, 0]) == \
        [(0, 2, 0, 1), (2, 0, 1, 3), (2, 3, 4, 2)]
    assert tnd_batches([3, 0], [4, 9]) == [(0, 3, 0, 4)]


# ----------------------------------------------------------------------------------------------
# Against torch's scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------
def to_bnsd(x, layout, N):
    if layout == "BSH":
        B, S, H = x.shape
        return x.view(B, S, N, H // N).permute(0, 2, 1, 3)
    if layout == "SBH":
        S, B, H = x.shape
        return x.view(S, B, N, H // N).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    return x


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_oracle_vs_sdpa(layout, G, causal):
    B, N2, Sq, Skv, D, Dv = 2, 2, 5, 7, 8, 6
    inp = make_qkv(layout, B, N2 * G, N2, Sq, Skv, D, Dv, torch.float64, seed=1)
    kw = {}
    if causal:
        kw = dict(atten_mask=compressed_causal_mask(), sparse_mode=3)
    out, mx, sm = attention_oracle(**inp, scale=0.3, **kw)
    q = to_bnsd(inp["query"], layout, N2 * G)
    k = to_bnsd(inp["key"], layout, N2).repeat_interleave(G, 1)
    v = to_bnsd(inp["value"], layout, N2).repeat_interleave(G, 1)
    mask = None
    if causal:  # bottom-right causal
        i = torch.arange(Sq).view(-1, 1)
        j = torch.arange(Skv).view(1, -1)
        mask = j <= i + (Skv - Sq)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         scale=float(torch.tensor(0.3, dtype=torch.float32)))
    torch.testing.assert_close(to_bnsd(out, layout, N2 * G), ref, rtol=1e-12, atol=1e-12)
    logits = (q @ k.transpose(-1, -2)) * float(torch.tensor(0.3, dtype=torch.float32))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(mx[..., 0], logits.amax(-1))
    torch.testing.assert_close(sm[..., 0], (logits - logits.amax(-1, keepdim=True)).exp().sum(-1))
    assert mx.shape == (B, N2 * G, Sq, 8)


# ----------------------------------------------------------------------------------------------
# Against a scalar, element-by-element restatement
# ----------------------------------------------------------------------------------------------
def scalar_reference(q, k, v, *, scale, pse_type, bias, allowed, sink, keep, keep_prob):
    """q [B,N1,Sq,D], k [B,N2,Skv,D], v [B,N2,Skv,Dv] float64; bias(b,n,i,j) -> float;
    allowed(b,n,i,j) -> bool; keep(f) -> bool.  Returns out [B,N1,Sq,Dv], max, sum [B,N1,Sq]."""
    B, N1, Sq, D = q.shape
    N2, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = N1 // N2
    sc = float(torch.tensor(scale, dtype=torch.float32))
    out = torch.zeros(B, N1, Sq, Dv, dtype=torch.float64)
    mx = torch.zeros(B, N1, Sq, dtype=torch.float64)
    sm = torch.zeros(B, N1, Sq, dtype=torch.float64)
    ql, kl, vl = q.tolist(), k.tolist(), v.tolist()
    for b in range(B):
        for n in range(N1):
            kvn = n // G
            for i in range(Sq):
                logits = {}
                for j in range(Skv):
                    if not allowed(b, n, i, j):
                        continue
                    s0 = sum(ql[b][n][i][d] * kl[b][kvn][j][d] for d in range(D))
                    if pse_type == 1:
                        logits[j] = (s0 + bias(b, n, i, j)) * sc
                    else:
                        logits[j] = s0 * sc + bias(b, n, i, j)
                cands = list(logits.values()) + ([sink[n]] if sink is not None else [])
                if not cands:
                    mx[b, n, i], sm[b, n, i] = -FLT_MAX, FLT_MAX
                    continue
                m = max(cands)
                ls = sum(math.exp(x - m) for x in cands)
                mx[b, n, i], sm[b, n, i] = m, ls
                for j, x in logits.items():
                    f = ((b * N1 + n) * Sq + i) * Skv + j
                    z = 1.0 if keep_prob == 1.0 else (1.0 if keep(f) else 0.0) / keep_prob
                    p = math.exp(x - m) / ls * z
                    for e in range(Dv):
                        out[b, n, i, e] += p * vl[b][kvn][j][e]
    return out, mx, sm


CASES = [
    # (Sq, Skv, mode, pse_type, pse_rows, sink, keep_prob, pre, next)
    (5, 7, 0, 1, "full", False, 1.0, 2, 1),
    (7, 5, 1, 0, "row", True, 1.0, 0, 0),
    (6, 6, 2, 2, None, False, 0.7, 0, 0),
    (4, 6, 3, 3, None, True, 1.0, 0, 0),
    (6, 4, 4, 1, "full", False, 0.6, 1, 0),
    (5, 8, 5, 1, "row", True, 1.0, 0, 0),
    (6, 9, 6, 0, "full", False, 1.0, 0, 0),
    (5, 5, 0, 1, None, True, 0.5, 0, 0),
]


@pytest.mark.parametrize("Sq,Skv,mode,pse_type,pse_rows,use_sink,kp,pre,nxt", CASES)
def test_oracle_vs_scalar(Sq, Skv, mode, pse_type, pse_rows, use_sink, kp, pre, nxt):
    B, N1, N2, D, Dv = 2, 4, 2, 3, 2
    g = gen(Sq * 100 + Skv * 10 + mode)
    inp = make_qkv("BNSD", B, N1, N2, Sq, Skv, D, Dv, torch.float64, seed=mode)
    q, k, v = inp["query"], inp["key"], inp["value"]
    kw = dict(scale=0.7, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, pse_type=pse_type,
              keep_prob=kp, seed=99, offset=5)
    # bias
    if pse_type in (0, 1) and pse_rows is not None:
        pse = randn((B, N1, Sq if pse_rows == "full" else 1, Skv), torch.float64, g)
        kw["pse"] = pse
        bias = (lambda b, n, i, j: pse[b, n, i if pse_rows == "full" else 0, j].item())
    elif pse_type in (2, 3):
        slopes = torch.rand(B, N1, generator=g).float()
        kw["pse"] = slopes
        kw["q_start_idx"], kw["kv_start_idx"] = [1], [3]

        def bias(b, n, i, j):
            dist = abs((j + 3) - (i + 1))
            return -slopes[b, n].item() * (dist if pse_type == 2 else math.sqrt(dist))
    else:
        bias = lambda b, n, i, j: 0.0  # noqa: E731
    sink = None
    if use_sink:
        sink = (torch.randn(N1, generator=g) * 2).float()
        kw["sink"] = sink
    # mask
    user = None
    d = Skv - Sq
    if mode in (0, 1, 5):
        user = torch.rand(B, 1, Sq, Skv, generator=g) < 0.3
        user[0, 0, 1, :] = True  # an invalid (or sink-only) row
        kw["atten_mask"] = user
    elif mode == 6:
        kw["atten_mask"] = compressed_prefix_mask()
        kw["prefix"] = [max(0, d) + 1, Skv]
    else:
        kw["atten_mask"] = compressed_causal_mask()
    if mode == 5:
        kw["prefix"] = [2, 0]

    def allowed(b, n, i, j):
        if mode == 0:
            return not user[b, 0, i, j] and -pre <= j - i <= nxt
        if mode == 1:
            return not user[b, 0, i, j]
        if mode == 2:
            return j <= i
        if mode == 3:
            return j <= i + d
        if mode == 4:
            return -pre <= j - i - d <= nxt
        if mode == 5:
            return not user[b, 0, i, j] and (j <= i + d or j < kw["prefix"][b])
        if mode == 6:
            return j <= i + d or j < kw["prefix"][b]

    keep = ascend_keep_bits(99, 5, kp, [(Sq, Skv)] * B, N1)
    exp_out, exp_max, exp_sum = scalar_reference(
        q, k, v, scale=0.7, pse_type=pse_type if pse_type in (0, 1) else 0, bias=bias,
        allowed=allowed, sink=None if sink is None else sink.double().tolist(),
        keep=lambda f: bool(keep[f]), keep_prob=kp)
    out, mx, sm = attention_oracle(**inp, **kw)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mx[..., 0], exp_max, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sm[..., 0], exp_sum, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Layout consistency, TND, compressed pse, sentinels
# ----------------------------------------------------------------------------------------------
def test_layouts_agree():
    base = make_qkv("BNSD", 2, 4, 2, 5, 6, 4, 3, torch.float64, seed=7, Dr=2)
    ref = attention_oracle(**base, scale=0.5)

    def conv(x, layout):
        B, N, S, d = x.shape
        if layout == "BSH":
            return x.permute(0, 2, 1, 3).reshape(B, S, N * d)
        if layout == "SBH":
            return x.permute(2, 0, 1, 3).reshape(S, B, N * d)
        return x.permute(0, 2, 1, 3)

    for layout in ("BSH", "SBH", "BSND"):
        inp = dict(base, input_layout=layout)
        for name in ("query", "key", "value", "query_rope", "key_rope"):
            inp[name] = conv(base[name], layout)
        out, mx, sm = attention_oracle(**inp, scale=0.5)
        torch.testing.assert_close(to_bnsd(out, layout, 4), ref[0])
        torch.testing.assert_close(mx, ref[1])
        torch.testing.assert_close(sm, ref[2])


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_tnd_equals_per_batch(softmax_layout):
    lq, lk = [3, 0, 4, 2], [2, 5, 0, 3]
    inp = make_qkv("TND", N1=2, N2=1, D=4, Dv=3, dtype=torch.float64, seed=3,
                   seqlens_q=lq, seqlens_kv=lk, pad_q=2, pad_kv=1)
    out, mx, sm = attention_oracle(**inp, scale=0.4, softmax_layout=softmax_layout)
    T1 = sum(lq) + 2
    assert out.shape == (T1, 2, 3) and mx.shape == (T1, 2, 8)
    cq, ck = [0] + cumsum(lq), [0] + cumsum(lk)
    flat_max = mx.reshape(-1)
    for b in range(4):
        if lq[b] == 0:
            continue
        sub = dict(query=inp["query"][cq[b]:cq[b + 1]].unsqueeze(0),
                   key=inp["key"][ck[b]:ck[b + 1]].unsqueeze(0),
                   value=inp["value"][ck[b]:ck[b + 1]].unsqueeze(0),
                   head_num=2, input_layout="BSND")
        if lk[b] == 0:  # no key at all: every row invalid
            assert (out[cq[b]:cq[b + 1]] == 0).all()
            continue
        o, m, _ = attention_oracle(**sub, scale=0.4)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], o[0])
        if softmax_layout == "TND":
            torch.testing.assert_close(mx[cq[b]:cq[b + 1]], m[0].permute(1, 0, 2))
        else:
            blk = flat_max[2 * 8 * cq[b]: 2 * 8 * cq[b + 1]].view(2, lq[b], 8)
            torch.testing.assert_close(blk, m[0])
    assert (out[sum(lq):] == 0).all() and (mx[sum(lq):] == 0).all()
    assert (flat_max[2 * 8 * sum(lq):] == 0).all()


def test_compressed_alibi_of_diagonal_bias_equals_full():
    S, N = 1030, 1
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    full = (-(0.01 * (i - j).abs().double()) + 0.1 * torch.sin((j - i).double())).view(1, N, S, S)
    comp = full[:, :, S - 1024:, :].contiguous()
    inp = make_qkv("BNSD", 1, N, N, S, S, 2, 2, torch.float64, seed=4)
    kw = dict(atten_mask=compressed_causal_mask(), sparse_mode=3, scale=0.5)
    a = attention_oracle(**inp, pse=full, **kw)
    b = attention_oracle(**inp, pse=comp, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    # and a random (non diagonal-constant) compressed pse does differ, so it is really used
    g = gen(5)
    c = attention_oracle(**inp, pse=torch.randn(1, N, 1024, S, generator=g).double(), **kw)
    assert not torch.allclose(c[0], a[0])


def test_tnd_compressed_pse_is_last_row_diagonal():
    lens = [3, 5]
    inp = make_qkv("TND", N1=1, D=2, dtype=torch.float64, seed=8, seqlens_q=lens,
                   seqlens_kv=lens)
    C = torch.randn(1, 1, 1024, 5, generator=gen(9)).double()
    out = attention_oracle(**inp, pse=C, atten_mask=compressed_causal_mask(), sparse_mode=3)[0]
    # batch 1 by hand: bias[i, j] = C[1023, 4 - (i - j)]
    q, k, v = inp["query"][3:, 0], inp["key"][3:, 0], inp["value"][3:, 0]
    i = torch.arange(5).view(-1, 1)
    j = torch.arange(5).view(1, -1)
    bias = C[0, 0, 1023][(4 - (i - j)).clamp(0, 4)]
    L = ((q @ k.T) + bias).masked_fill(j > i, float("-inf"))
    torch.testing.assert_close(out[3:, 0], torch.softmax(L, -1) @ v)


def test_invalid_rows_and_sink():
    inp = make_qkv("BNSD", 1, 2, 2, 3, 4, 4, 4, torch.float64, seed=2)
    mask = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    mask[..., 1, :] = True
    out, mx, sm = attention_oracle(**inp, atten_mask=mask, sparse_mode=1)
    assert (out[:, :, 1] == 0).all()
    assert (mx[:, :, 1] == -FLT_MAX).all() and (sm[:, :, 1] == FLT_MAX).all()
    sink = torch.tensor([0.5, -2.0])
    out, mx, sm = attention_oracle(**inp, atten_mask=mask, sparse_mode=1, sink=sink)
    assert (out[:, :, 1] == 0).all()
    assert torch.equal(mx[0, :, 1, 0], sink.double()) and (sm[:, :, 1] == 1).all()


def test_naive_dtype_is_nontrivial():
    inp = make_qkv("BSH", 2, 2, 2, 16, 16, 16, 16, torch.float16, seed=1)
    ref = attention_oracle(**inp, scale=0.25)[0]
    nv = attention_oracle(**inp, scale=0.25, dtype=torch.float16)[0]
    assert nv.dtype == torch.float16
    err = (nv.double() - ref).abs().max().item()
    assert 0 < err < 5e-3


def test_layout_shape_helper():
    assert layout_shape("SBH", 2, 3, 5, 4) == (5, 2, 12)


@pytest.mark.parametrize("mode", [7, 8])
def test_tnd_split_modes_with_alibi(mode):
    lq, lk = [0, 3, 4, 2, 0], [0, 3, 4, 2, 0]
    if mode == 7:
        lq, lk = [3, 4, 2, 0], [3, 4, 2, 0]
    inp = make_qkv("TND", N1=2, D=3, dtype=torch.float64, seed=11, seqlens_q=lq,
                   seqlens_kv=lk)
    slopes = torch.tensor([[0.3, 0.1]] * len(lq), dtype=torch.float32)
    kw = dict(atten_mask=compressed_causal_mask(), pre_tokens=1, next_tokens=1, pse_type=2,
              pse=slopes, q_start_idx=[2], kv_start_idx=[1], scale=0.5)
    out = attention_oracle(**inp, sparse_mode=mode, **kw)[0]
    nonempty = [b for b in range(len(lq)) if lq[b]]
    band = nonempty[-1] if mode == 7 else nonempty[0]
    cq, ck = [0] + cumsum(lq), [0] + cumsum(lk)
    for b in nonempty:
        sub = dict(query=inp["query"][cq[b]:cq[b + 1]].unsqueeze(0),
                   key=inp["key"][ck[b]:ck[b + 1]].unsqueeze(0),
                   value=inp["value"][ck[b]:ck[b + 1]].unsqueeze(0),
                   head_num=2, input_layout="BSND")
        skw = dict(kw, pse=slopes[0])
        if mode == 8 and b >= 1:
            skw["q_start_idx"], skw["kv_start_idx"] = [0], [0]
        smode = 4 if b == band else (3 if mode == 7 else 2)
        o = attention_oracle(**sub, sparse_mode=smode, **skw)[0]
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], o[0])
