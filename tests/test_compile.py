"""torch.compile and fake tensors: the ``fascore::`` custom ops (fascore/ops.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fascore
from fascore.api import ops

CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _inputs(layout: str, dtype=torch.float32, seed=0):
    """query/key/value (N1=4, N2=2, D=8, Dv=6) for ``layout``, plus the TND lengths."""
    g = torch.Generator().manual_seed(seed)
    b, sq, skv, n1, n2, d, dv = 2, 10, 12, 4, 2, 8, 6
    shapes = {
        "BSH": ((b, sq, n1 * d), (b, skv, n2 * d), (b, skv, n2 * dv)),
        "SBH": ((sq, b, n1 * d), (skv, b, n2 * d), (skv, b, n2 * dv)),
        "BSND": ((b, sq, n1, d), (b, skv, n2, d), (b, skv, n2, dv)),
        "BNSD": ((b, n1, sq, d), (b, n2, skv, d), (b, n2, skv, dv)),
        "TND": ((sq, n1, d), (skv, n2, d), (skv, n2, dv)),
    }[layout]
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in shapes)
    kw = dict(actual_seq_qlen=[3, 3, 10], actual_seq_kvlen=[5, 5, 12]) if layout == "TND" else {}
    return q, k, v, n1, kw


LAYOUTS = ["BSH", "SBH", "BSND", "BNSD", "TND"]


def _meta(x):
    return (tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------------------------
# Fake tensors: every layout, forward (v1, v2) and grad
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_tensor_shapes_every_layout(layout, api):
    q, k, v, n, kw = _inputs(layout, torch.bfloat16)
    kw.update(atten_mask=CAUSAL, sparse_mode=3, keep_prob=0.9, seed=11)
    fwd = fascore.npu_fusion_attention if api == "v1" else fascore.npu_fusion_attention_v2
    real = fwd(q, k, v, n, layout, **kw)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fkw = dict(kw, atten_mask=mode.from_tensor(CAUSAL))
        fake = fwd(fq, fk, fv, n, layout, **fkw)
        assert all(isinstance(x, torch.Tensor) and ops._is_fake(x) for x in fake[:4])
        assert [_meta(x) for x in fake] == [_meta(x) for x in real]
        grad = fascore.npu_fusion_attention_grad if api == "v1" else fascore.npu_fusion_attention_grad_v2
        gkw = {k_: v_ for k_, v_ in fkw.items() if k_ != "seed"}
        gkw["scale_value"] = 1.0
        g = grad(fq, fk, fv, fake[0], n, layout, softmax_max=fake[1], softmax_sum=fake[2], attention_in=fake[0],
                 seed=11, offset=0, numels=fake[6], **gkw)
        assert [_meta(x) for x in g[:3]] == [_meta(x) for x in (q, k, v)]
        if api == "v1":
            assert g[3] is None and _meta(g[4]) == ((0,), torch.float32, "cpu")
        else:  # torch_npu's grad_v2 7-tuple: empty dpse / dq_rope / dk_rope, dsink None
            assert [_meta(x) for x in g[3:6]] == [((0,), q.dtype, "cpu")] * 3 and g[6] is None


def test_fake_tensor_shapes_with_pse_sink_rope():
    q, k, v, n, _ = _inputs("BSND")
    g = torch.Generator().manual_seed(1)
    qr, kr = torch.randn(2, 10, 4, 4, generator=g), torch.randn(2, 12, 2, 4, generator=g)
    pse, sink = torch.randn(1, 4, 10, 12, generator=g), torch.randn(4, generator=g)
    kw = dict(pse=pse, pse_type=0, query_rope=qr, key_rope=kr, sink=sink)
    real = fascore.npu_fusion_attention_v2(q, k, v, n, "BSND", **kw)
    rg = fascore.npu_fusion_attention_grad_v2(q, k, v, real[0], n, "BSND", softmax_max=real[1],
                                              softmax_sum=real[2], attention_in=real[0], **kw)
    with FakeTensorMode() as mode:
        f = {k_: mode.from_tensor(v_) for k_, v_ in dict(q=q, k=k, v=v, **kw).items() if isinstance(v_, torch.Tensor)}
        fkw = dict(kw, **{k_: f[k_] for k_ in ("pse", "query_rope", "key_rope", "sink")})
        fake = fascore.npu_fusion_attention_v2(f["q"], f["k"], f["v"], n, "BSND", **fkw)
        assert [_meta(x) for x in fake] == [_meta(x) for x in real]
        fg = fascore.npu_fusion_attention_grad_v2(f["q"], f["k"], f["v"], fake[0], n, "BSND", softmax_max=fake[1],
                                                  softmax_sum=fake[2], attention_in=fake[0], **fkw)
        assert len(fg) == 7 and [_meta(x) for x in fg] == [_meta(x) for x in rg]


def test_fake_tensor_shape_errors_and_missing_seed():
    q, k, v, n, _ = _inputs("BSH")
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        with pytest.raises(fascore.FlashAttentionError, match="must divide"):
            fascore.npu_fusion_attention(fq, fk, fv, 3, "BSH")
        with pytest.raises(fascore.FlashAttentionError, match="explicit seed"):
            fascore.npu_fusion_attention(fq, fk, fv, n, "BSH", keep_prob=0.5)


def test_opcheck_forward_and_grad_ops():
    q, k, v, n, _ = _inputs("BSH")
    for x in (q, k, v):
        x.requires_grad_(True)
    fwd_args = (q, k, v, n, "BSH", None, None, CAUSAL, None, None, 0.3, 0.8, 100, 100, 0, None, None, None, 2, 1,
                None, None, "", torch.randn(4), None, 7, 0, "v1")
    torch.library.opcheck(torch.ops.fascore.npu_fusion_attention.default, fwd_args)
    tq, tk, tv, tn, tkw = _inputs("TND")
    out, smax, ssum = torch.ops.fascore.npu_fusion_attention(
        tq, tk, tv, tn, "TND", None, None, None, None, None, 0.5, 1.0, 2**31 - 1, 2**31 - 1, 0, None,
        tkw["actual_seq_qlen"], tkw["actual_seq_kvlen"], 0, 1, None, None, "", None, None, 0, 0, "v2")
    grad_args = (tq, tk, tv, torch.randn_like(out), tn, "TND", None, None, None, smax, ssum, out, None, None, 0.5,
                 1.0, 2**31 - 1, 2**31 - 1, 0, 0, 0, 0, None, tkw["actual_seq_qlen"], tkw["actual_seq_kvlen"], 0,
                 1, None, None, "", None, None, "grad_v2")
    torch.library.opcheck(torch.ops.fascore.npu_fusion_attention_grad.default, grad_args)


# ----------------------------------------------------------------------------------------------
# Eager through the ops == the eager autograd.Function path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_op_path_equals_eager_path(layout, monkeypatch):
    q, k, v, n, kw = _inputs(layout)
    g = torch.Generator().manual_seed(3)
    kw.update(atten_mask=CAUSAL, sparse_mode=3, keep_prob=0.8, seed=1234, sink=torch.randn(n, generator=g))
    if layout != "TND":
        kw.update(pse=torch.randn(1, n, 1, 12, generator=g), pse_type=0)

    def run():
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, kw["sink"])
                  ] + ([kw["pse"].detach().clone().requires_grad_(True)] if "pse" in kw else [])
        kw2 = dict(kw, sink=leaves[3], **({"pse": leaves[4]} if "pse" in kw else {}))
        res = fascore.npu_fusion_attention_v2(*leaves[:3], n, layout, **kw2)
        grads = torch.autograd.grad(res[0], leaves, torch.ones_like(res[0]))
        return res, grads

    res0, g0 = run()
    monkeypatch.setitem(ops.config, "always", True)
    res1, g1 = run()
    for a, b in zip(res0[:4], res1[:4]):
        assert torch.equal(a, b)
    assert res0[4:] == res1[4:] == (1234, 0, res0[6])
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    # the explicit grad op agrees as well
    gkw = {k_: v_ for k_, v_ in kw.items() if k_ != "seed"}
    eg = fascore.npu_fusion_attention_grad_v2(q, k, v, torch.ones_like(res1[0]), n, layout, softmax_max=res1[1],
                                              softmax_sum=res1[2], attention_in=res1[0], seed=1234,
                                              numels=res1[6], **gkw)
    for a, b in zip(eg[:3], g0[:3]):
        assert torch.equal(a, b)


def test_eager_op_path_draws_a_seed_and_raises_like_eager(monkeypatch):
    q, k, v, n, _ = _inputs("BSH")
    monkeypatch.setitem(ops.config, "always", True)
    torch.manual_seed(0)
    r1 = fascore.npu_fusion_attention(q, k, v, n, "BSH", keep_prob=0.5)
    r2 = fascore.npu_fusion_attention(q, k, v, n, "BSH", keep_prob=0.5, seed=r1[4], offset=r1[5])
    assert r1[4] != 0 and torch.equal(r1[0], r2[0])
    with pytest.raises(fascore.FlashAttentionError, match="sparse_mode=9") as e:
        fascore.npu_fusion_attention(q, k, v, n, "BSH", sparse_mode=9)
    assert e.value.status == 161002
    with pytest.raises(fascore.FlashAttentionError, match="pre_tockens"):
        fascore.npu_fusion_attention(q, k, v, n, "BSH", atten_mask=torch.zeros(10, 12, dtype=torch.bool),
                                     pre_tockens=-5, next_tockens=2)
    with pytest.raises(fascore.FlashAttentionError) as e:
        fascore.npu_fusion_attention_grad(q, k, v, r1[0], n, "BSH", softmax_sum=r1[2], attention_in=r1[0])
    assert e.value.status == 161001


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of a transformer block: forward and backward
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block (BSH), GQA attention through fascore: causal, ALiBi-free, dropout."""

    def __init__(self, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.d)
        self.o = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.register_buffer("mask", CAUSAL.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        k, v = self.kv(y).chunk(2, dim=-1)
        a = fascore.npu_fusion_attention(self.q(y), k, v, self.heads, "BSH", atten_mask=self.mask, sparse_mode=2,
                                         scale=1 / math.sqrt(self.d), keep_prob=0.9, seed=2024)[0]
        x = x + self.o(a)
        return x + self.mlp(self.ln2(x))


@pytest.fixture(scope="module")
def block_and_compiled():
    torch.manual_seed(0)
    model = Block()
    graphs = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    return model, torch.compile(model, backend=backend, fullgraph=True, dynamic=False), graphs


def test_compile_fullgraph_block_forward_and_backward(block_and_compiled):
    model, compiled, graphs = block_and_compiled
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(5))
    out_c = compiled(x)
    assert len(graphs) == 1 and "fascore.npu_fusion_attention" in str(graphs[0].graph)
    out_c.square().mean().backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_e = model(x)
    out_e.square().mean().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_c[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    model.zero_grad()
    # a second call reuses the compiled graph (no recompilation)
    compiled(x + 1).sum().backward()
    assert len(graphs) == 1


def test_compile_graphs_call_the_forward_and_grad_ops():
    """AOTAutograd's forward graph holds the forward op, its backward graph the grad op."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = {}

    def keep(name):
        def compiler(gm, example_inputs):
            seen[name] = str(gm.graph)
            return make_boxed_func(gm.forward)
        return compiler

    q, k, v, n, kw = _inputs("TND")
    leaves = [x.requires_grad_(True) for x in (q, k, v)]

    def f(q, k, v):
        return fascore.npu_fusion_attention_v2(q, k, v, n, "TND", atten_mask=CAUSAL, sparse_mode=3, **kw)[0]

    torch._dynamo.reset()
    cf = torch.compile(f, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), fullgraph=True)
    out = cf(*leaves)
    gc = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert "fascore.npu_fusion_attention.default" in seen["fw"]
    assert "fascore.npu_fusion_attention_grad.default" in seen["bw"]
    ge = torch.autograd.grad(f(*leaves), leaves, torch.ones_like(out))
    for a, b in zip(gc, ge):
        assert torch.equal(a, b)


def test_compile_explicit_grad_op():
    q, k, v, n, _ = _inputs("SBH")
    res = fascore.npu_fusion_attention(q, k, v, n, "SBH", keep_prob=0.7, seed=9)
    dy = torch.ones_like(res[0])

    def g(q, k, v, dy, smax, ssum, out):
        return fascore.npu_fusion_attention_grad(q, k, v, dy, n, "SBH", softmax_max=smax, softmax_sum=ssum,
                                                 attention_in=out, keep_prob=0.7, seed=9, numels=res[6])

    torch._dynamo.reset()
    gc = torch.compile(g, backend="aot_eager", fullgraph=True)(q, k, v, dy, res[1], res[2], res[0])
    ge = g(q, k, v, dy, res[1], res[2], res[0])
    assert gc[3] is None and ge[3] is None
    for a, b in zip(gc[:3] + gc[4:], ge[:3] + ge[4:]):
        assert torch.equal(a, b)


def test_compile_dropout_without_seed_is_a_clear_error():
    q, k, v, n, _ = _inputs("BSH")

    def f(q, k, v):
        return fascore.npu_fusion_attention(q, k, v, n, "BSH", keep_prob=0.9)[0]

    torch._dynamo.reset()
    with pytest.raises(Exception, match="explicit seed"):
        torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
