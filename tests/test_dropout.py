"""Dropout (SPEC section 5): explicit bit-packed masks, the Philox4x32-10 generated mask,
seed/offset handling."""

import pytest
import torch

from conftest import CAUSAL_MASK, call_forward, check_forward, cumsum, gen, make_qkv
from oracle import attention_oracle, pack_bits, philox_keep_bits

pytestmark = pytest.mark.usefixtures("engine")


# ----------------------------------------------------------------------------------------------
# explicit masks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BNSD", "TND"])
@pytest.mark.parametrize("keep_prob", [0.5, 0.9])
def test_explicit_mask_matches_oracle(layout, keep_prob):
    extra = dict(seqlens_q=[5, 0, 7], seqlens_kv=[6, 3, 4], pad_q=1) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=7, Skv=9, D=8, seed=1, **extra)
    nbytes = (2 * 4 * 7 * 9 + 7) // 8 + 3  # a few spare bytes are allowed
    mask = torch.randint(0, 256, (nbytes,), generator=gen(2), dtype=torch.uint8)
    check_forward(inp, scale=0.4, keep_prob=keep_prob, dropout_mask=mask)
    check_forward(inp, scale=0.4, keep_prob=keep_prob, dropout_mask=mask, atten_mask=CAUSAL_MASK,
                  sparse_mode=3)


def test_explicit_mask_any_shape_read_flat():
    inp = make_qkv("BSND", B=1, N1=2, Sq=4, Skv=8, D=4, seed=3)
    flat = torch.randint(0, 256, (8,), generator=gen(4), dtype=torch.uint8)
    a = call_forward("v2", inp, keep_prob=0.5, dropout_mask=flat)[0]
    b = call_forward("v2", inp, keep_prob=0.5, dropout_mask=flat.view(2, 4))[0]
    assert torch.equal(a, b)
    check_forward(inp, keep_prob=0.5, dropout_mask=flat.view(2, 4))


def test_explicit_mask_bit_order():
    """Only bit 0 of byte 0 set: exactly element f = 0 ((b, n1, i, j) = 0) is kept."""
    inp = make_qkv("BNSD", B=1, N1=1, Sq=2, Skv=4, D=4, seed=5)
    mask = torch.tensor([0b00000001], dtype=torch.uint8)
    out = call_forward("v2", inp, keep_prob=0.5, dropout_mask=mask)[0]
    ref = attention_oracle(**inp, keep_prob=0.5, dropout_mask=mask)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert (out[0, 0, 1] == 0).all() and (out[0, 0, 0] != 0).all()


# ----------------------------------------------------------------------------------------------
# recovering the keep pattern bit for bit: q = 0 makes P uniform (1/Skv); with V = identity
# (Dv = Skv), attention_out[..., i, j] = Z[i, j] / (Skv * keep_prob).
# ----------------------------------------------------------------------------------------------
def recover_bnsd(out, Skv, keep_prob):
    z = out.double() * Skv * keep_prob
    assert ((z - z.round()).abs() < 1e-4).all() and ((z == 0) | ((z - 1).abs() < 1e-4)).all()
    return z.round().bool()


def identity_inputs(B, N1, Sq, Skv):
    q = torch.zeros(B, N1, Sq, Skv)
    k = torch.randn(B, N1, Skv, Skv, generator=gen(6))
    v = torch.eye(Skv).expand(B, N1, Skv, Skv).contiguous()
    return dict(query=q, key=k, value=v, head_num=N1, input_layout="BNSD")


@pytest.mark.parametrize("seed,offset,keep_prob", [
    (1, 0, 0.5),
    (2**33 + 7, 3, 0.6),  # seed uses the key's high word; offset not a multiple of 4
    (123456789, 2**32 - 3, 0.8),  # the counter crosses into its high word
    (-5, 9, 0.3),  # seed taken mod 2^64
])
def test_generated_mask_bit_exact(seed, offset, keep_prob):
    B, N1, Sq, Skv = 2, 2, 5, 12
    inp = identity_inputs(B, N1, Sq, Skv)
    res = call_forward("v2", inp, keep_prob=keep_prob, seed=seed, offset=offset)
    assert res[5] == offset and res[6] == B * N1 * Sq * Skv
    got = recover_bnsd(res[0], Skv, keep_prob)
    want = philox_keep_bits(seed, offset, B * N1 * Sq * Skv, keep_prob).view(B, N1, Sq, Skv)
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} bits differ"


def test_generated_mask_tnd_indexing():
    """TND: f = N1*sum_{b'<b} Sq_b'*Skv_b' + (n1*Sq_b + i)*Skv_b + j."""
    lq, lk, N1, kp = [3, 0, 4, 2], [4, 5, 6, 3], 2, 0.5
    cq, ck = [0] + cumsum(lq), [0] + cumsum(lk)
    Dv = max(lk)
    q = torch.zeros(sum(lq), N1, Dv)
    k = torch.randn(sum(lk), N1, Dv, generator=gen(7))
    v = torch.zeros(sum(lk), N1, Dv)
    for b in range(4):
        v[ck[b]:ck[b + 1], :, :lk[b]] = torch.eye(lk[b]).unsqueeze(1)
    inp = dict(query=q, key=k, value=v, head_num=N1, input_layout="TND",
               actual_seq_qlen=cumsum(lq), actual_seq_kvlen=cumsum(lk))
    res = call_forward("v2", inp, keep_prob=kp, seed=99, offset=1)
    numels = N1 * sum(a * b for a, b in zip(lq, lk))
    assert res[6] == numels
    bits = philox_keep_bits(99, 1, numels, kp)
    base = 0
    for b in range(4):
        if lq[b]:
            o = res[0][cq[b]:cq[b + 1], :, :lk[b]].permute(1, 0, 2)  # [N1, Sq_b, Skv_b]
            got = recover_bnsd(o, lk[b], kp)
            want = bits[base:base + N1 * lq[b] * lk[b]].view(N1, lq[b], lk[b])
            assert torch.equal(got, want), f"batch {b}"
        base += N1 * lq[b] * lk[b]


def test_generated_mask_matches_oracle_outputs():
    inp = make_qkv("BSH", B=2, N1=2, Sq=9, Skv=13, D=8, seed=8)
    check_forward(inp, scale=0.4, keep_prob=0.7, seed=31337, offset=17)
    check_forward(inp, api="v1", scale=0.4, keep_prob=0.7, seed=31337, offset=17)


def test_kept_fraction():
    B, N1, Sq, Skv = 2, 2, 64, 64
    inp = identity_inputs(B, N1, Sq, Skv)
    for kp in (0.3, 0.9):
        out = call_forward("v2", inp, keep_prob=kp, seed=4242, offset=0)[0]
        frac = recover_bnsd(out, Skv, kp).float().mean().item()
        # 16384 Bernoulli draws: sd <= 0.004
        assert abs(frac - kp) < 0.02, frac


# ----------------------------------------------------------------------------------------------
# seed == offset == 0: drawn from torch's default generator
# ----------------------------------------------------------------------------------------------
def test_drawn_seed_repeatable_and_fresh():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=8, Skv=16, D=8, seed=9)
    torch.manual_seed(1234)
    r1 = call_forward("v2", inp, keep_prob=0.5)
    torch.manual_seed(1234)
    r2 = call_forward("v2", inp, keep_prob=0.5)
    r3 = call_forward("v2", inp, keep_prob=0.5)
    assert (r1[4], r1[5]) != (0, 0)
    assert (r1[4], r1[5]) == (r2[4], r2[5]) and torch.equal(r1[0], r2[0])
    assert (r3[4], r3[5]) != (r1[4], r1[5]) and not torch.equal(r3[0], r1[0])
    assert r1[6] == 2 * 8 * 16
    # the returned seed/offset regenerate the identical mask
    r4 = call_forward("v2", inp, keep_prob=0.5, seed=r1[4], offset=r1[5])
    assert torch.equal(r4[0], r1[0])
    ref = attention_oracle(**inp, keep_prob=0.5, seed=r1[4], offset=r1[5])[0]
    torch.testing.assert_close(r1[0].double(), ref, rtol=1e-5, atol=1e-6)


def test_drawn_seed_follows_decisions():
    """README (Decisions): the seed is torch.randint(1, 2**63 - 1) from the default CPU generator,
    offset stays 0."""
    inp = make_qkv("BNSD", B=1, N1=1, Sq=4, Skv=4, D=4, seed=10)
    torch.manual_seed(77)
    expect = int(torch.randint(1, 2**63 - 1, (1,)))
    torch.manual_seed(77)
    res = call_forward("v2", inp, keep_prob=0.5)
    assert res[4] == expect and res[5] == 0


def test_seed_modulo_2_64():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=6, Skv=8, D=4, seed=11)
    a = call_forward("v2", inp, keep_prob=0.5, seed=2**64 + 5, offset=2)[0]
    b = call_forward("v2", inp, keep_prob=0.5, seed=5, offset=2)[0]
    assert torch.equal(a, b)


def test_keep_prob_one_ignores_dropout():
    inp = make_qkv("BSH", B=2, N1=2, Sq=5, Skv=7, D=4, seed=12)
    zeros = torch.zeros(64, dtype=torch.uint8)  # would drop everything
    res = check_forward(inp, scale=0.5, keep_prob=1.0, dropout_mask=zeros, seed=3, offset=4)
    assert res[4] == 3 and res[5] == 4 and res[6] == 2 * 2 * 5 * 7
    assert res[0].abs().max() > 0.1
    # seed = offset = 0 with keep_prob == 1: still no dropout, and the values come back as passed
    res = check_forward(inp, scale=0.5, keep_prob=1.0)
    assert res[4] == 0 and res[5] == 0


def test_dropout_with_sink_and_invalid_rows():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=6, Skv=4, D=4, seed=13)
    sink = torch.tensor([0.5, -0.5])
    check_forward(inp, scale=0.5, keep_prob=0.6, seed=8, offset=0, atten_mask=CAUSAL_MASK,
                  sparse_mode=3, sink=sink)
    mask = pack_bits(torch.rand(48, generator=gen(14)) < 0.6)
    check_forward(inp, scale=0.5, keep_prob=0.6, dropout_mask=mask, atten_mask=CAUSAL_MASK,
                  sparse_mode=2)
