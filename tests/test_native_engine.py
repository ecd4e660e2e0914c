"""The native C++ CPU engine (``fascore.engines.native``) against SPEC section 7.

Two levels:
- segment level: the engine's ``forward`` / ``backward`` on the canonical problem, against the
  dense reference engine run in float64 (``reference.forward(seg, prob, torch.float64)``: ref64)
  and in its own accumulation dtype rounded to the input dtype (ref_same): outputs within 2x of
  ref_same's error (3x for gradients, dpse, dsink), the 0.5 % golden criterion, statistics at
  float32 level, invalid-row sentinels exact;
- API level: the public forward / autograd with ``use_engine("native")`` against the independent
  oracle (``conftest.check_forward`` / ``check_grads``).
Also: dropout keep bits equal ``Dropout.keep``'s bit for bit (read back through one-hot values),
forced tiny tiles, the portable (non-AVX2) kernels, results bitwise equal for 1, 2 and 3 threads,
and the fallback to the PyTorch engine when the build is disabled.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fascore
# fascore internals used here (update when modules move): the reference engine's functions, the
# problem builder, the flash engine's tile config, the engine registry.
from fascore.engines import reference
from fascore.engines import get_engine, register_engine, unregister_engine
from fascore.engines.flash import config as flash_config
from fascore.spec import build_problem
from conftest import assert_within_rule, check_forward, check_grads, gen, make_qkv, randn
from oracle import FLT_MAX, compressed_causal_mask, compressed_prefix_mask, pack_bits

import fascore.engines.native as nat

CAUSAL = compressed_causal_mask()
PREFIX = compressed_prefix_mask()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]

needs_native = pytest.mark.skipif(not nat.available(), reason=f"native engine unavailable: {nat.status()}")
pytestmark = pytest.mark.usefixtures("one_thread", "native_registered")


@pytest.fixture(scope="module")
def native_registered():
    """The engine under the name "native" for use_engine (registered here unless dispatch has it)."""
    try:
        get_engine("native")
        yield
    except Exception:
        register_engine(nat.NativeEngine())
        yield
        unregister_engine("native")


@pytest.fixture(autouse=True)
def _restore_config():
    saved = dict(nat.config)
    yield
    nat.config.clear()
    nat.config.update(saved)


# ----------------------------------------------------------------------------------------------
# SPEC 7 helpers (local so that this module does not depend on conftest's newer helpers)
# ----------------------------------------------------------------------------------------------
def stats_rule(name, got, ref64, rel):
    """|got - ref64| <= rel * max(1, |ref64|) (max) / rel * |ref64| (sum); sentinels exact."""
    g, r = got.detach().double(), ref64.detach().double()
    assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
    assert not torch.isnan(g).any(), f"{name}: NaN"
    sent = r.abs() == FLT_MAX
    assert torch.equal(g[sent], r[sent]), f"{name}: invalid-row sentinels differ"
    scale = r.abs().clamp(min=1.0) if "max" in name else r.abs()
    bad = ((g - r).abs() > rel * scale) & ~sent
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements beyond float32 level, first at "
                           f"{bad.nonzero()[0].tolist()}: {g[bad][0].item()!r} vs {r[bad][0].item()!r}")


def golden(name, got, ref64):
    g, r = got.detach().double(), ref64.detach().double()
    if r.numel() == 0:
        return
    off = (g - r).abs() > (0.005 * r.abs()).clamp(min=2.5e-5)
    assert off.double().mean().item() <= 0.005, f"{name}: {off.double().mean().item():.2%} beyond the golden bound"


def problem(inp, **kw):
    args = {k: v for k, v in inp.items() if k not in ("query", "key", "value", "head_num", "input_layout")}
    args.update(kw)
    return build_problem(inp["query"], inp["key"], inp["value"], inp["head_num"], inp["input_layout"], **args)


def check_segments(inp, grads=True, dy_seed=5, **kw):
    """Native vs ref64 / ref_same on every segment of the problem (forward, then backward with
    each engine's own forward results). Returns the native results per segment."""
    prob = problem(inp, **kw)
    dt = prob.dtype
    results = []
    dpse_shape = prob.pse.shape if prob.pse is not None else None
    dsinks = {}
    if prob.sink is not None:
        dsinks = {k: torch.zeros(prob.n1, dtype=torch.float64 if k == "r64" else torch.float32)
                  for k in ("r64", "same", "nat")}
    dpses = {}
    if dpse_shape is not None:
        dpses = {k: torch.zeros(dpse_shape, dtype=torch.float64 if k == "r64" else torch.float32)
                 for k in ("r64", "same", "nat")}
    gall = []
    for si, seg in enumerate(prob.segments):
        o64, m64, l64 = reference.forward(seg, prob, torch.float64)
        os_, ms, ls = reference.forward(seg, prob)
        on, mn, ln = nat.forward(seg, prob)
        assert on.dtype == torch.float32 and mn.dtype == torch.float32 and ln.dtype == torch.float32
        assert on.shape == o64.shape and mn.shape == m64.shape and ln.shape == l64.shape
        what = f"segment {si}"
        assert_within_rule(f"{what} out", on.to(dt), o64, os_.to(dt), dt, 2.0)
        golden(f"{what} out", on.to(dt), o64)
        stats_rule(f"{what} softmax_max", mn, m64, 1e-5)
        stats_rule(f"{what} softmax_sum", ln, l64, 1e-4)
        results.append((on, mn, ln))
        if not grads:
            continue
        dy = randn(tuple(o64.shape), dt, gen(dy_seed + si))
        rows = seg.pse_rows
        g64 = reference.backward(seg, prob, dy, o64, m64, l64, dpses.get("r64", None) if not dpses else dpses["r64"][rows],
                                 dsinks.get("r64"), torch.float64)
        gs = reference.backward(seg, prob, dy, os_.to(dt), ms, ls, dpses["same"][rows] if dpses else None,
                                dsinks.get("same"))
        gn = nat.backward(seg, prob, dy, on.to(dt), mn, ln, dpses["nat"][rows] if dpses else None, dsinks.get("nat"))
        gall.append((what, g64, gs, gn))
    if not grads:
        return results
    floor = max([1.0] + [g.abs().max().item() for _, g64, _, _ in gall for g in g64 if g.numel()])
    for what, g64, gs, gn in gall:
        for name, a, b, c in zip(("dq", "dk", "dv"), gn, g64, gs):
            assert a.dtype == torch.float32 and a.shape == b.shape, f"{what} {name}: {a.dtype} {tuple(a.shape)}"
            assert_within_rule(f"{what} {name}", a.to(dt), b, c.to(dt), dt, 3.0, floor)
    if dpses:
        assert_within_rule("dpse", dpses["nat"].to(dt), dpses["r64"], dpses["same"].to(dt), dt, 3.0, floor)
    if dsinks:
        assert_within_rule("dsink", dsinks["nat"], dsinks["r64"], dsinks["same"], torch.float32, 3.0, floor)
    return results


# ----------------------------------------------------------------------------------------------
# Build and status
# ----------------------------------------------------------------------------------------------
def test_extension_builds_unless_disabled():
    """The extension builds and loads (CI: a compiler is present); status says which kernels run."""
    if os.environ.get("FASCORE_NATIVE", "1") == "0":
        assert not nat.available() and "FASCORE_NATIVE=0" in nat.status()
        return
    assert nat.available(), nat.status()
    assert nat.status().startswith("built ("), nat.status()


def test_fallback_when_disabled():
    """FASCORE_NATIVE=0: unavailable with the reason; dispatch runs the PyTorch engine, and the
    module's own functions fall back to it too."""
    code = (
        "import torch, fascore\n"
        "import fascore.engines.native as nat\n"
        "from fascore.engines import register_engine, get_engine\n"
        "from fascore.spec import build_problem\n"
        "assert not nat.available()\n"
        "print(nat.status())\n"
        "e = nat.NativeEngine()\n"
        "assert 'FASCORE_NATIVE=0' in e.unavailable()\n"
        "try:\n"
        "    get_engine('native')\n"
        "except Exception:\n"
        "    register_engine(e)\n"
        "assert fascore.current_engine_name('cpu') != 'native', fascore.current_engine_name('cpu')\n"
        "q = torch.randn(1, 2, 9, 8); k = torch.randn(1, 2, 11, 8); v = torch.randn(1, 2, 11, 8)\n"
        "a = fascore.npu_fusion_attention(q, k, v, 2, 'BNSD', scale=0.3)[0]\n"
        "with fascore.use_engine('flash'):\n"
        "    b = fascore.npu_fusion_attention(q, k, v, 2, 'BNSD', scale=0.3)[0]\n"
        "assert torch.equal(a, b)\n"
        "prob = build_problem(q, k, v, 2, 'BNSD', scale=0.3)\n"
        "o = nat.forward(prob.segments[0], prob)[0]\n"
        "assert torch.equal(o.to(a.dtype), b), 'module-level forward falls back'\n"
        "print('ok')\n")
    env = dict(os.environ, FASCORE_NATIVE="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FASCORE_NATIVE=0" in r.stdout and r.stdout.strip().endswith("ok"), r.stdout


@needs_native
def test_not_supported_float64_runs_on_fallback():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=7, Skv=9, D=8, dtype=torch.float64)
    prob = problem(inp, scale=0.3)
    assert nat.not_supported_reasons(prob.segments[0], prob) == ["dtype float64"]
    inp32 = make_qkv("BNSD", B=1, N1=2, Sq=7, Skv=9, D=8)
    prob32 = problem(inp32, scale=0.3)
    assert nat.not_supported_reasons(prob32.segments[0], prob32) == []
    out, m, l = nat.forward(prob.segments[0], prob)  # delegated to the PyTorch engine
    o64, m64, _ = reference.forward(prob.segments[0], prob)
    assert out.dtype == torch.float64 and torch.allclose(out, o64, atol=1e-12)
    assert nat.workspace_bytes(prob32.segments[0], prob32, True) > 0


# ----------------------------------------------------------------------------------------------
# Segment level: geometry, dtypes, large logits, GQA, layouts, rope
# ----------------------------------------------------------------------------------------------
GEOMS = [(1, 1, 8, 8), (1, 300, 16, 16), (77, 45, 20, 12), (130, 257, 40, 24), (200, 64, 64, 64)]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sq, skv, d, dv", GEOMS, ids=[f"{a}x{b}-d{c}-dv{e}" for a, b, c, e in GEOMS])
def test_dense_geometry(dtype, sq, skv, d, dv):
    inp = make_qkv("BNSD", B=2, N1=2, Sq=sq, Skv=skv, D=d, Dv=dv, dtype=dtype, seed=sq + skv)
    check_segments(inp, scale=d ** -0.5)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_large_logits(dtype):
    """Inputs scaled so that |L| reaches 10-30: the online rescaling and exp range matter."""
    inp = make_qkv("BSND", B=1, N1=2, Sq=150, Skv=333, D=64, dtype=torch.float32, seed=3)
    for k in ("query", "key"):
        inp[k] = (inp[k] * 3.0).to(dtype)
    inp["value"] = inp["value"].to(dtype)
    res = check_segments(inp, scale=0.125)
    assert res[0][1].abs().max().item() > 10  # the statistics show large logits


@needs_native
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("n1, n2", [(4, 2), (4, 1), (3, 3)])
def test_layouts_and_gqa(layout, n1, n2):
    inp = make_qkv(layout, B=2, N1=n1, N2=n2, Sq=70, Skv=90, D=16, Dv=8, seed=n1 * 10 + n2)
    check_segments(inp, scale=0.25, atten_mask=CAUSAL, sparse_mode=3)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope(dtype):
    inp = make_qkv("BSND", B=1, N1=2, Sq=65, Skv=80, D=32, Dr=8, dtype=dtype, seed=9)
    check_segments(inp, scale=0.2)


@needs_native
def test_non_contiguous_views():
    """Operands with arbitrary strides (a transposed head dim view, sliced storage) are read in place."""
    base = randn((2, 90, 3, 24), torch.float32, gen(4))
    q = base[:, :70, :2, :16]  # BSND view with padding on every axis
    kb = randn((2, 3, 24, 100), torch.float32, gen(5))
    k = kb[:, :2, :16, :90].permute(0, 3, 1, 2)  # last-dim stride != 1
    v = randn((2, 90, 2, 8), torch.float32, gen(6))
    inp = dict(query=q, key=k, value=v, head_num=2, input_layout="BSND")
    check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=2)


@needs_native
@pytest.mark.parametrize("layout", ["BSH", "SBH", "TND", "BNSD"])
def test_reread_operands_regrouped(layout, monkeypatch):
    """K/V (forward) and Q/dY (backward), re-read by every tile pass, are copied with each head's
    rows adjacent when the layout interleaves heads (not BNSD): within the rule, and bitwise equal
    to reading them in place."""
    nat.config["tiles"] = (8, 8)  # >= 4 passes over each operand
    if layout == "TND":
        inp = make_qkv("TND", N1=4, N2=2, D=16, seqlens_q=[30, 25], seqlens_kv=[40, 37], seed=12)
    else:
        inp = make_qkv(layout, B=2, N1=4, N2=2, Sq=45, Skv=52, D=16, seed=12)
    copied = []
    real = nat._heads_adjacent

    def spy(t, passes):
        out = real(t, passes)
        copied.append(out is not t)
        assert out.is_contiguous() and torch.equal(out, t)
        return out
    monkeypatch.setattr(nat, "_heads_adjacent", spy)
    kw = dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=3)
    got = check_segments(inp, **kw)
    assert any(copied) == (layout != "BNSD")
    monkeypatch.setattr(nat, "_heads_adjacent", real)
    monkeypatch.setattr(nat, "_REREADS", 1 << 40)  # never copied: the strided reads
    prob = problem(inp, **kw)
    for seg, (o, m, l) in zip(prob.segments, got):
        o2, m2, l2 = nat.forward(seg, prob)
        assert torch.equal(o, o2) and torch.equal(m, m2) and torch.equal(l, l2)
        dy = randn(tuple(o.shape), torch.float32, gen(3))
        g1 = nat.backward(seg, prob, dy, o, m, l, None, None)
        monkeypatch.setattr(nat, "_REREADS", 4)
        g2 = nat.backward(seg, prob, dy, o, m, l, None, None)
        monkeypatch.setattr(nat, "_REREADS", 1 << 40)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_broadcast_operands_not_regrouped():
    """A zero-stride (expanded) operand is read in place: a copy would materialise every repeat."""
    k = randn((1, 64, 2, 16), torch.float32, gen(1)).expand(3, 64, 2, 16)  # BSND, batch broadcast
    assert not nat._regroup(k.permute(0, 2, 1, 3), 100)
    assert nat._regroup(k.contiguous().permute(0, 2, 1, 3), 100)
    assert not nat._regroup(k.contiguous().permute(0, 2, 1, 3), 3)


# ----------------------------------------------------------------------------------------------
# Masks: every sparse mode, explicit masks by tile, invalid rows
# ----------------------------------------------------------------------------------------------
def blocky(shape, seed, p=0.2):
    m = torch.rand(*shape, generator=gen(seed)) < p
    sq, skv = shape[-2:]
    m[..., : sq // 2, skv // 3: 2 * skv // 3] = True  # masked-out tiles
    m[..., sq // 2:, : skv // 3] = False               # fully kept tiles
    m[..., sq - 2, :] = True                           # an invalid row
    return m


MODES = {
    "mode0-band": lambda sq, skv: dict(atten_mask=blocky((sq, skv), 1), sparse_mode=0, pre_tokens=40, next_tokens=-5),
    "mode0-band-nomask": lambda sq, skv: dict(atten_mask=torch.zeros(1, 1, sq, skv, dtype=torch.uint8),
                                               sparse_mode=0, pre_tokens=7, next_tokens=30),
    "mode1-BN": lambda sq, skv: dict(atten_mask=blocky((2, 2, sq, skv), 2).to(torch.uint8) * 3, sparse_mode=1),
    "mode1-B1": lambda sq, skv: dict(atten_mask=blocky((2, 1, sq, skv), 3), sparse_mode=1),
    "mode2": lambda sq, skv: dict(atten_mask=CAUSAL, sparse_mode=2),
    "mode3": lambda sq, skv: dict(atten_mask=CAUSAL, sparse_mode=3),
    "mode4": lambda sq, skv: dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=20, next_tokens=3),
    "mode5": lambda sq, skv: dict(atten_mask=blocky((2, 1, sq, skv), 4, 0.1), sparse_mode=5, prefix=[skv // 2, 3]),
    "mode6": lambda sq, skv: dict(atten_mask=PREFIX, sparse_mode=6, prefix=[max(0, skv - sq) + 5, skv]),
}


@needs_native
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sq, skv", [(150, 140), (100, 230)])
def test_sparse_modes(mode, sq, skv):
    inp = make_qkv("BSH", B=2, N1=2, Sq=sq, Skv=skv, D=16, seed=sq + len(mode))
    check_segments(inp, scale=0.3, **MODES[mode](sq, skv))


@needs_native
@pytest.mark.parametrize("tiles", [(8, 16), (16, 8), (5, 7), (1, 1)])
def test_forced_tiny_tiles(tiles):
    """Tiles far below the defaults: every tile kind, tile edges inside rows, counters per tile."""
    nat.config["tiles"] = tiles
    sq, skv = 37, 41
    inp = make_qkv("BNSD", B=2, N1=2, Sq=sq, Skv=skv, D=8, seed=tiles[0] * 7 + tiles[1])
    check_segments(inp, scale=0.3, **MODES["mode1-BN"](sq, skv))
    check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=6, next_tokens=2,
                   keep_prob=0.8, seed=11, offset=5)
    check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=3, sink=torch.tensor([0.5, -2.0]))


@needs_native
def test_flash_forced_tiles_are_honoured():
    """The flash engine's config['tiles'] also drives this engine (suite-wide tiny tiles)."""
    kernels = flash_config
    saved = kernels.config.get("tiles")
    kernels.config["tiles"] = (4, 8)
    try:
        inp = make_qkv("BNSD", B=1, N1=1, Sq=9, Skv=9, D=8)
        prob = problem(inp)
        assert nat._tiles(prob.segments[0], prob, False) == (4, 8)
        check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=2)
    finally:
        kernels.config["tiles"] = saved


# ----------------------------------------------------------------------------------------------
# pse forms and sink
# ----------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("shape", ["B,N,S,S", "1,N,S,S", "B,N,1,S", "1,N,1,S"])
def test_dense_pse(dtype, pse_type, shape):
    B, N1, sq, skv = 2, 2, 70, 90
    inp = make_qkv("BNSD", B=B, N1=N1, Sq=sq, Skv=skv, D=16, dtype=dtype, seed=pse_type)
    dims = {"B,N,S,S": (B, N1, sq, skv), "1,N,S,S": (1, N1, sq, skv), "B,N,1,S": (B, N1, 1, skv),
            "1,N,1,S": (1, N1, 1, skv)}[shape]
    pse = randn(dims, dtype, gen(7), 2.0)
    check_segments(inp, scale=0.3, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=3)


@needs_native
@pytest.mark.parametrize("pse_type", [0, 1])
def test_compressed_alibi_pse(pse_type):
    """SPEC 3's [B, N1, 1024, Skv] form with Sq = Skv > 1024, causal."""
    s = 1100
    inp = make_qkv("BSH", B=2, N1=1, Sq=s, Skv=s, D=8, seed=2)
    pse = randn((1, 1, 1024, s), torch.float32, gen(8))
    check_segments(inp, scale=0.3, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=2)


@needs_native
@pytest.mark.parametrize("pse_type", [2, 3])
def test_alibi_in_kernel(pse_type):
    inp = make_qkv("BNSD", B=2, N1=2, Sq=90, Skv=90, D=16, seed=pse_type)
    slopes = torch.tensor([[0.1, 0.02], [0.3, 0.05]])
    check_segments(inp, scale=0.3, pse=slopes, pse_type=pse_type, q_start_idx=[3], kv_start_idx=[1],
                   atten_mask=CAUSAL, sparse_mode=4, pre_tokens=30, next_tokens=4)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sink_with_invalid_rows(dtype):
    """A sink joins the normalisation; rows emptied by the mask are then not invalid (SPEC 3)."""
    inp = make_qkv("BSND", B=2, N1=2, Sq=60, Skv=40, D=16, dtype=dtype, seed=4)
    res = check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=3, sink=torch.tensor([1.0, -0.5]))
    out, m, l = res[0]
    assert torch.equal(m[:, :, :20], torch.tensor([1.0, -0.5]).view(1, 2, 1).expand(2, 2, 20))
    assert torch.equal(l[:, :, :20], torch.ones(2, 2, 20)) and not out[:, :, :20].any()


@needs_native
def test_invalid_rows_sentinels():
    inp = make_qkv("BNSD", B=1, N1=2, Sq=50, Skv=30, D=8, seed=6)
    out, m, l = check_segments(inp, scale=0.3, atten_mask=CAUSAL, sparse_mode=3)[0]
    assert (m[:, :, :20] == -FLT_MAX).all() and (l[:, :, :20] == FLT_MAX).all() and not out[:, :, :20].any()


# ----------------------------------------------------------------------------------------------
# TND
# ----------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("case", ["mode3", "mode8-alibi", "mode7", "explicit", "compressed-pse", "dropout", "no-keys"])
def test_tnd(case):
    if case == "no-keys":  # a batch without keys: its rows are invalid (or take the sink)
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[10, 7, 5], seqlens_kv=[0, 9, 0], seed=7)
        kw = dict(sink=torch.tensor([0.5, -1.0]))
        check_segments(inp, scale=0.3)
    elif case == "compressed-pse":
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[40, 0, 70], seqlens_kv=[40, 0, 70], seed=1)
        kw = dict(atten_mask=CAUSAL, sparse_mode=3, pse=randn((1, 2, 1024, 70), torch.float32, gen(3)), pse_type=1)
    elif case == "mode8-alibi":
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[50, 30], seqlens_kv=[50, 30], seed=2)
        kw = dict(atten_mask=CAUSAL, sparse_mode=8, pre_tokens=20, next_tokens=5, pse=torch.tensor([0.05, 0.2]),
                  pse_type=2, q_start_idx=[4], kv_start_idx=[4])
    elif case == "mode7":
        inp = make_qkv("TND", N1=2, N2=1, D=16, seqlens_q=[30, 45], seqlens_kv=[60, 45], seed=3)
        kw = dict(atten_mask=CAUSAL, sparse_mode=7, pre_tokens=10, next_tokens=2)
    elif case == "explicit":
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[30, 25], seqlens_kv=[20, 50], seed=4)
        kw = dict(atten_mask=blocky((55, 70), 9), sparse_mode=1)
    elif case == "dropout":
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[30, 25], seqlens_kv=[20, 37], seed=5)
        kw = dict(atten_mask=CAUSAL, sparse_mode=3, keep_prob=0.7, seed=123, offset=37)
    else:
        inp = make_qkv("TND", N1=2, D=16, seqlens_q=[33, 0, 60], seqlens_kv=[70, 20, 50], pad_q=3, seed=6)
        kw = dict(atten_mask=CAUSAL, sparse_mode=3)
    check_segments(inp, scale=0.3, **kw)


# ----------------------------------------------------------------------------------------------
# Dropout: the in-kernel bits are Dropout.keep's, bit for bit
# ----------------------------------------------------------------------------------------------
def _one_hot_problem(sq, skv, n1, b, **kw):
    """Values V = I (Dv = Skv), no mask: out[i, j] = P[i, j] * Z[i, j] / keep_prob, so Z = out != 0."""
    inp = make_qkv("BNSD", B=b, N1=n1, Sq=sq, Skv=skv, D=max(8, skv), seed=sq)
    inp["value"] = torch.eye(skv).expand(b, n1, skv, skv).contiguous()
    return problem(inp, scale=0.1, **kw)


@needs_native
@pytest.mark.parametrize("skv", [1, 16, 37, 64])
@pytest.mark.parametrize("offset", [0, 5, 16, 2 ** 40 + 3])
def test_philox_bits_equal_dropout_keep(skv, offset):
    for tiles in (None, (3, 5)):
        nat.config["tiles"] = tiles
        prob = _one_hot_problem(13, skv, 3, 2, keep_prob=0.6, seed=2 ** 63 + 12345, offset=offset)
        seg = prob.segments[0]
        out, _, _ = nat.forward(seg, prob)
        z = seg.dropout.keep(prob.n1, 0, 13, 0, skv, torch.device("cpu"))
        assert torch.equal(out != 0, z), f"tiles={tiles}: {(out != 0).ne(z).sum()} bits differ"
        assert 0.3 < z.float().mean() < 0.9


@needs_native
def test_explicit_dropout_bits_and_tnd_numbering():
    skv, sq, n1, b = 21, 11, 2, 2
    keep = torch.rand(b * n1 * sq * skv, generator=gen(3)) < 0.7
    prob = _one_hot_problem(sq, skv, n1, b, keep_prob=0.7, dropout_mask=pack_bits(keep))
    out, _, _ = nat.forward(prob.segments[0], prob)
    assert torch.equal(out != 0, keep.view(b, n1, sq, skv))
    # TND: batches follow each other, rows padded to 16 (Philox)
    inp = make_qkv("TND", N1=2, D=24, seqlens_q=[5, 9], seqlens_kv=[19, 19], seed=1)
    inp["value"] = torch.eye(19).repeat(2, 1).unsqueeze(1).expand(38, 2, 19).contiguous()
    prob = problem(inp, scale=0.1, keep_prob=0.5, seed=77, offset=40)
    for seg in prob.segments:
        out, _, _ = nat.forward(seg, prob)
        z = seg.dropout.keep(2, 0, seg.mask.sq, 0, seg.mask.skv, torch.device("cpu"))
        assert torch.equal(out != 0, z)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kind", ["philox", "bits"])
def test_dropout_forward_backward(dtype, kind):
    B, N1, sq, skv = 2, 2, 70, 100
    inp = make_qkv("BSH", B=B, N1=N1, N2=1, Sq=sq, Skv=skv, D=16, dtype=dtype, seed=8)
    kw = dict(keep_prob=0.75)
    if kind == "philox":
        kw.update(seed=99, offset=21)
    else:
        kw.update(dropout_mask=pack_bits(torch.rand(B * N1 * sq * skv, generator=gen(2)) < 0.75))
    check_segments(inp, scale=0.25, atten_mask=CAUSAL, sparse_mode=3, **kw)


@needs_native
def test_dropout_backward_bits():
    """Sq = 1: dv[j] = Pd[0, j] * dy[0] is zero exactly where the element is dropped."""
    prob = _one_hot_problem(1, 50, 2, 1, keep_prob=0.5, seed=5, offset=3)
    seg = prob.segments[0]
    out, m, l = nat.forward(seg, prob)
    dy = torch.ones(1, 2, 1, 50)
    _, _, dv = nat.backward(seg, prob, dy, out, m, l, None, None)
    z = seg.dropout.keep(2, 0, 1, 0, 50, torch.device("cpu"))[0, :, 0]  # [N1, Skv]
    assert torch.equal(dv[0, :, :, 0] != 0, z)


# ----------------------------------------------------------------------------------------------
# The portable kernels, thread counts
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def generic_isa():
    ext = nat._build.extension()
    ext.set_isa("generic")
    yield ext
    ext.set_isa("auto")


@needs_native
def test_portable_kernels(generic_isa):
    assert generic_isa.isa() == "generic"
    inp = make_qkv("BSND", B=2, N1=4, N2=2, Sq=60, Skv=60, D=20, Dv=12, dtype=torch.bfloat16, seed=12)
    check_segments(inp, scale=0.3, atten_mask=blocky((2, 1, 60, 60), 5), sparse_mode=5, prefix=[30, 3],
                   pse=torch.tensor([0.1, 0.2, 0.3, 0.4]), pse_type=3, keep_prob=0.8, seed=7,
                   sink=torch.tensor([0.0, 1.0, -1.0, 2.0]))
    inp = make_qkv("BNSD", B=1, N1=2, Sq=33, Skv=33, D=8, dtype=torch.float16, seed=13)
    check_segments(inp, scale=0.3, pse=randn((1, 2, 33, 33), torch.float16, gen(1)), pse_type=1)


def _thread_case():
    inp = make_qkv("BSH", B=2, N1=4, N2=2, Sq=300, Skv=420, D=24, Dv=16, dtype=torch.bfloat16, seed=21)
    mask = blocky((2, 1, 300, 420), 8)
    prob = problem(inp, scale=0.2, atten_mask=mask, sparse_mode=5, prefix=[200, 7], keep_prob=0.9, seed=4, offset=9,
                   pse=randn((1, 4, 300, 420), torch.bfloat16, gen(2)), pse_type=0, sink=torch.tensor([0., 1, 2, 3]))
    return prob


@needs_native
def test_bitwise_identical_for_any_thread_count():
    prob = _thread_case()
    seg = prob.segments[0]
    dy = randn((2, 4, 300, 16), torch.bfloat16, gen(3))
    results = []
    saved = torch.get_num_threads()
    ext = nat._build.extension()
    saved_work = ext.set_min_work(0.0)  # every pass starts all threads, however small
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            out, m, l = nat.forward(seg, prob)
            dpse = torch.zeros(prob.pse.shape)
            dsink = torch.zeros(4)
            g = nat.backward(seg, prob, dy, out.to(torch.bfloat16), m, l, dpse, dsink)
            results.append((out, m, l, *g, dpse, dsink))
    finally:
        torch.set_num_threads(saved)
        ext.set_min_work(saved_work)
    for nt, r in zip((2, 3), results[1:]):
        for i, (a, b) in enumerate(zip(results[0], r)):
            assert torch.equal(a, b), f"{nt} threads: result {i} differs from 1 thread"


# ----------------------------------------------------------------------------------------------
# API level against the oracle
# ----------------------------------------------------------------------------------------------
API_CASES = {
    "bsh-causal-fp32": (dict(layout="BSH", B=2, N1=2, Sq=60, Skv=60, D=16), dict(atten_mask=CAUSAL, sparse_mode=2)),
    "sbh-gqa-bf16": (dict(layout="SBH", B=1, N1=4, N2=2, Sq=40, Skv=70, D=16, dtype=torch.bfloat16), {}),
    "bsnd-pse-fp16": (dict(layout="BSND", B=2, N1=2, Sq=30, Skv=50, D=8, dtype=torch.float16),
                      dict(pse="dense", pse_type=1)),
    "bnsd-rope-dropout": (dict(layout="BNSD", B=1, N1=2, Sq=33, Skv=47, D=16, Dr=8),
                          dict(keep_prob=0.8, seed=3, offset=16, sink=torch.tensor([0.5, 1.5]))),
    "tnd-mode3": (dict(layout="TND", N1=2, seqlens_q=[20, 0, 35], seqlens_kv=[40, 5, 30], D=16),
                  dict(atten_mask=CAUSAL, sparse_mode=3)),
}


@needs_native
@pytest.mark.parametrize("case", list(API_CASES))
def test_api_against_oracle(case):
    shape, kw = API_CASES[case]
    shape, kw = dict(shape), dict(kw)
    layout = shape.pop("layout")
    inp = make_qkv(layout, seed=31, **shape)
    if kw.get("pse") == "dense":
        kw["pse"] = randn((shape["B"], shape["N1"], shape["Sq"], shape["Skv"]), shape["dtype"], gen(1))
    wrt = ["query", "key", "value"] + (["pse"] if "pse" in kw else []) + (["sink"] if "sink" in kw else [])
    wrt += ["query_rope", "key_rope"] if "Dr" in shape else []
    with fascore.use_engine("native"):
        check_forward(inp, scale=0.3, **kw)
        check_grads(inp, wrt, scale=0.3, **kw)


# ----------------------------------------------------------------------------------------------
# Non-finite inputs propagate as in the reference (NaN max, exp(NaN), P * Z, P = 0 when masked)
# ----------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("val", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("extra", ["causal", "dropout"])
def test_nonfinite_patterns_as_reference(val, where, extra):
    inp = make_qkv("BNSD", B=1, N1=2, Sq=12, Skv=12, D=8, seed=2)
    inp[where][0, 1, 5, 3] = val
    kw = dict(atten_mask=CAUSAL, sparse_mode=2) if extra == "causal" else dict(keep_prob=0.7, seed=3)
    prob = problem(inp, scale=0.3, **kw)
    seg = prob.segments[0]
    dy = torch.ones(1, 2, 12, 8)
    got = list(nat.forward(seg, prob))
    want = list(reference.forward(seg, prob))
    got += list(nat.backward(seg, prob, dy, got[0], got[1], got[2], None, None))
    want += list(reference.backward(seg, prob, dy, want[0], want[1], want[2], None, None))
    for name, x, y in zip(["out", "max", "sum", "dq", "dk", "dv"], got, want):
        assert torch.equal(x.isnan(), y.isnan()), f"{name}: NaN positions differ"
        assert torch.equal(x.isinf(), y.isinf()) and torch.equal(x[x.isinf()], y[y.isinf()]), f"{name}: Inf differ"
        fin = torch.isfinite(x)
        assert torch.allclose(x[fin], y[fin], rtol=1e-4, atol=1e-5), f"{name}: finite values differ"
