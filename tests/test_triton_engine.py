"""The Triton engine under ``TRITON_INTERPRET=1`` on CPU tensors, against the float64 oracle.

Every case runs the public forward (``npu_fusion_attention_v2``) with the triton engine, then
autograd through it (the grad op with that forward's outputs), and applies SPEC section 7:
attention_out and every gradient within 2x / 3x of ref_same's error (the oracle with float32
logits, rounded to the input dtype) plus eps, the 0.5 % golden criterion, float32-level
statistics and exact invalid-row sentinels. The matrix covers every feature of SPEC 2-6: layouts
(strided views), GQA, Dv != D, rope, TND (per segment and in one launch), every sparse mode with
FULL / PARTIAL / EMPTY tiles and invalid rows, explicit and compressed masks, dense / broadcast /
compressed / TND-compressed pse with dpse, in-kernel ALiBi, sink, dropout (generated and
explicit; bit-for-bit against ``Dropout.keep``), bitwise-repeatable gradients; fp32 and fp16 (the
interpreter's bf16 ``tl.dot`` is wrong: triton#11584).

The interpreter needs ``TRITON_INTERPRET=1`` before the kernels are defined: this module sets it
around the engine's import and skips if triton was already imported without it. Tiles are the
table's "interp" entries (16 x 32 and 32 x 16), so the small problems here span several tiles.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_prev = os.environ.get("TRITON_INTERPRET")
if "triton" in sys.modules and _prev in (None, "", "0"):
    pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed")
TE = pytest.importorskip("fascore.engines.triton")

import fascore  # noqa: E402
from fascore import engine as fengine  # noqa: E402
from conftest import (CAUSAL_MASK, assert_golden_fraction, assert_stats_rule, assert_within_rule,  # noqa: E402
                      call_forward, compute_dtype, gen, make_qkv, oracle_grads, randn, random_mask, ref_same)
from oracle import attention_oracle, compressed_prefix_mask, pack_bits  # noqa: E402
from fascore.engines.triton import _adapter as fa  # noqa: E402

build_problem = fa.build_problem

if not TE.interpreting():
    pytest.skip("the triton engine's kernels were built without the interpreter", allow_module_level=True)

fengine.register_engine("triton", TE)
PREFIX_MASK = compressed_prefix_mask()


@pytest.fixture(autouse=True)
def _triton_engine():
    with fascore.use_engine("triton"):
        yield


def spec7(inputs, wrt=("query", "key", "value"), dy_seed=7, **kw):
    """Forward + autograd under the triton engine vs the float64 oracle (SPEC 7). Returns
    (forward 7-tuple, {name: grad}, dy)."""
    dtype = inputs["query"].dtype
    okw = dict(inputs, **kw)
    ref_out, ref_max, ref_sum = attention_oracle(**okw)
    nv_out = ref_same(attention_oracle(**okw, dtype=compute_dtype(dtype))[0], dtype)
    dy = randn(tuple(ref_out.shape), dtype, gen(dy_seed))
    ins, kws, leaves = dict(inputs), dict(kw), {}
    for name in wrt:
        src = ins if name in ins else kws
        leaves[name] = src[name] = src[name].detach().clone().requires_grad_(True)
    res = call_forward("v2", ins, **kws)
    assert_within_rule("attention_out", res[0], ref_out, nv_out, dtype, 2.0)
    assert_golden_fraction("attention_out", res[0], ref_out)
    assert_stats_rule("softmax_max", res[1], ref_max)
    assert_stats_rule("softmax_sum", res[2], ref_sum)
    grads = {}
    if wrt:
        gl = torch.autograd.grad(res[0], [leaves[n] for n in wrt], dy, allow_unused=True)
        grads = dict(zip(wrt, gl))
        g_ref = oracle_grads(inputs, dy, torch.float64, wrt, **kw)
        g_nv = oracle_grads(inputs, dy, compute_dtype(dtype), wrt, **kw)
        floor = max([1.0] + [g.abs().max().item() for g in g_ref.values() if g.numel()])
        for n in wrt:
            assert grads[n] is not None, f"d{n}: no gradient"
            assert_within_rule(f"d{n}", grads[n], g_ref[n], ref_same(g_nv[n], grads[n].dtype), dtype, 3.0, floor)
    return res, grads, dy


F32, F16 = torch.float32, torch.float16


# --------------------------------------------------------------------------- geometry and layouts
@pytest.mark.parametrize("layout,dtype,B,N1,N2,sq,skv,d,dv", [
    ("BNSD", F32, 2, 2, 2, 40, 40, 16, 16),
    ("BSH", F16, 1, 4, 2, 33, 47, 24, 16),   # GQA, Dv < D, ragged tiles
    ("SBH", F32, 2, 2, 1, 17, 64, 32, 8),    # MQA, Skv a multiple of the tile
    ("BSND", F16, 2, 3, 3, 48, 21, 16, 16),  # Sq > Skv
    ("BNSD", F32, 1, 1, 1, 1, 1, 8, 8),      # a single position
])
def test_dense_geometry(layout, dtype, B, N1, N2, sq, skv, d, dv):
    spec7(make_qkv(layout, B, N1, N2, sq, skv, d, dv, dtype=dtype, seed=1), scale=d ** -0.5)


def test_rope():
    spec7(make_qkv("BSND", 1, 2, 1, 24, 40, 16, 16, dtype=F16, seed=2, Dr=8),
          wrt=("query", "key", "value", "query_rope", "key_rope"), scale=0.2)


def test_strided_views():
    """Inputs that are slices of larger tensors (non-unit strides everywhere)."""
    kw = make_qkv("BNSD", 2, 2, 2, 30, 36, 16, 16, dtype=F32, seed=3)
    for name in ("query", "key", "value"):
        t = kw[name]
        big = torch.randn(t.shape[0], t.shape[1] * 2, t.shape[2], t.shape[3] + 5)
        big[:, ::2, :, 2:2 + t.shape[3]] = t
        kw[name] = big[:, ::2, :, 2:2 + t.shape[3]]
    spec7(kw, scale=0.25)


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mode,sq,skv,pre,nxt", [
    (2, 40, 40, 0, 0), (3, 24, 50, 0, 0), (3, 50, 24, 0, 0), (4, 40, 56, 7, 3), (4, 48, 48, -5, 20),
])
def test_analytic_modes(mode, sq, skv, pre, nxt):
    kw = make_qkv("BSH", 2, 2, 1, sq, skv, 16, 16, dtype=F16, seed=10 + mode)
    spec7(kw, atten_mask=CAUSAL_MASK, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, scale=0.3)


def test_mode0_explicit_band_invalid_rows():
    sq, skv = 40, 45
    m = random_mask((sq, skv), 0.3, 4)
    m[5] = True  # an invalid row in a partial tile
    m[:, 32:] = True  # whole masked-out tiles
    kw = make_qkv("BNSD", 2, 2, 2, sq, skv, 16, 16, dtype=F32, seed=4)
    spec7(kw, atten_mask=m, sparse_mode=0, pre_tokens=20, next_tokens=6, scale=0.3)


@pytest.mark.parametrize("mshape,dt", [((2, 2, 33, 40), torch.uint8), ((2, 1, 33, 40), torch.bool),
                                       ((1, 1, 33, 40), torch.bool)])
def test_mode1_explicit(mshape, dt):
    m = random_mask(mshape, 0.5, 5, dt)
    m[..., :16, :] = 0  # FULL tiles in the plan
    kw = make_qkv("BSND", 2, 2, 1, 33, 40, 16, 16, dtype=F16, seed=5)
    spec7(kw, atten_mask=m, sparse_mode=1, scale=0.3)


def test_mode5_prefix_explicit():
    sq, skv = 24, 40
    m = random_mask((2, 1, sq, skv), 0.2, 6)
    kw = make_qkv("BNSD", 2, 2, 2, sq, skv, 16, 16, dtype=F32, seed=6)
    spec7(kw, atten_mask=m, sparse_mode=5, prefix=[3, 21], scale=0.3)


def test_mode6_prefix_compressed():
    kw = make_qkv("BSH", 2, 2, 2, 40, 48, 16, 16, dtype=F16, seed=7)
    spec7(kw, atten_mask=PREFIX_MASK, sparse_mode=6, prefix=[8, 40], scale=0.3)


# --------------------------------------------------------------------------- pse
@pytest.mark.parametrize("pse_type,pshape", [(1, (2, 2, 24, 40)), (0, (1, 2, 24, 40)), (1, (2, 2, 1, 40)),
                                             (0, (1, 2, 1, 40))])
def test_dense_pse(pse_type, pshape):
    kw = make_qkv("BNSD", 2, 2, 1, 24, 40, 16, 16, dtype=F32, seed=8)
    pse = randn(pshape, F32, gen(80))
    spec7(kw, wrt=("query", "key", "value", "pse"), pse=pse, pse_type=pse_type, atten_mask=CAUSAL_MASK,
          sparse_mode=3, scale=0.3)


@pytest.mark.parametrize("pse_type,slopes_shape,starts", [(2, (2,), (None, None)), (3, (1, 2), ([3], [1]))])
def test_alibi(pse_type, slopes_shape, starts):
    kw = make_qkv("BSH", 1, 2, 2, 40, 40, 16, 16, dtype=F16, seed=9)
    slopes = torch.tensor([0.5, 0.125]).view(slopes_shape).float()
    spec7(kw, pse=slopes, pse_type=pse_type, q_start_idx=starts[0], kv_start_idx=starts[1], scale=0.3)


def test_compressed_pse_1040():
    """The ALiBi-compressed form (Sq = Skv = 1040 > 1024): bias rows follow the diagonal rule,
    dpse sums the 1024-periodic copies. Larger tiles keep the interpreter quick."""
    sq = 1040
    kw = make_qkv("BNSD", 1, 1, 1, sq, sq, 16, 16, dtype=F32, seed=11)
    pse = randn((1, 1, 1024, sq), F32, gen(110))
    with TE.configs.override(TE.configs.Config(*(TE.configs.Tile(64, 64, 1, 1),) * 5)):
        spec7(kw, wrt=("query", "key", "value", "pse"), pse=pse, pse_type=1, atten_mask=CAUSAL_MASK,
              sparse_mode=2, scale=0.2)


# --------------------------------------------------------------------------- sink, dropout
def test_sink_with_empty_rows():
    sq, skv = 33, 40
    m = random_mask((sq, skv), 0.3, 12)
    m[3] = True
    kw = make_qkv("BNSD", 1, 2, 1, sq, skv, 16, 16, dtype=F32, seed=12)
    sink = torch.tensor([0.5, -1.0])
    spec7(kw, wrt=("query", "key", "value", "sink"), sink=sink, atten_mask=m, sparse_mode=1, scale=0.3)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_dropout_generated(dtype):
    kw = make_qkv("BSH", 2, 2, 1, 24, 37, 16, 16, dtype=dtype, seed=13)
    spec7(kw, keep_prob=0.8, seed=(5 << 32) + 1234567, offset=40, atten_mask=CAUSAL_MASK, sparse_mode=3,
          scale=0.3)


def test_dropout_explicit_mask():
    B, N1, sq, skv = 2, 2, 20, 35
    keep = torch.rand(B * N1 * sq * skv, generator=gen(14)) < 0.7
    kw = make_qkv("BNSD", B, N1, 1, sq, skv, 16, 16, dtype=F32, seed=14)
    spec7(kw, keep_prob=0.7, dropout_mask=pack_bits(keep), scale=0.3)


@pytest.mark.parametrize("offset", [0, 5, 33])
def test_dropout_bits_match_dropout_keep(offset):
    """Bit-for-bit: the in-kernel Philox bytes equal ``Dropout.keep`` (SPEC 5's Ascend model).
    q = k = 0 makes P uniform and V = identity per key makes out[..., i, j] = keep(i, j) /
    (keep_prob * Skv), so out > 0 is exactly the kernel's keep tile."""
    B, N1, sq, skv = 2, 3, 21, 40
    q = torch.zeros(B, N1, sq, skv)
    k = torch.zeros(B, 1, skv, skv)
    v = torch.eye(skv).expand(B, 1, skv, skv).contiguous()
    seed = (7 << 32) + 99
    out = fascore.npu_fusion_attention_v2(q, k, v, N1, "BNSD", keep_prob=0.6, seed=seed, offset=offset)[0]
    prob = build_problem(q, k, v, N1, "BNSD", keep_prob=0.6, seed=seed, offset=offset)
    (seg,) = prob.segments
    assert isinstance(seg.dropout, fa.Dropout) and seg.dropout.bits is None
    want = seg.dropout.keep(N1, 0, sq, 0, skv, torch.device("cpu"))
    assert torch.equal(out > 0, want)


def test_dropout_bits_tnd():
    lens_q, lens_k = [5, 0, 17], [40, 3, 21]
    cq, ck = [5, 5, 22], [40, 43, 64]
    skv = 64
    q = torch.zeros(22, 2, skv)
    k = torch.zeros(64, 1, skv)
    v = torch.eye(skv)[:, None, :].contiguous()
    out = fascore.npu_fusion_attention_v2(q, k, v, 2, "TND", keep_prob=0.5, seed=3, offset=17,
                                          actual_seq_qlen=cq, actual_seq_kvlen=ck)[0]
    prob = build_problem(q, k, v, 2, "TND", keep_prob=0.5, seed=3, offset=17, actual_seq_qlen=cq,
                         actual_seq_kvlen=ck)
    for seg in prob.segments:
        bt = seg.batch
        want = seg.dropout.keep(2, 0, bt.sq, 0, bt.skv, torch.device("cpu"))[0]  # [N1, sq, skv]
        got = out[bt.q0:bt.q0 + bt.sq, :, bt.k0:bt.k0 + bt.skv].permute(1, 0, 2) > 0
        assert torch.equal(got, want), f"batch {bt.index}"


# --------------------------------------------------------------------------- TND
@pytest.mark.parametrize("mode", [0, 3, 7, 8])
def test_tnd_modes(mode):
    lens_q, lens_k = [7, 0, 20, 33], [9, 4, 20, 40]
    kw = make_qkv("TND", N1=2, N2=1, D=16, Dv=8, dtype=F16, seed=15, seqlens_q=lens_q, seqlens_kv=lens_k, pad_q=3)
    extra = dict(atten_mask=CAUSAL_MASK, sparse_mode=mode)
    if mode == 0:
        extra = dict(atten_mask=random_mask((33, 40), 0.3, 15), sparse_mode=0, pre_tokens=10, next_tokens=2)
    elif mode in (7, 8):
        extra.update(pre_tokens=6, next_tokens=1)
    spec7(kw, scale=0.3, **extra)


def test_tnd_compressed_pse_rope_sink():
    lens = [20, 0, 37]
    kw = make_qkv("TND", N1=2, N2=2, D=16, dtype=F32, seed=16, seqlens_q=lens, seqlens_kv=lens, Dr=8)
    pse = randn((3, 2, 1024, 37), F32, gen(160))
    spec7(kw, wrt=("query", "key", "value", "query_rope", "key_rope", "pse", "sink"), pse=pse, pse_type=0,
          atten_mask=CAUSAL_MASK, sparse_mode=3, sink=torch.tensor([0.2, -0.4]), scale=0.3)


def test_tnd_alibi_dropout():
    lens = [18, 30]
    kw = make_qkv("TND", N1=2, N2=1, D=16, dtype=F16, seed=17, seqlens_q=lens, seqlens_kv=lens)
    spec7(kw, pse=torch.tensor([0.3, 0.05]), pse_type=2, q_start_idx=[2], kv_start_idx=[2],
          keep_prob=0.75, seed=11, offset=3, atten_mask=CAUSAL_MASK, sparse_mode=8, scale=0.3)


# --------------------------------------------------------------------------- determinism, capability
def test_backward_bitwise_repeatable():
    kw = make_qkv("BSH", 2, 4, 2, 33, 40, 16, 16, dtype=F16, seed=18)
    pse = randn((1, 4, 33, 40), F16, gen(180))
    extra = dict(pse=pse, atten_mask=CAUSAL_MASK, sparse_mode=3, keep_prob=0.9, seed=5, offset=0, scale=0.3)
    runs = []
    for _ in range(2):
        ins = {n: (t.detach().clone().requires_grad_(True) if n in ("query", "key", "value") else t)
               for n, t in kw.items()}
        p = pse.clone().requires_grad_(True)
        res = call_forward("v2", ins, **dict(extra, pse=p))
        g = torch.autograd.grad(res[0], [ins["query"], ins["key"], ins["value"], p], torch.ones_like(res[0]))
        runs.append((res[0], res[1], res[2], *g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_not_supported_reasons():
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    prob = build_problem(q, q, q, 1, "BNSD")
    assert any("float64" in r for r in TE.not_supported_reasons(prob.segments[0], prob))
    qb = q.bfloat16()
    prob = build_problem(qb, qb, qb, 1, "BNSD")
    assert any("bfloat16" in r for r in TE.not_supported_reasons(prob.segments[0], prob))
    qw = torch.randn(1, 1, 8, 300)
    prob = build_problem(qw, qw, qw, 1, "BNSD")
    assert any("head dim" in r for r in TE.not_supported_reasons(prob.segments[0], prob))
    q32 = q.float()
    prob = build_problem(q32, q32, q32, 1, "BNSD")
    assert TE.not_supported_reasons(prob.segments[0], prob) == []
    assert TE.available()


# --------------------------------------------------------------------------- whole-problem hooks
@pytest.mark.parametrize("case", ["tnd-mask", "tnd-band-layout", "tnd-pse-rope-sink", "tnd-alibi-dropout", "bsh-dropout"])
def test_forward_all_backward_all_match_segments(case):
    """forward_all / backward_all (every TND batch in one launch, the caller's layout written
    directly) give the per-segment path's results: the same bits (dsink up to its reduction)."""
    from fascore import api
    lens_q, lens_k = [7, 0, 20, 33], [9, 4, 20, 40]
    if case == "tnd-mask":
        kw = make_qkv("TND", N1=2, N2=1, D=16, Dv=8, dtype=F16, seed=15, seqlens_q=lens_q, seqlens_kv=lens_k, pad_q=3)
        extra = dict(atten_mask=random_mask((33, 40), 0.3, 15), sparse_mode=0, pre_tokens=10, next_tokens=2)
    elif case == "tnd-band-layout":
        kw = make_qkv("TND", N1=2, N2=1, D=16, Dv=8, dtype=F16, seed=15, seqlens_q=lens_q, seqlens_kv=lens_k, pad_q=3)
        extra = dict(atten_mask=CAUSAL_MASK, sparse_mode=7, pre_tokens=6, next_tokens=1, softmax_layout="TND")
    elif case == "tnd-pse-rope-sink":
        lens = [20, 0, 37]
        kw = make_qkv("TND", N1=2, N2=2, D=16, dtype=F32, seed=16, seqlens_q=lens, seqlens_kv=lens, Dr=8)
        extra = dict(pse=randn((3, 2, 1024, 37), F32, gen(160)), pse_type=0, atten_mask=CAUSAL_MASK, sparse_mode=3,
                     sink=torch.tensor([0.2, -0.4]))
    elif case == "tnd-alibi-dropout":
        kw = make_qkv("TND", N1=2, N2=1, D=16, dtype=F16, seed=17, seqlens_q=[18, 30], seqlens_kv=[18, 30])
        extra = dict(pse=torch.tensor([0.3, 0.05]), pse_type=2, q_start_idx=[2], kv_start_idx=[2], keep_prob=0.75,
                     seed=11, offset=3, atten_mask=CAUSAL_MASK, sparse_mode=8)
    else:
        kw = make_qkv("BSH", 2, 2, 1, 24, 37, 16, 16, dtype=F16, seed=13)
        extra = dict(keep_prob=0.8, seed=5, offset=40, atten_mask=CAUSAL_MASK, sparse_mode=3)
    prob = build_problem(**kw, **extra, scale=0.3)
    assert TE.supports_all(prob)
    fwd_seg = api.run_forward(prob)
    fwd_all = TE.forward_all(prob)
    for a, b in zip(fwd_seg, fwd_all):
        assert torch.equal(a, b)
    dy = randn(tuple(fwd_seg[0].shape), fwd_seg[0].dtype, gen(3))
    g_seg = api.run_backward(prob, dy, *fwd_seg)
    g_all = TE.backward_all(prob, dy, *fwd_seg)
    for name, a, b in zip(("dq", "dk", "dv", "dpse", "dsink", "dq_rope", "dk_rope"), g_seg, g_all):
        if a is None:
            assert b is None, name
        elif name == "dsink":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------- the device check, tiny
def test_gpu_check_tiny_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.py --tiny: the whole device check on CPU under the interpreter."""
    import json
    import subprocess
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, script, "--tiny", "--out", str(tmp_path), "--budget", "200"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["conformance_ok"] == {"triton": True, "flash": True}
    assert all(v["ok"] for v in rep["determinism"].values())
    assert rep["bench"] and all("results" in b for b in rep["bench"]), rep["bench"]
    assert all("triton engine fwd" in b["results"] for b in rep["bench"])
    assert (tmp_path / "gpu_check.log").read_text().strip()
