"""Backward correctness (SPEC section 6): gradcheck, oracle-autograd comparison with the 3x rule,
the grad entry points, determinism, TND and dropout."""

import pytest
import torch

from conftest import (CAUSAL_MASK, call_forward, check_grads, gen, lib_autograd, make_qkv,
                      multi_block_case,
                      oracle_grads, random_mask, randn)
from oracle import attention_oracle, compressed_prefix_mask

import conftest

pytestmark = pytest.mark.usefixtures("engine")
CAUSAL = CAUSAL_MASK


def fwd_fn(inputs, names, **kw):
    """A function of the tensors named in `names` returning fascore's attention_out."""
    def f(*tensors):
        ins, kws = dict(inputs), dict(kw)
        for n, t in zip(names, tensors):
            (ins if n in ins else kws)[n] = t
        return call_forward("v2", ins, **kws)[0]
    return f


def grad_kwargs(api, res, kw):
    """Translate forward (v2-style) keywords into the grad entry point's keywords."""
    g = dict(kw)
    g["scale_value"] = g.pop("scale", 1.0)
    if api == "v1":
        for a, b in (("pre_tokens", "pre_tockens"), ("next_tokens", "next_tockens")):
            if a in g:
                g[b] = g.pop(a)
        assert g.pop("pse_type", 1) == 1
    g.update(softmax_max=res[1], softmax_sum=res[2], attention_in=res[0], seed=res[4],
             offset=res[5], numels=res[6])
    return g


def call_grad(api, inputs, dy, res, **kw):
    fa = conftest.fascore
    extra = {k: v for k, v in inputs.items()
             if k not in ("query", "key", "value", "head_num", "input_layout")}
    extra.update(grad_kwargs(api, res, kw))
    fn = fa.npu_fusion_attention_grad if api == "v1" else fa.npu_fusion_attention_grad_v2
    return fn(inputs["query"], inputs["key"], inputs["value"], dy, inputs["head_num"],
              inputs["input_layout"], **extra)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64, tiny)
# ----------------------------------------------------------------------------------------------
GC_CASES = {
    "bsh_dense_gqa": (dict(layout="BSH", B=1, N1=2, N2=1, Sq=3, Skv=4, D=3, Dv=2), {}),
    "bnsd_causal": (dict(layout="BNSD", B=2, N1=1, Sq=4, Skv=3, D=2), dict(
        atten_mask=CAUSAL, sparse_mode=3)),
    # small full masks below: the compressed [2048, 2048] mask is checked element by element on
    # every call, which makes finite differences slow
    "bsnd_band": (dict(layout="BSND", B=1, N1=2, Sq=4, Skv=5, D=2), dict(
        atten_mask=torch.zeros(4, 5, dtype=torch.bool), pre_tokens=1, next_tokens=1)),
    "sbh_mask_invalid_row": (dict(layout="SBH", B=1, N1=2, Sq=3, Skv=3, D=2), dict(
        atten_mask=torch.tensor([[0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool),
        sparse_mode=1)),
    "tnd": (dict(layout="TND", N1=2, N2=1, D=2, seqlens_q=[2, 0, 3], seqlens_kv=[3, 2, 2],
                 pad_q=1), dict(atten_mask=torch.triu(torch.ones(3, 3, dtype=torch.bool), 1),
                                sparse_mode=1)),
    "rope": (dict(layout="BSND", B=1, N1=2, Sq=3, Skv=3, D=2, Dr=2), {}),
}


@pytest.mark.parametrize("case", list(GC_CASES))
def test_gradcheck_qkv(case):
    shape, kw = GC_CASES[case]
    shape = dict(shape)
    inp = make_qkv(shape.pop("layout"), dtype=torch.float64, seed=1, **shape)
    names = ["query", "key", "value"] + (["query_rope", "key_rope"] if "Dr" in shape else [])
    args = [inp[n].detach().clone().requires_grad_(True) for n in names]
    # fast_mode (random projections of the Jacobian) for the larger TND case keeps this cheap
    assert torch.autograd.gradcheck(fwd_fn(inp, names, scale=0.7, **kw), args,
                                    fast_mode=case == "tnd")


@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("pse_shape", [(2, 2, 3, 4), (1, 2, 3, 4), (2, 2, 1, 4), (1, 2, 1, 4)])
def test_gradcheck_pse(pse_type, pse_shape):
    inp = make_qkv("BSH", B=2, N1=2, Sq=3, Skv=4, D=2, dtype=torch.float64, seed=2)
    pse = randn(pse_shape, torch.float64, gen(3)).requires_grad_(True)
    args = [inp["query"].clone().requires_grad_(True), pse]
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    fn = fwd_fn(inp, ["query", "pse"], scale=0.6, pse_type=pse_type, atten_mask=mask,
                sparse_mode=1)
    # the full Jacobian for the smallest (fully broadcast) pse, random projections otherwise
    assert torch.autograd.gradcheck(fn, args, fast_mode=pse_shape != (1, 2, 1, 4))


@pytest.mark.parametrize("mode", [1, 3])
def test_sink_gradient(mode):
    """sink is float32 (README, Decisions): compare with the oracle's float64 autograd gradient and a
    central finite difference instead of gradcheck."""
    inp = make_qkv("BNSD", B=2, N1=3, Sq=4, Skv=5, D=3, dtype=torch.float64, seed=4)
    mask = random_mask((2, 1, 4, 5), 0.3, 4)
    mask[0, 0, 1] = True  # sink-only row
    kw = dict(scale=0.5, sparse_mode=mode, atten_mask=mask if mode == 1 else CAUSAL)
    sink = torch.tensor([0.3, -1.0, 2.5], dtype=torch.float32)
    dy = randn((2, 3, 4, 3), torch.float64, gen(5))
    _, g = lib_autograd(inp, dy, ["sink", "query"], sink=sink, **kw)
    ref = oracle_grads(inp, dy, torch.float64, ["sink", "query"], sink=sink, **kw)
    assert g["sink"].dtype == torch.float32 and g["sink"].shape == (3,)
    torch.testing.assert_close(g["sink"], ref["sink"], rtol=1e-5, atol=1e-6)
    # float64 inputs still get float32 statistics (SPEC 2), from which backward rebuilds P:
    # float32-level agreement is all that can be asked
    torch.testing.assert_close(g["query"], ref["query"], rtol=1e-6, atol=1e-7)
    # finite difference of <out, dy> in sink[1], step exactly representable in float32
    h = 2.0**-8

    def loss(s):
        return (call_forward("v2", inp, sink=s, **kw)[0] * dy).sum().item()
    e = torch.tensor([0.0, h, 0.0])
    fd = (loss(sink + e) - loss(sink - e)) / (2 * h)
    assert abs(fd - g["sink"][1].item()) < 1e-4 * max(1.0, abs(fd))


# ----------------------------------------------------------------------------------------------
# against oracle autograd, SPEC 3x rule
# ----------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEATURES = {
    "dense": (dict(layout="BSH", B=2, N1=2, Sq=9, Skv=7, D=8), {}),
    "gqa_causal": (dict(layout="BNSD", B=2, N1=4, N2=1, Sq=7, Skv=10, D=8, Dv=6),
                   dict(atten_mask=CAUSAL, sparse_mode=3)),
    "pse1_band": (dict(layout="SBH", B=1, N1=2, Sq=8, Skv=8, D=8),
                  dict(pse="B,N1,1,Skv", pse_type=1, atten_mask=CAUSAL, sparse_mode=4,
                       pre_tokens=2, next_tokens=1)),
    "pse0_mask": (dict(layout="BSND", B=2, N1=2, Sq=6, Skv=9, D=8),
                  dict(pse="1,N1,Sq,Skv", pse_type=0, atten_mask="B,1,Sq,Skv", sparse_mode=0,
                       pre_tokens=4, next_tokens=2)),
    "sink_prefix": (dict(layout="BSH", B=2, N1=2, Sq=5, Skv=8, D=8),
                    dict(sink=True, atten_mask=compressed_prefix_mask(), sparse_mode=6,
                         prefix=[3, 8])),
    "alibi_rope": (dict(layout="BSND", B=1, N1=2, Sq=6, Skv=6, D=8, Dr=4),
                   dict(pse="slopes", pse_type=3, q_start_idx=[2], kv_start_idx=[0])),
}


def materialize(shape, kw, dtype, seed):
    shape = dict(shape)
    layout = shape.pop("layout")
    inp = make_qkv(layout, dtype=dtype, seed=seed, **shape)
    kw = dict(kw)
    dims = dict(B=shape.get("B", 1), N1=shape["N1"], Sq=shape.get("Sq"), Skv=shape.get("Skv"))
    wrt = ["query", "key", "value"] + (["query_rope", "key_rope"] if "Dr" in shape else [])
    if kw.get("pse") == "slopes":
        kw["pse"] = torch.rand(shape["N1"], generator=gen(seed)) * 0.5
    elif isinstance(kw.get("pse"), str):
        kw["pse"] = randn([dims.get(s, 1) for s in kw["pse"].split(",")], dtype, gen(seed))
        wrt.append("pse")
    if isinstance(kw.get("atten_mask"), str):
        kw["atten_mask"] = random_mask([dims.get(s, 1) for s in kw["atten_mask"].split(",")],
                                       0.25, seed)
    if kw.get("sink") is True:
        kw["sink"] = torch.randn(shape["N1"], generator=gen(seed))
        wrt.append("sink")
    return inp, kw, wrt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_grads_vs_oracle(feature, dtype):
    inp, kw, wrt = materialize(*FEATURES[feature], dtype, seed=6)
    check_grads(inp, wrt, scale=0.35, **kw)


@pytest.mark.parametrize("pse_type", [0, 1])
def test_compressed_pse_gradient(pse_type):
    """dpse of the ALiBi-compressed form is the scatter-add onto its 1024 stored rows."""
    S = 1030
    inp = make_qkv("BNSD", B=1, N1=1, Sq=S, Skv=S, D=2, seed=7)
    pse = randn((1, 1, 1024, S), torch.float32, gen(8))
    check_grads(inp, ["query", "pse"], scale=0.5, pse=pse, pse_type=pse_type,
                atten_mask=CAUSAL, sparse_mode=3)


@pytest.mark.parametrize("pse_type", [0, 1])
def test_tnd_compressed_pse_gradient(pse_type):
    lens = [3, 5]
    inp = make_qkv("TND", N1=2, D=4, seed=9, seqlens_q=lens, seqlens_kv=lens)
    pse = randn((1, 2, 1024, 5), torch.float32, gen(9))
    check_grads(inp, ["query", "key", "pse"], scale=0.5, pse=pse, pse_type=pse_type,
                atten_mask=CAUSAL, sparse_mode=2)


def test_invalid_rows_zero_gradients():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=6, Skv=3, D=4, seed=10)
    res, g, _ = check_grads(inp, ["query", "key", "value"], scale=0.5, atten_mask=CAUSAL,
                            sparse_mode=3)
    assert (g["query"][:, :, :3] == 0).all()  # rows 0..2 see nothing (d = -3)


@pytest.mark.parametrize("name", ["mode1_blocky", "mode3_sink_dropout", "tnd_mode8_alibi"])
def test_multi_block_gradients(name):
    inp, kw = multi_block_case(name)
    wrt = ["query", "key", "value"] + (["sink"] if "sink" in kw else [])
    check_grads(inp, wrt, scale=0.35, **kw)


# ----------------------------------------------------------------------------------------------
# TND backward
# ----------------------------------------------------------------------------------------------
TND_BWD = [
    (dict(cum_q=[2, 2, 7], cum_kv=[3, 5, 8]), dict(atten_mask=CAUSAL, sparse_mode=3)),
    (dict(cum_q=[3, 7, 0], cum_kv=[5, 6, 0], pad_q=2, pad_kv=1), {}),
    (dict(cum_q=[0, 4, 9], cum_kv=[0, 5, 9]), dict(atten_mask=CAUSAL, sparse_mode=8,
                                                  pre_tokens=1, next_tokens=1)),
    (dict(cum_q=[4, 8, 11], cum_kv=[6, 14, 18]), dict(atten_mask=CAUSAL, sparse_mode=7,
                                                     pre_tokens=0, next_tokens=3, sink=True)),
]


@pytest.mark.parametrize("idx", range(len(TND_BWD)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tnd_backward(idx, dtype):
    shape, kw = TND_BWD[idx]
    inp = make_qkv("TND", N1=4, N2=2, D=6, Dv=5, dtype=dtype, seed=11, **shape)
    kw = dict(kw)
    wrt = ["query", "key", "value"]
    if kw.get("sink"):
        kw["sink"] = torch.tensor([0.1, 1.0, -0.5, 2.0])
        wrt.append("sink")
    res, g, _ = check_grads(inp, wrt, scale=0.4, **kw)
    covered = max(inp["actual_seq_qlen"])
    assert (g["query"][covered:] == 0).all()


# ----------------------------------------------------------------------------------------------
# grad entry points
# ----------------------------------------------------------------------------------------------
GRAD_OP_CASES = [
    ("v1", "BSH", dict(B=2, N1=4, N2=2, Sq=7, Skv=9, D=8, Dv=6),
     dict(pse="B,N1,Sq,Skv", atten_mask=CAUSAL, sparse_mode=3)),
    ("v2", "BNSD", dict(B=2, N1=2, Sq=6, Skv=6, D=8, Dr=4),
     dict(pse="1,N1,1,Skv", pse_type=0, sink=True)),
    ("v2", "SBH", dict(B=1, N1=2, Sq=8, Skv=8, D=4),
     dict(pse="slopes", pse_type=2, q_start_idx=[1], kv_start_idx=[3], keep_prob=0.75,
          seed=17)),
    ("v1", "TND", dict(N1=2, D=4, cum_q=[3, 3, 8], cum_kv=[4, 6, 9], pad_q=1),
     dict(atten_mask=CAUSAL, sparse_mode=2, softmax_layout="")),
    ("v2", "TND", dict(N1=2, D=4, cum_q=[3, 3, 8], cum_kv=[4, 6, 9], pad_q=1),
     dict(atten_mask=CAUSAL, sparse_mode=2, softmax_layout="TND", sink=True)),
]


def _grad_op_setup(api, layout, shape, kw, dtype=torch.float32):
    inp = make_qkv(layout, dtype=dtype, seed=12, **shape)
    kw = dict(kw)
    N1 = shape["N1"]
    dims = dict(B=shape.get("B", 1), N1=N1, Sq=shape.get("Sq"), Skv=shape.get("Skv"))
    if kw.get("pse") == "slopes":
        kw["pse"] = torch.rand(N1, generator=gen(1)) * 0.5
    elif isinstance(kw.get("pse"), str):
        kw["pse"] = randn([dims.get(s, 1) for s in kw["pse"].split(",")], dtype, gen(2))
    if kw.get("sink") is True:
        kw["sink"] = torch.randn(N1, generator=gen(3))
    return inp, kw


@pytest.mark.parametrize("api,layout,shape,kw", GRAD_OP_CASES)
def test_grad_op_equals_autograd(api, layout, shape, kw):
    inp, kw = _grad_op_setup(api, layout, shape, kw)
    wrt = ["query", "key", "value"]
    if "Dr" in shape:
        wrt += ["query_rope", "key_rope"]
    if kw.get("pse_type", 1) in (0, 1) and kw.get("pse") is not None:
        wrt.append("pse")
    if kw.get("sink") is not None:
        wrt.append("sink")
    res0 = call_forward(api, inp, **kw)
    dy = randn(tuple(res0[0].shape), torch.float32, gen(4))
    res, g = lib_autograd(inp, dy, wrt, api=api, **kw)
    assert torch.equal(res[0], res0[0]), "forward must be deterministic"
    out = call_grad(api, inp, dy, res0, **kw)
    assert isinstance(out, tuple) and len(out) == (5 if api == "v1" else 7)
    if api == "v1":
        dq, dk, dv, dpse, dsink = out
    else:  # torch_npu's grad_v2 order
        dq, dk, dv, dpse, dqr, dkr, dsink = out
    for name, got in (("query", dq), ("key", dk), ("value", dv)):
        assert got.shape == inp[name].shape and got.dtype == inp[name].dtype
        assert torch.equal(got, g[name]), f"grad op d{name} differs from autograd"
    if "Dr" in shape:
        assert torch.equal(dqr, g["query_rope"]) and torch.equal(dkr, g["key_rope"])
    elif api != "v1":
        for t in (dqr, dkr):
            assert t.shape == (0,) and t.dtype == inp["query"].dtype
    if "pse" in wrt:
        assert dpse.shape == kw["pse"].shape and dpse.dtype == kw["pse"].dtype
        assert torch.equal(dpse, g["pse"])
    elif api == "v1":
        assert dpse is None
    else:
        assert dpse.shape == (0,) and dpse.dtype == inp["query"].dtype
    if "sink" in wrt:
        assert dsink.dtype == torch.float32 and torch.equal(dsink, g["sink"])
    elif api == "v1":
        assert dsink.numel() == 0
    else:
        assert dsink is None
    # and both agree with the oracle (SPEC 3x rule)
    okw = dict(kw, seed=res0[4], offset=res0[5])
    ref = oracle_grads(inp, dy, torch.float64, wrt, **okw)
    nv = oracle_grads(inp, dy, torch.float32, wrt, **okw)
    for name, got in (("query", dq), ("key", dk), ("value", dv)):
        conftest.assert_within_rule(f"d{name}", got, ref[name], nv[name], torch.float32, 3.0)


def test_grad_op_uses_statistics_and_attention_in():
    """P is rebuilt from the given statistics and R from the given attention_in (SPEC 3, 6)."""
    inp = make_qkv("BNSD", B=1, N1=2, Sq=5, Skv=6, D=4, dtype=torch.float64, seed=13)
    kw = dict(scale=0.5)
    res = call_forward("v2", inp, **kw)
    dy = randn(tuple(res[0].shape), torch.float64, gen(14))
    base = call_grad("v2", inp, dy, res, **kw)
    # doubling softmax_sum halves P: dv = P^T dy halves
    res2 = (res[0], res[1], res[2] * 2) + res[3:]
    half = call_grad("v2", inp, dy, res2, **kw)
    torch.testing.assert_close(half[2], base[2] / 2)
    # attention_in + delta changes R_i by c_i = sum(dy_i * delta_i): dq changes by
    # -scale * c_i * (P K)_i, and P K is the oracle's output with value = key.
    delta = randn(tuple(res[0].shape), torch.float64, gen(15))
    res3 = (res[0] + delta,) + res[1:]
    moved = call_grad("v2", inp, dy, res3, **kw)
    c = (dy * delta).sum(-1, keepdim=True)
    pk = attention_oracle(**dict(inp, value=inp["key"]), **kw)[0]
    torch.testing.assert_close(moved[0], base[0] - 0.5 * c * pk)
    torch.testing.assert_close(moved[2], base[2])


# ----------------------------------------------------------------------------------------------
# determinism, dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "TND"])
def test_backward_bitwise_deterministic(layout):
    extra = dict(seqlens_q=[9, 20], seqlens_kv=[17, 30]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=4, N2=1, Sq=33, Skv=47, D=16, seed=16, **extra)
    pse = None if layout == "TND" else randn((1, 4, 33, 47), torch.float32, gen(16))
    kw = dict(scale=0.25, keep_prob=0.9, seed=5, atten_mask=CAUSAL, sparse_mode=3)
    wrt = ["query", "key", "value"]
    if pse is not None:
        kw["pse"] = pse
        wrt.append("pse")
    dy = randn(tuple(call_forward("v2", inp, **kw)[0].shape), torch.float32, gen(17))
    r1, g1 = lib_autograd(inp, dy, wrt, **kw)
    r2, g2 = lib_autograd(inp, dy, wrt, **kw)
    for a, b in zip(r1[:3], r2[:3]):
        assert torch.equal(a, b)
    for n in wrt:
        assert torch.equal(g1[n], g2[n]), f"d{n} not bitwise reproducible"
    o1 = call_grad("v2", inp, dy, r1, **kw)
    o2 = call_grad("v2", inp, dy, r1, **kw)
    for a, b in zip(o1[:3], o2[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["BSND", "TND"])
@pytest.mark.parametrize("explicit", [False, True])
def test_dropout_backward(layout, explicit):
    extra = dict(seqlens_q=[5, 0, 7], seqlens_kv=[6, 3, 4]) if layout == "TND" else {}
    inp = make_qkv(layout, B=2, N1=2, Sq=7, Skv=9, D=8, seed=18, **extra)
    kw = dict(scale=0.4, keep_prob=0.7, atten_mask=CAUSAL, sparse_mode=3)
    if explicit:
        kw["dropout_mask"] = torch.randint(0, 256, (200,), generator=gen(19),
                                           dtype=torch.uint8)
    else:
        kw["seed"], kw["offset"] = 2**40 + 3, 11
    res, g, dy = check_grads(inp, ["query", "key", "value"], **kw)
    # the grad entry point, fed with the returned seed/offset/numels, regenerates the mask
    out = call_grad("v2", inp, dy, res, **kw)
    for name, got in zip(("query", "key", "value"), out[:3]):
        torch.testing.assert_close(got, g[name], rtol=1e-5, atol=1e-6)


def test_dropout_backward_drawn_seed():
    """seed = offset = 0: the drawn seed is returned and the backward uses that mask."""
    inp = make_qkv("BSH", B=1, N1=2, Sq=6, Skv=8, D=4, seed=20)
    dy = randn((1, 6, 8), torch.float32, gen(21))
    wrt = ["query", "key", "value"]
    torch.manual_seed(0)
    res, g = lib_autograd(inp, dy, wrt, scale=0.5, keep_prob=0.6)
    assert res[4] != 0 or res[5] != 0
    kw = dict(scale=0.5, keep_prob=0.6, seed=res[4], offset=res[5])
    ref = oracle_grads(inp, dy, torch.float64, wrt, **kw)
    nv = oracle_grads(inp, dy, torch.float32, wrt, **kw)
    for n in wrt:
        conftest.assert_within_rule(f"d{n}", g[n], ref[n], nv[n], torch.float32, 3.0)
