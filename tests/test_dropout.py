"""Dropout (SPEC section 5): explicit bit-packed masks, Ascend's generated mask (Philox4x32-7,
byte threshold, rows padded to 16), the emulated NPU generator, and the mask generators."""

import math

import pytest
import torch

import fascore

from conftest import CAUSAL_MASK, call_forward, check_forward, cumsum, gen, make_qkv
from oracle import ascend_keep_bits, attention_oracle, flat_keep_bits, pack_bits, unpack_dropout_mask

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
    (2**33 + 7, 3, 0.6),  # seed uses the key's high word; offset not a multiple of 16
    (123456789, 16 * (2**32 - 1) - 5, 0.8),  # the counter crosses into its high word
    (-5, 9, 0.3),  # seed taken mod 2^64
    (77, 32, 0.9),  # offset a multiple of 16
])
def test_generated_mask_bit_exact(seed, offset, keep_prob):
    B, N1, Sq, Skv = 2, 2, 5, 12  # Skv not a multiple of 16: rows are padded in the numbering
    inp = identity_inputs(B, N1, Sq, Skv)
    res = call_forward("v2", inp, keep_prob=keep_prob, seed=seed, offset=offset)
    assert res[4] == seed and res[5] == offset and res[6] == B * N1 * Sq * Skv
    got = recover_bnsd(res[0], Skv, keep_prob)
    want = ascend_keep_bits(seed, offset, keep_prob, [(Sq, Skv)] * B, N1).view(B, N1, Sq, Skv)
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
    bits = ascend_keep_bits(99, 1, kp, list(zip(lq, lk)), N1)
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
# seed == 0: (seed, offset) from the emulated NPU generator (torch_npu's philox_engine_inputs(10))
# ----------------------------------------------------------------------------------------------
def test_generator_manual_seed_and_offsets():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=8, Skv=16, D=8, seed=9)
    fascore.manual_seed(2)
    r1 = call_forward("v2", inp, keep_prob=0.5)
    r2 = call_forward("v2", inp, keep_prob=0.5)
    r3 = call_forward("v1", inp, keep_prob=0.5, offset=5)  # seed 0: the generator supplies both
    assert (r1[4], r1[5]) == (2, 0) and (r2[4], r2[5]) == (2, 12) and (r3[4], r3[5]) == (2, 24)
    assert not torch.equal(r1[0], r2[0])
    assert r1[6] == 2 * 8 * 16
    call_forward("v2", inp, keep_prob=1.0)  # no dropout: the generator does not move
    call_forward("v2", inp, keep_prob=0.5, seed=9, offset=0)  # a given seed: neither
    assert call_forward("v2", inp, keep_prob=0.5)[4:6] == (2, 36)
    fascore.manual_seed(2)
    again = call_forward("v2", inp, keep_prob=0.5)
    assert torch.equal(again[0], r1[0])
    # the returned seed/offset regenerate the identical mask
    r4 = call_forward("v2", inp, keep_prob=0.5, seed=r2[4], offset=r2[5])
    assert torch.equal(r4[0], r2[0])
    ref = attention_oracle(**inp, keep_prob=0.5, seed=r2[4], offset=r2[5])[0]
    torch.testing.assert_close(r2[0].double(), ref, rtol=1e-5, atol=1e-6)


def test_generator_state_and_devices():
    from fascore.rng import generator
    fascore.manual_seed(11)
    g = generator.default_generator("cpu")
    assert g.philox_engine_inputs(10) == (11, 0) and g.philox_engine_inputs(1) == (11, 12)
    assert g.philox_engine_inputs(10) == (11, 16)  # 1 rounds up to 4
    state = generator.get_rng_state()
    assert state.dtype == torch.uint8 and state.numel() == 16
    assert g.philox_engine_inputs(10) == (11, 28)
    generator.set_rng_state(state)
    assert g.philox_engine_inputs(10) == (11, 28)
    other = generator.default_generator("cuda:1")  # one generator per device (no device needed)
    assert other is not g and other.philox_engine_inputs(10) == (11, 0)
    fascore.manual_seed(5, device="cpu")
    assert g.philox_engine_inputs(10) == (5, 0) and other.philox_engine_inputs(10) == (11, 12)


def test_generator_default_seed_in_a_fresh_process():
    import subprocess
    import sys
    code = ("import torch, fascore; q = torch.randn(1, 1, 4, 4); "
            "print(fascore.npu_fusion_attention(q, q, q, 1, 'BNSD', keep_prob=0.5)[4:6])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "(67280421310721, 0)"


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


# ----------------------------------------------------------------------------------------------
# torch_npu's mask generators (flat model) and their use as dropout_mask
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,p,seed,offset", [
    ([2, 3, 5, 7], 0.1, 3, 0), ([1, 1, 1, 300], 0.5, 2**40 + 1, 17), ([129], 0.75, 9, 48)])
def test_npu_dropout_gen_mask_flat_model(size, p, seed, offset):
    x = torch.empty(1)
    mask = fascore._npu_dropout_gen_mask(x, size, p, seed, offset)
    numel = math.prod(size)
    assert mask.dtype == torch.uint8 and mask.shape == (-(-numel // 128) * 16,)
    got = unpack_dropout_mask(mask, numel)
    assert torch.equal(got, flat_keep_bits(seed, offset, numel, 1.0 - p))
    assert (unpack_dropout_mask(mask, mask.numel() * 8)[numel:] == 0).all()  # padding bits clear
    assert torch.equal(mask, fascore._npu_dropout_gen_mask(x, size, p, seed, offset, parallel=False, sync=True))


def test_npu_dropout_gen_mask_draws_from_the_generator():
    fascore.manual_seed(21)
    a = fascore.npu_dropout_gen_mask([4, 40], 0.2)
    b = fascore.npu_dropout_gen_mask([4, 40], 0.2, dtype=torch.float16, device="cpu")
    assert torch.equal(a, fascore._npu_dropout_gen_mask(torch.empty(0), [4, 40], 0.2, 21, 0))
    assert torch.equal(b, fascore._npu_dropout_gen_mask(torch.empty(0), [4, 40], 0.2, 21, 12))


@pytest.mark.parametrize("layout", ["BNSD", "TND"])
def test_gen_mask_as_dropout_mask(layout):
    """Skv a multiple of 16: the flat and the padded numberings coincide, so the generated mask
    fed back as dropout_mask reproduces the generated result; otherwise the two differ."""
    kp, seed, offset = 0.7, 1234, 5
    for skv, same in ((32, True), (20, False)):
        if layout == "TND":
            inp = make_qkv("TND", N1=2, D=8, seqlens_q=[3, 4], seqlens_kv=[skv, skv], seed=2)
            numels = 2 * (3 + 4) * skv
        else:
            inp = make_qkv("BNSD", B=2, N1=2, Sq=6, Skv=skv, D=8, seed=2)
            numels = 2 * 2 * 6 * skv
        gen_res = call_forward("v2", inp, keep_prob=kp, seed=seed, offset=offset)
        mask = fascore._npu_dropout_gen_mask(inp["query"], [numels], 1 - kp, seed, offset)
        exp_res = call_forward("v2", inp, keep_prob=kp, dropout_mask=mask)
        assert torch.equal(gen_res[0], exp_res[0]) is same
