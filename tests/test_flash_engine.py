"""The flash engine against the reference engine (the dense implementation of SPEC).

Every case runs the public forward (``npu_fusion_attention_v2``) and then
``npu_fusion_attention_grad_v2`` fed with *that engine's own* forward statistics and output, once
with the reference engine and once per flash configuration (forced tile sizes, merged or
unmerged key runs, fused CPU backward on or off, the narrow-band path with a forced block size
or switched off), and compares attention_out, softmax_max,
softmax_sum, dq, dk, dv, dpse, dsink (and dq_rope, dk_rope) tightly in float32:
``max|flash - reference| <= 1e-5 * max(1, max|reference|)`` per tensor, with the invalid-row
sentinels (+-FLT_MAX) equal exactly. The geometries straddle tile boundaries (1, b-1, b, b+1,
several tiles plus an odd remainder; Sq != Skv both ways), and the masks make tiles FULL,
PARTIAL and EMPTY and rows invalid inside tiles. float16/bfloat16 cases apply SPEC §7's rule to
both engines against a float64 run of the reference engine. Also: a hypothesis sweep over random
problems and configurations, bitwise repeatability, and CUDA vs CPU (skipped without a GPU).

``FASCORE_SUITE_ENGINE=native`` runs the whole suite with the native engine in the flash
engine's place (it takes the forced tile sizes from the same configuration; float64 cases skip
it), the check that the native engine passes the flash-vs-reference suite with tiny tiles.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fascore
from fascore.engines.flash import config as kernels
from conftest import assert_spec7, assert_within_rule, gen, make_qkv, oracle_grads, randn, skip_unless_engine_dtype
from oracle import FLT_MAX, attention_oracle, compressed_causal_mask, compressed_prefix_mask, pack_bits

CAUSAL = compressed_causal_mask()
PREFIX = compressed_prefix_mask()
Q_ARGS = ("query", "key", "value", "head_num", "input_layout")
GRAD_NAMES = ("dq", "dk", "dv", "dpse", "dq_rope", "dk_rope", "dsink")  # grad_v2's order
TOL32 = 1e-5
ENGINE = os.environ.get("FASCORE_SUITE_ENGINE", "flash")  # the engine under test
if ENGINE not in fascore.available_engines():
    pytest.skip(f"engine {ENGINE!r} is not available here", allow_module_level=True)

# Flash configurations. tile_bytes=1 keeps every key block its own forward tile (and one query
# block per band chunk); the default merges adjacent blocks of one kind into longer runs.
# band_bq sets kernels.BAND_BQ, the query block of the narrow-band path (64 by default, which
# needs Skv >= 128 before a band counts as narrow); band=False turns that path off.
CFG = {
    "8x16": dict(tiles=(8, 16), fused_backward=True, band=False),
    "8x16-tiled-unmerged": dict(tiles=(8, 16), fused_backward=False, tile_bytes=1, band=False),
    "16x16-unmerged": dict(tiles=(16, 16), fused_backward=True, tile_bytes=1, band=False),
    "16x16-tiled": dict(tiles=(16, 16), fused_backward=False, band=False),
    "16x8": dict(tiles=(16, 8), fused_backward=True, tile_bytes=1, band=False),
    "band4-chunked": dict(tiles=(8, 16), band=True, band_bq=4, tile_bytes=1),
    "band8": dict(tiles=(16, 16), band=True, band_bq=8, fused_backward=False),
}
ALL_CFGS = list(CFG)
TWO_CFGS = ["8x16", "16x16-tiled"]


@pytest.fixture(autouse=True)
def _restore_kernel_config():
    saved = dict(kernels.config)
    saved_bq = getattr(kernels, "BAND_BQ", None)
    yield
    kernels.config.clear()
    kernels.config.update(saved)
    if saved_bq is not None:
        kernels.BAND_BQ = saved_bq


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def flash_config(**cfg):
    """kernels.config overrides (and ``band_bq`` -> kernels.BAND_BQ), restored afterwards."""
    saved = dict(kernels.config)
    saved_bq = getattr(kernels, "BAND_BQ", None)
    band_bq = cfg.pop("band_bq", None)
    kernels.config.update(cfg)
    if band_bq is not None:
        kernels.BAND_BQ = band_bq
    try:
        yield
    finally:
        kernels.config.clear()
        kernels.config.update(saved)
        if saved_bq is not None:
            kernels.BAND_BQ = saved_bq


# ----------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    out: torch.Tensor
    smax: torch.Tensor
    ssum: torch.Tensor
    grads: tuple
    dy: torch.Tensor
    res: tuple


def _split(inp):
    return [inp[k] for k in Q_ARGS], {k: v for k, v in inp.items() if k not in Q_ARGS}


def run_engine(engine, inp, kw, dy=None, cfg=None, dy_seed=7, backward=True):
    """Forward, then grad_v2 with this engine's own statistics and output."""
    args, extra = _split(inp)
    with fascore.use_engine(engine), flash_config(**dict(cfg or {})):
        res = fascore.npu_fusion_attention_v2(*args, **extra, **kw)
        out, smax, ssum = res[:3]
        if dy is None:
            dy = randn(tuple(out.shape), out.dtype, gen(dy_seed))
        dy = dy.to(out.dtype)
        grads = ()
        if backward:
            gkw = {("scale_value" if k == "scale" else k): v for k, v in kw.items()}
            grads = fascore.npu_fusion_attention_grad_v2(
                args[0], args[1], args[2], dy, args[3], args[4], softmax_max=smax, softmax_sum=ssum,
                attention_in=out, numels=res[6], **extra, **gkw)
    return Run(out, smax, ssum, tuple(grads), dy, res)


def assert_tight(name, got, want, tol=TOL32):
    """max|got - want| <= tol * max(1, max|want|); +-FLT_MAX sentinels equal exactly."""
    if want is None:
        assert got is None, f"{name}: expected None, got {type(got)}"
        return
    assert got is not None, f"{name}: got None"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.device == want.device, f"{name}: device {got.device} != {want.device}"
    if want.numel() == 0:
        return
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    assert not torch.isnan(g).any(), f"{name}: NaN"
    sent = w.abs() == FLT_MAX
    if sent.any():
        bad = sent & (g != w)
        assert not bad.any(), f"{name}: invalid-row sentinel differs at {bad.nonzero()[:5].tolist()}"
    rest = ~sent
    if not rest.any():
        return
    scale = max(1.0, w[rest].abs().max().item())
    diff = (g - w).abs().masked_fill(sent, 0)
    err = diff.max().item()
    if not err <= tol * scale:
        idx = [int(x) for x in torch.unravel_index(diff.argmax(), diff.shape)]
        raise AssertionError(f"{name}: max|flash - reference| = {err:.3e} > {tol:.0e} * {scale:.3g} "
                             f"at {idx}: flash={g[tuple(idx)].item()!r} reference={w[tuple(idx)].item()!r}")


def assert_same_results(a: Run, b: Run, what: str, tol=TOL32):
    for n, x, y in (("attention_out", a.out, b.out), ("softmax_max", a.smax, b.smax),
                    ("softmax_sum", a.ssum, b.ssum)):
        assert_tight(f"{what}: {n}", x, y, tol)
    assert len(a.grads) == len(b.grads), f"{what}: grad tuple lengths differ"
    for n, x, y in zip(GRAD_NAMES, a.grads, b.grads):
        assert_tight(f"{what}: {n}", x, y, tol)


def compare(inp, kw, cfgs=TWO_CFGS, tol=TOL32):
    """Reference once, flash once per configuration; everything tightly equal. Returns the runs."""
    ref = run_engine("reference", inp, kw)
    runs = {}
    for name in cfgs:
        fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=CFG[name])
        assert_same_results(fl, ref, f"flash[{name}]", tol)
        runs[name] = fl
    return ref, runs


def band_ok(pre, nxt, sq, skv):
    """SPEC §4 band rules on top-left pre/next."""
    if pre < 0 and nxt < 0:
        return False
    if pre < 0 and not (nxt >= -pre and -pre < skv):
        return False
    if nxt < 0 and not (pre >= -nxt and -nxt < sq):
        return False
    return True


def structured_mask(shape, seed, bq=8, bk=16, p=0.3):
    """Random mask (True = masked out) with whole tiles masked / kept and one all-True row."""
    g = gen(seed)
    m = torch.rand(*shape, generator=g) < p
    sq, skv = shape[-2:]
    m[..., 0:bq, bk:2 * bk] = True          # an EMPTY tile (if it exists)
    m[..., bq:2 * bq, 0:bk] = False         # a FULL tile
    if sq > 2:
        m[..., sq // 2, :] = True           # an invalid row inside a tile
    if m.dim() == 4 and m.shape[1] > 1:
        m[:, 1, 2 * bq:3 * bq, :] = True    # a whole query block invalid in one head only
        m[:, 0, 2 * bq:3 * bq, 0:bk] = False
    return m


# ----------------------------------------------------------------------------------------------
# Geometry around tile boundaries
# ----------------------------------------------------------------------------------------------
def _sizes(b):
    return [1, b - 1, b, b + 1, 3 * b + 5]


GEOMS = [(tiles, sq, skv)
         for tiles in [(8, 16), (16, 16)]
         for sq in _sizes(tiles[0])
         for skv in _sizes(tiles[1])]


@pytest.mark.parametrize("tiles, sq, skv", GEOMS, ids=[f"{t[0]}x{t[1]}-{a}x{b}" for t, a, b in GEOMS])
def test_geometry_around_tile_boundaries(tiles, sq, skv):
    inp = make_qkv("BNSD", B=2, N1=2, Sq=sq, Skv=skv, D=8, seed=sq * 101 + skv)
    cfgs = [dict(tiles=tiles, fused_backward=True), dict(tiles=tiles, fused_backward=False, tile_bytes=1)]
    expl = structured_mask((2, 2, sq, skv), sq + skv, *tiles)
    cases = [
        dict(scale=0.35),
        dict(scale=0.35, atten_mask=CAUSAL, sparse_mode=3),   # invalid rows when Sq > Skv
        dict(scale=0.35, atten_mask=CAUSAL, sparse_mode=2),
        dict(scale=0.35, atten_mask=expl, sparse_mode=1),
    ]
    for kw in cases:
        ref = run_engine("reference", inp, kw)
        for cfg in cfgs:
            fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=cfg)
            assert_same_results(fl, ref, f"{cfg} mode={kw.get('sparse_mode', 0)}")


@pytest.mark.parametrize("sq, skv", [(300, 520), (520, 300)])
def test_default_tile_sizes(sq, skv):
    """The engine's own tile choice (forward and backward sizes differ) at a few tiles' size."""
    inp = make_qkv("BSH", B=1, N1=2, N2=1, Sq=sq, Skv=skv, D=16, seed=1)
    m = structured_mask((1, 2, sq, skv), 3, 256, 128)
    m[..., 256:, 128:256] = True
    for kw in (dict(atten_mask=m, sparse_mode=1), dict(atten_mask=CAUSAL, sparse_mode=3)):
        ref = run_engine("reference", inp, dict(kw, scale=0.25))
        for cfg in ({}, dict(fused_backward=False)):
            fl = run_engine(ENGINE, inp, dict(kw, scale=0.25), dy=ref.dy, cfg=cfg)
            assert_same_results(fl, ref, f"default tiles {cfg}")


# ----------------------------------------------------------------------------------------------
# Sparse modes
# ----------------------------------------------------------------------------------------------
SHAPES = [(29, 39), (39, 29)]


@pytest.mark.parametrize("sq, skv", SHAPES)
@pytest.mark.parametrize("pre, nxt", [(3, 5), (0, 0), (20, -3), (-2, 6), (100, 0), (2147483647, 2147483647)])
def test_mode0_band(sq, skv, pre, nxt):
    inp = make_qkv("BSH", B=2, N1=2, Sq=sq, Skv=skv, D=8, seed=sq + pre)
    m = torch.rand(sq, skv, generator=gen(sq * skv)) < 0.2
    compare(inp, dict(scale=0.3, atten_mask=m, sparse_mode=0, pre_tokens=pre, next_tokens=nxt), ALL_CFGS)
    zeros = torch.zeros(1, 1, sq, skv, dtype=torch.uint8)
    compare(inp, dict(scale=0.3, atten_mask=zeros, sparse_mode=0, pre_tokens=pre, next_tokens=nxt), TWO_CFGS)


@pytest.mark.parametrize("sq, skv", SHAPES)
@pytest.mark.parametrize("mshape", ["2d", "1,1", "B,1", "B,N"])
def test_mode1_explicit_mask(sq, skv, mshape):
    B, N1 = 2, 2
    shape = {"2d": (sq, skv), "1,1": (1, 1, sq, skv), "B,1": (B, 1, sq, skv), "B,N": (B, N1, sq, skv)}[mshape]
    inp = make_qkv("BSND", B=B, N1=N1, Sq=sq, Skv=skv, D=8, seed=sq)
    m = structured_mask(shape, sq * skv)
    compare(inp, dict(scale=0.3, atten_mask=m, sparse_mode=1), ALL_CFGS)
    compare(inp, dict(scale=0.3, atten_mask=m.to(torch.uint8) * 3, sparse_mode=1), ["8x16"])


@pytest.mark.parametrize("sq, skv", SHAPES + [(9, 17), (17, 9)])
@pytest.mark.parametrize("mode", [2, 3])
def test_causal_modes(sq, skv, mode):
    inp = make_qkv("BSH", B=2, N1=2, Sq=sq, Skv=skv, D=8, seed=mode)
    compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=mode), ALL_CFGS)


@pytest.mark.parametrize("sq, skv", SHAPES)
@pytest.mark.parametrize("pre, nxt", [(5, 3), (0, 0), (40, -2), (-3, 10), (8, 8)])
def test_mode4_band(sq, skv, pre, nxt):
    d = skv - sq
    if not band_ok(pre - d, nxt + d, sq, skv):
        pytest.skip("band rule")
    inp = make_qkv("BNSD", B=1, N1=2, Sq=sq, Skv=skv, D=8, seed=pre)
    compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=pre, next_tokens=nxt), ALL_CFGS)


@pytest.mark.parametrize("sq, skv", SHAPES + [(16, 16)])
@pytest.mark.parametrize("prefix_kind", ["zero", "mid", "full"])
def test_mode5_prefix(sq, skv, prefix_kind):
    B, N1 = 2, 2
    prefix = {"zero": [0, 0], "mid": [skv // 2, 3], "full": [skv, 16]}[prefix_kind]
    inp = make_qkv("BNSD", B=B, N1=N1, Sq=sq, Skv=skv, D=8, seed=sq + len(prefix_kind))
    m = torch.rand(B, 1, sq, skv, generator=gen(5)) < 0.15
    compare(inp, dict(scale=0.3, atten_mask=m, sparse_mode=5, prefix=prefix), ALL_CFGS)
    mz = torch.zeros(B, N1, sq, skv, dtype=torch.bool)
    compare(inp, dict(scale=0.3, atten_mask=mz, sparse_mode=5, prefix=prefix), TWO_CFGS)


@pytest.mark.parametrize("sq, skv", SHAPES + [(16, 16)])
@pytest.mark.parametrize("prefix_kind", ["low", "mid", "full"])
def test_mode6_prefix_compressed(sq, skv, prefix_kind):
    lo = max(0, skv - sq)
    prefix = {"low": [lo, lo], "mid": [(lo + skv) // 2, lo + 1], "full": [skv, lo]}[prefix_kind]
    inp = make_qkv("BSH", B=2, N1=2, Sq=sq, Skv=skv, D=8, seed=skv)
    compare(inp, dict(scale=0.3, atten_mask=PREFIX, sparse_mode=6, prefix=prefix), ALL_CFGS)


# ----------------------------------------------------------------------------------------------
# The narrow-band path (band.py): sparse_mode 4, and causal modes when Sq << Skv
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def band_hits(monkeypatch):
    """Counts the segments that go through the band path (so the tests know they reach it)."""
    from fascore.engines.flash import band
    hits = []
    real = band.window

    def window(seg, bq):
        w = real(seg, bq)
        if w is not None:
            hits.append(w)
        return w

    monkeypatch.setattr(band, "window", window)
    return hits


def assert_band_taken(hits: list, n0: int = 0) -> None:
    """The flash engine's band path ran since ``n0`` hits (another engine under test has none)."""
    if ENGINE == "flash":
        assert len(hits) > n0, "the band path was not taken"


BAND_CASES = {
    "mode4": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=3, next_tokens=2),
    "mode4-diag": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=0, next_tokens=0),
    "mode4-invalid-rows": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=10, next_tokens=-2),
    "mode4-wide-right": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=-2, next_tokens=5),
    "mode4-sink": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=4, next_tokens=1, sink="sink"),
    "mode4-alibi": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=4, next_tokens=4, pse="slopes", pse_type=2,
                        q_start_idx=[2], kv_start_idx=[-1]),
    "mode4-alibi-sqrt": dict(atten_mask=CAUSAL, sparse_mode=4, pre_tokens=6, next_tokens=0, pse="slopes-B",
                             pse_type=3),
}


@pytest.mark.parametrize("case", list(BAND_CASES))
@pytest.mark.parametrize("sq, skv", [(53, 53), (45, 61), (70, 50)])
@pytest.mark.parametrize("band_bq", [4, 8])
@pytest.mark.parametrize("G, dv", [(1, 8), (2, 4)])
def test_band_path(band_hits, case, sq, skv, band_bq, G, dv):
    kw = dict(BAND_CASES[case], scale=0.3)
    d = skv - sq
    if not band_ok(kw["pre_tokens"] - d, kw["next_tokens"] + d, sq, skv):
        pytest.skip("band rule")
    if kw.get("pse") is not None and sq != skv:
        pytest.skip("ALiBi needs Sq == Skv")
    B, N1 = 2, 2 * G
    inp = make_qkv("BSH", B=B, N1=N1, N2=2, Sq=sq, Skv=skv, D=8, Dv=dv, seed=sq + band_bq)
    if kw.get("sink") == "sink":
        kw["sink"] = randn((N1,), torch.float32, gen(1), scale=2.0)
    if kw.get("pse") == "slopes":
        kw["pse"] = torch.rand(N1, generator=gen(2))
    elif kw.get("pse") == "slopes-B":
        kw["pse"] = torch.rand(B, N1, generator=gen(3))
    ref = run_engine("reference", inp, kw)
    for cfg in (dict(band=True, band_bq=band_bq), dict(band=True, band_bq=band_bq, tile_bytes=1)):
        n0 = len(band_hits)
        fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=cfg)
        assert_band_taken(band_hits, n0)
        assert_same_results(fl, ref, f"band {cfg}")
    # and the same problem without the band path
    off = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=dict(band=False, tiles=(8, 16)))
    assert_same_results(off, ref, "band off")


@pytest.mark.parametrize("sq", [1, 5, 9])
def test_band_path_causal_short_queries(band_hits, sq):
    """Mode 2 with Sq << Skv is a narrow band (-(Sq-1) <= j - i <= 0)."""
    inp = make_qkv("BNSD", B=1, N1=2, Sq=sq, Skv=61, D=8, seed=sq)
    compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=2), ["band4-chunked", "band8", "8x16"])
    assert_band_taken(band_hits)


@pytest.mark.parametrize("mode", [7, 8])
def test_band_path_tnd(band_hits, mode):
    inp = make_qkv("TND", N1=4, N2=2, D=8, Dr=4, seed=mode, **TND_LENS["empty-middle"])
    kw = dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=mode, pre_tokens=3, next_tokens=1,
              sink=randn((4,), torch.float32, gen(5)))
    compare(inp, kw, ["band4-chunked", "band8", "16x16-tiled"])
    assert_band_taken(band_hits)


def test_band_path_default_block(band_hits):
    """The engine's own band block (kernels.BAND_BQ) on a long sequence."""
    inp = make_qkv("BSND", B=1, N1=2, N2=1, Sq=400, Skv=400, D=8, seed=4)
    kw = dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=20, next_tokens=5)
    ref = run_engine("reference", inp, kw)
    fl = run_engine(ENGINE, inp, kw, dy=ref.dy)
    assert_band_taken(band_hits)
    assert_same_results(fl, ref, "band default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_band_path_low_precision(band_hits, dtype):
    inp = make_qkv("BNSD", B=2, N1=4, N2=2, Sq=60, Skv=60, D=16, dtype=dtype, seed=3)
    kw = dict(scale=0.25, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=5, next_tokens=3, pse=torch.rand(4),
              pse_type=2, q_start_idx=[7])
    check_low_precision(inp, kw, ["band4-chunked", dict(band=True, band_bq=8)])
    assert_band_taken(band_hits)


# ----------------------------------------------------------------------------------------------
# Masked tiles and invalid rows
# ----------------------------------------------------------------------------------------------
def _invalid_rows(ref: Run):
    return ref.smax[..., 0] == -FLT_MAX


@pytest.mark.parametrize("case", ["mode3-sq>skv", "mode0-next<0", "explicit-rows", "explicit-block"])
@pytest.mark.parametrize("with_sink", [False, True])
def test_invalid_rows_inside_tiles(case, with_sink):
    B, N1, sq, skv = 2, 2, 37, 21
    inp = make_qkv("BNSD", B=B, N1=N1, Sq=sq, Skv=skv, D=8, seed=3)
    if case == "mode3-sq>skv":
        kw = dict(atten_mask=CAUSAL, sparse_mode=3)           # rows i < 16 are empty
    elif case == "mode0-next<0":
        kw = dict(atten_mask=torch.zeros(sq, skv, dtype=torch.bool), sparse_mode=0, pre_tokens=40,
                  next_tokens=-5)                              # rows i < 5 are empty
    elif case == "explicit-rows":
        m = torch.rand(B, N1, sq, skv, generator=gen(1)) < 0.3
        m[0, 0, 3] = True
        m[1, 1, 9:12] = True
        m[:, :, 17] = True
        kw = dict(atten_mask=m, sparse_mode=1)
    else:  # a whole query block (rows 8..15) masked in every batch and head: EMPTY tiles
        m = torch.rand(sq, skv, generator=gen(2)) < 0.3
        m[8:16] = True
        kw = dict(atten_mask=m, sparse_mode=0)
    if with_sink:
        kw["sink"] = randn((N1,), torch.float32, gen(4), scale=2.0)
    ref, runs = compare(inp, dict(kw, scale=0.4), ALL_CFGS)
    if with_sink:
        assert not _invalid_rows(ref).any(), "with a sink no row is invalid"
        return
    inv = _invalid_rows(ref)
    assert inv.any(), "the case must have invalid rows"
    for name, fl in runs.items():
        # exactly SPEC's invalid-row values, not just close
        assert torch.equal(_invalid_rows(fl), inv), name
        assert (fl.ssum[..., 0][inv] == FLT_MAX).all(), name
        assert (fl.out[inv] == 0).all(), name
        assert (fl.grads[0][inv] == 0).all(), f"{name}: dq of invalid rows must be 0"


def test_sink_rows_without_positions():
    """With a sink, a row where nothing takes part: softmax_max = sink, softmax_sum = 1, out = 0."""
    B, N1, sq, skv = 1, 2, 21, 9
    inp = make_qkv("BNSD", B=B, N1=N1, Sq=sq, Skv=skv, D=8, seed=8)
    sink = torch.tensor([0.5, -1.25])
    ref, runs = compare(inp, dict(scale=0.4, atten_mask=CAUSAL, sparse_mode=3, sink=sink), ALL_CFGS)
    for fl in runs.values():
        rows = slice(0, sq - skv)  # j <= i + (skv - sq): nothing for i < sq - skv
        assert torch.equal(fl.smax[0, :, rows, 0], sink.view(2, 1).expand(2, sq - skv))
        assert (fl.ssum[0, :, rows] == 1).all()
        assert (fl.out[0, :, rows] == 0).all()


# ----------------------------------------------------------------------------------------------
# TND
# ----------------------------------------------------------------------------------------------
TND_LENS = {
    "empty-middle": dict(seqlens_q=[9, 0, 17, 5], seqlens_kv=[16, 0, 20, 30], pad_q=2, pad_kv=1),
    "sq>skv": dict(seqlens_q=[17, 8, 1], seqlens_kv=[9, 8, 1]),
    "empty-first": dict(seqlens_q=[0, 20, 3], seqlens_kv=[0, 25, 3], pad_q=1),
    "skv0": dict(cum_q=[4, 7, 7, 12], cum_kv=[0, 5, 9, 9]),
}


def _tnd_kw(mode, inp, lens):
    kw = dict(scale=0.3)
    if mode in (2, 3, 4, 7, 8):
        kw.update(atten_mask=CAUSAL, sparse_mode=mode)
        if mode in (4, 7, 8):
            kw.update(pre_tokens=6, next_tokens=2)
    elif mode == 6:
        cq, ck = inp["actual_seq_qlen"], inp["actual_seq_kvlen"]
        sq = [b - a for a, b in zip([0] + cq[:-1], cq)]
        skv = [b - a for a, b in zip([0] + ck[:-1], ck)]
        kw.update(atten_mask=PREFIX, sparse_mode=6, prefix=[max(0, k - q) + (k - max(0, k - q)) // 2
                                                            for q, k in zip(sq, skv)])
    else:
        t1, t2 = inp["query"].shape[0], inp["key"].shape[0]
        kw.update(atten_mask=torch.rand(t1, t2, generator=gen(mode)) < 0.3, sparse_mode=mode)
        if mode == 0:
            kw.update(pre_tokens=10, next_tokens=3)
    return kw


@pytest.mark.parametrize("lens", list(TND_LENS))
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 6, 7, 8])
def test_tnd_modes(mode, lens):
    if lens == "skv0" and mode in (4, 6, 7, 8):
        pytest.skip("band / prefix rules need Skv_b > 0 here")
    inp = make_qkv("TND", N1=4, N2=2, D=8, seed=mode, **TND_LENS[lens])
    kw = _tnd_kw(mode, inp, lens)
    for sml in ["", "TND"]:
        compare(inp, dict(kw, softmax_layout=sml), ["8x16", "16x16-tiled"] if sml else ["16x8"])


def test_tnd_max_shape_mask_and_sink():
    inp = make_qkv("TND", N1=2, N2=1, D=8, seed=3, seqlens_q=[9, 0, 17], seqlens_kv=[16, 0, 20])
    m = structured_mask((17, 20), 6)
    compare(inp, dict(scale=0.3, atten_mask=m, sparse_mode=1, sink=torch.tensor([0.3, -0.7])), ALL_CFGS)


@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("mode", [2, 3])
def test_tnd_compressed_pse(pse_type, mode):
    lens = [9, 0, 17, 5]
    inp = make_qkv("TND", N1=2, N2=1, D=8, seed=4, seqlens_q=lens, seqlens_kv=lens)
    pse = randn((4, 2, 1024, 17), torch.float32, gen(5))
    compare(inp, dict(scale=0.3, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=mode), TWO_CFGS)


@pytest.mark.parametrize("mode", [3, 8])
@pytest.mark.parametrize("pse_type", [2, 3])
def test_tnd_alibi(mode, pse_type):
    lens = [9, 0, 17, 5]
    inp = make_qkv("TND", N1=2, N2=2, D=8, seed=5, seqlens_q=lens, seqlens_kv=lens)
    kw = dict(scale=0.3, pse=torch.tensor([0.3, 0.8]), pse_type=pse_type, q_start_idx=[4], kv_start_idx=[1],
              atten_mask=CAUSAL, sparse_mode=mode)
    if mode == 8:  # SPEC 3: mode 8 needs actual_seq_qlen[0] - actual_seq_kvlen[0] + qs - ks == 0
        kw.update(pre_tokens=5, next_tokens=0, kv_start_idx=[4])
    compare(inp, kw, ALL_CFGS)


# ----------------------------------------------------------------------------------------------
# GQA, Dv < D, rope
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("sq, skv", SHAPES)
def test_gqa_dv_smaller(G, sq, skv):
    inp = make_qkv("BSND", B=2, N1=4, N2=4 // G, Sq=sq, Skv=skv, D=12, Dv=8, seed=G)
    compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=3), ALL_CFGS)
    m = structured_mask((2, 4, sq, skv), G)
    compare(inp, dict(scale=0.3, atten_mask=m, sparse_mode=1), TWO_CFGS)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_rope(G, layout):
    inp = make_qkv(layout, B=2, N1=4, N2=4 // G, Sq=29, Skv=39, D=12, Dv=8, Dr=4, seed=G)
    ref, runs = compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=2), ALL_CFGS)
    assert len(ref.grads) == 7


def test_rope_tnd():
    inp = make_qkv("TND", N1=4, N2=2, D=8, Dv=8, Dr=4, seed=9, seqlens_q=[9, 0, 17], seqlens_kv=[16, 0, 20])
    compare(inp, dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=3), ALL_CFGS)


@pytest.mark.parametrize("fused", [True, False])
def test_dv_equals_d_fused_applies(fused):
    """Dv == D without dropout or pse: the fused CPU backward path is the one taken."""
    inp = make_qkv("BNSD", B=2, N1=4, N2=2, Sq=45, Skv=37, D=8, seed=2)
    m = structured_mask((2, 4, 45, 37), 2)
    for kw in (dict(scale=0.3), dict(scale=0.3, atten_mask=m, sparse_mode=1),
               dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=10, next_tokens=3)):
        ref = run_engine("reference", inp, kw)
        fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=dict(tiles=(16, 16), fused_backward=fused))
        assert_same_results(fl, ref, f"fused={fused}")


# ----------------------------------------------------------------------------------------------
# pse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pse_type", [0, 1])
@pytest.mark.parametrize("pshape", ["B,N,Sq,Skv", "1,N,Sq,Skv", "B,N,1,Skv", "1,N,1,Skv"])
@pytest.mark.parametrize("sq, skv", SHAPES)
def test_dense_pse(pse_type, pshape, sq, skv):
    B, N1 = 2, 4
    shape = {"B,N,Sq,Skv": (B, N1, sq, skv), "1,N,Sq,Skv": (1, N1, sq, skv),
             "B,N,1,Skv": (B, N1, 1, skv), "1,N,1,Skv": (1, N1, 1, skv)}[pshape]
    inp = make_qkv("BSH", B=B, N1=N1, N2=2, Sq=sq, Skv=skv, D=8, seed=pse_type)
    pse = randn(shape, torch.float32, gen(len(pshape)))
    compare(inp, dict(scale=0.3, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=3), ALL_CFGS)
    compare(inp, dict(scale=0.3, pse=pse, pse_type=pse_type), ["16x8"])


@pytest.mark.parametrize("pse_type, mode", [(0, 3), (1, 2), (1, 0)])
def test_compressed_alibi_pse_1030(pse_type, mode):
    """[Bp, N1, 1024, Skv] ALiBi-compressed pse at Sq = Skv = 1030 (thr = 6 cuts the first tile)."""
    S, N1 = 1030, 2
    inp = make_qkv("BNSD", B=2, N1=N1, N2=1, Sq=S, Skv=S, D=8, seed=11)
    pse = randn((1 if mode else 2, N1, 1024, S), torch.float32, gen(5))
    kw = dict(scale=0.3, pse=pse, pse_type=pse_type, atten_mask=CAUSAL, sparse_mode=mode)
    if mode == 0:
        kw.update(atten_mask=torch.zeros(S, S, dtype=torch.bool), pre_tokens=S, next_tokens=0)
    ref = run_engine("reference", inp, kw)
    fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=dict(tiles=(64, 128)))
    assert_same_results(fl, ref, "compressed pse")


@pytest.mark.parametrize("pse_type", [2, 3])
@pytest.mark.parametrize("slopes_shape", ["N", "B,N"])
@pytest.mark.parametrize("starts", [(None, None), ([3], [0]), ([0], [-5]), ([7], [7])])
@pytest.mark.parametrize("s", [1, 16, 23])
def test_alibi_in_kernel(pse_type, slopes_shape, starts, s):
    B, N1 = 2, 4
    inp = make_qkv("BSH", B=B, N1=N1, N2=2, Sq=s, Skv=s, D=8, seed=s)
    slopes = torch.rand(*((N1,) if slopes_shape == "N" else (B, N1)), generator=gen(1))
    qs, ks = starts
    kw = dict(scale=0.3, pse=slopes, pse_type=pse_type, q_start_idx=qs, kv_start_idx=ks)
    compare(inp, dict(kw, atten_mask=CAUSAL, sparse_mode=3), ["8x16", "8x16-tiled-unmerged", "16x8"])
    compare(inp, dict(kw, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=3, next_tokens=2), ["band4-chunked", "8x16"])
    compare(inp, kw, ["16x16-unmerged"])


# ----------------------------------------------------------------------------------------------
# sink, dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sq, skv", SHAPES)
@pytest.mark.parametrize("mode", [0, 1, 3])
def test_sink(sq, skv, mode):
    N1 = 4
    inp = make_qkv("BSH", B=2, N1=N1, N2=2, Sq=sq, Skv=skv, D=8, seed=mode)
    sink = randn((N1,), torch.float32, gen(9), scale=3.0)
    if mode == 3:
        kw = dict(atten_mask=CAUSAL, sparse_mode=3)
    else:
        m = structured_mask((sq, skv), mode)
        m[:, :5] = True
        kw = dict(atten_mask=m, sparse_mode=mode)
        if mode == 0:
            kw.update(pre_tokens=20, next_tokens=-2)
    compare(inp, dict(kw, scale=0.3, sink=sink), ALL_CFGS)


@pytest.mark.parametrize("source", ["explicit", "generated"])
@pytest.mark.parametrize("sq, skv", SHAPES)
@pytest.mark.parametrize("extra", ["causal", "pse+sink", "gqa4"])
def test_dropout(source, sq, skv, extra):
    B, N1 = 2, 4
    inp = make_qkv("BSH", B=B, N1=N1, N2=1 if extra == "gqa4" else 2, Sq=sq, Skv=skv, D=8, seed=sq)
    kw = dict(scale=0.3, keep_prob=0.75)
    if source == "explicit":
        kw["dropout_mask"] = pack_bits(torch.rand(B * N1 * sq * skv, generator=gen(4)) < 0.75)
    else:
        kw.update(seed=2**40 + 1234, offset=77)
    if extra == "causal" or extra == "gqa4":
        kw.update(atten_mask=CAUSAL, sparse_mode=3)
    else:
        kw.update(pse=randn((1, N1, sq, skv), torch.float32, gen(3)), sink=randn((N1,), torch.float32, gen(6)))
    ref, runs = compare(inp, kw, ["8x16", "16x16-unmerged", "16x8"])
    assert ref.res[4:] == runs["8x16"].res[4:]


@pytest.mark.parametrize("source", ["explicit", "generated"])
def test_dropout_tnd(source):
    inp = make_qkv("TND", N1=2, N2=1, D=8, seed=6, seqlens_q=[9, 0, 17, 5], seqlens_kv=[16, 0, 20, 30])
    kw = dict(scale=0.3, keep_prob=0.6, atten_mask=CAUSAL, sparse_mode=3)
    numels = 2 * (9 * 16 + 17 * 20 + 5 * 30)
    if source == "explicit":
        kw["dropout_mask"] = pack_bits(torch.rand(numels, generator=gen(7)) < 0.6)
    else:
        kw.update(seed=99, offset=3)
    compare(inp, kw, ["8x16", "16x16-tiled"])


# ----------------------------------------------------------------------------------------------
# Random problems (hypothesis): random geometry, tiles, mode, pse, sink, dropout, paths
# ----------------------------------------------------------------------------------------------
@st.composite
def random_problems(draw):
    sq, skv = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    b, n2, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    n1 = n2 * g
    d = draw(st.sampled_from([4, 8]))
    dv = draw(st.sampled_from([d, d // 2]))
    seed = draw(st.integers(0, 10_000))
    inp = make_qkv(draw(st.sampled_from(["BSH", "SBH", "BSND", "BNSD"])), B=b, N1=n1, N2=n2, Sq=sq, Skv=skv,
                   D=d, Dv=dv, seed=seed)
    kw = dict(scale=draw(st.sampled_from([0.2, 0.5, 1.5])))
    mode = draw(st.sampled_from([None, 0, 1, 2, 3, 4, 5, 6]))
    full_shape = draw(st.sampled_from([(sq, skv), (1, 1, sq, skv), (b, 1, sq, skv), (b, n1, sq, skv)]))
    mask = structured_mask(full_shape, seed, draw(st.integers(1, 9)), draw(st.integers(1, 9)),
                           draw(st.sampled_from([0.0, 0.2, 0.6])))
    if mode is not None:
        kw["sparse_mode"] = mode
        kw["atten_mask"] = {0: mask, 1: mask, 5: mask, 6: PREFIX}.get(mode, CAUSAL)
    if mode in (0, 4):
        pre, nxt = draw(st.integers(-10, 80)), draw(st.integers(-10, 80))
        d_ = skv - sq if mode == 4 else 0
        if not band_ok(pre - d_, nxt + d_, sq, skv):
            pre, nxt = 2147483647, 2147483647
        kw.update(pre_tokens=pre, next_tokens=nxt)
    if mode == 5:
        if b > 1 and (len(full_shape) == 2 or full_shape[0] != b):  # B > 1: [B, 1 or N1, Sq, Skv] only
            kw["atten_mask"] = structured_mask((b, 1, sq, skv), seed)
        kw["prefix"] = draw(st.lists(st.integers(0, skv), min_size=b, max_size=b))
    if mode == 6:
        kw["prefix"] = draw(st.lists(st.integers(max(0, skv - sq), skv), min_size=b, max_size=b))
    pse = draw(st.sampled_from([None, "full", "row", "alibi"]))
    if pse in ("full", "row"):
        kw["pse"] = randn((draw(st.sampled_from([1, b])), n1, sq if pse == "full" else 1, skv), torch.float32,
                          gen(seed + 1))
        kw["pse_type"] = draw(st.sampled_from([0, 1]))
    elif pse == "alibi" and sq == skv:
        kw.update(pse=torch.rand(n1, generator=gen(seed)), pse_type=draw(st.sampled_from([2, 3])),
                  q_start_idx=[draw(st.integers(-3, 3))])
    if draw(st.booleans()):
        kw["sink"] = randn((n1,), torch.float32, gen(seed + 2), scale=2.0)
    if draw(st.integers(0, 3)) == 0:
        kw.update(keep_prob=0.8, seed=seed + 1, offset=draw(st.integers(0, 9)))
    cfg = dict(tiles=(draw(st.integers(1, 24)), draw(st.integers(1, 24))), fused_backward=draw(st.booleans()),
               tile_bytes=draw(st.sampled_from([1, 4096, 8 << 20])), band=draw(st.booleans()))
    if cfg["band"]:
        cfg["band_bq"] = draw(st.sampled_from([2, 4, 8, 16]))
    return inp, kw, cfg


@settings(derandomize=True, max_examples=80, deadline=None)
@given(random_problems())
def test_random_problems(problem):
    inp, kw, cfg = problem
    ref = run_engine("reference", inp, kw)
    fl = run_engine(ENGINE, inp, kw, dy=ref.dy, cfg=cfg)
    assert_same_results(fl, ref, f"flash[{cfg}]")


# ----------------------------------------------------------------------------------------------
# float16 / bfloat16: SPEC §7 against a float64 run of the reference engine
# ----------------------------------------------------------------------------------------------
def _to64(inp, kw):
    i64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
    k64 = dict(kw)
    if kw.get("pse") is not None and kw.get("pse_type", 1) in (0, 1):
        k64["pse"] = kw["pse"].double()
    return i64, k64


def check_low_precision(inp, kw, cfgs):
    """SPEC §7 for every run: ref_same is the reference engine on the same (half) inputs."""
    dtype = inp["query"].dtype
    shape = tuple(run_engine("reference", inp, kw, backward=False).out.shape)
    dy = randn(shape, dtype, gen(5))
    i64, k64 = _to64(inp, kw)
    r64 = run_engine("reference", i64, k64, dy=dy.double())
    same = run_engine("reference", inp, kw, dy=dy)
    runs = [("reference", None)] + [(ENGINE, CFG[c] if isinstance(c, str) else c) for c in cfgs]
    for engine, cfg in runs:
        r = run_engine(engine, inp, kw, dy=dy, cfg=cfg)
        assert r.out.dtype == dtype
        assert_spec7(f"{engine}[{cfg}]", r, r64, same, dtype, GRAD_NAMES)


LOWP = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_low_precision_causal_gqa(dtype):
    inp = make_qkv("BNSD", B=2, N1=4, N2=2, Sq=29, Skv=39, D=16, dtype=dtype, seed=3)
    check_low_precision(inp, dict(scale=0.25, atten_mask=CAUSAL, sparse_mode=3),
                        ["8x16", "16x16-tiled", dict(tiles=(8, 16), fused_backward=False)])


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_low_precision_pse_sink_dropout(dtype):
    inp = make_qkv("BNSD", B=2, N1=4, N2=2, Sq=40, Skv=33, D=16, dtype=dtype, seed=4)
    kw = dict(scale=0.25, pse=randn((1, 4, 40, 33), dtype, gen(8)), sink=torch.randn(4, generator=gen(3)),
              keep_prob=0.8, seed=99, atten_mask=structured_mask((40, 33), 9), sparse_mode=1)
    check_low_precision(inp, kw, ["8x16", dict(tiles=(16, 8), tile_bytes=1)])


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_low_precision_alibi(dtype):
    inp = make_qkv("BNSD", B=2, N1=4, N2=2, Sq=40, Skv=40, D=16, dtype=dtype, seed=4)
    kw = dict(scale=0.25, pse=torch.rand(4, generator=gen(1)), pse_type=2, q_start_idx=[3])
    check_low_precision(inp, kw, ["8x16", "16x16-tiled"])


ALIBI_FAR = dict(scale=0.25, pse=torch.tensor([0.9, 0.7]), pse_type=2, q_start_idx=[1000], kv_start_idx=[0],
                 atten_mask=CAUSAL, sparse_mode=3)  # |bias| ~ 600..900: coarse in fp16/bf16


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_low_precision_alibi_large_bias_tiled(dtype):
    inp = make_qkv("BNSD", B=1, N1=2, Sq=64, Skv=64, D=16, dtype=dtype, seed=4)
    check_low_precision(inp, ALIBI_FAR, [dict(tiles=(16, 16), fused_backward=False)])


@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
def test_low_precision_alibi_large_bias_fused_as_accurate_as_tiled(dtype):
    """Asking for the fused backward must not cost accuracy: with a half-precision ALiBi bias the
    fused kernel runs on float32 operands and a float32 bias, never a rounded one."""
    inp = make_qkv("BNSD", B=1, N1=2, Sq=64, Skv=64, D=16, dtype=dtype, seed=4)
    dy = randn((1, 2, 64, 16), dtype, gen(5))
    i64, k64 = _to64(inp, ALIBI_FAR)
    r64 = run_engine("reference", i64, k64, dy=dy.double())
    tiled = run_engine(ENGINE, inp, ALIBI_FAR, dy=dy, cfg=dict(tiles=(16, 16), fused_backward=False))
    fused = run_engine(ENGINE, inp, ALIBI_FAR, dy=dy, cfg=dict(tiles=(16, 16), fused_backward=True))
    for n, f, t, r in zip(GRAD_NAMES[:3], fused.grads, tiled.grads, r64.grads):
        assert_within_rule(f"fused {n} (naive := tiled)", f, r, t, dtype, 3.0)


def test_float64_inputs_match_reference():
    skip_unless_engine_dtype(ENGINE, torch.float64)
    inp = make_qkv("BNSD", B=1, N1=2, Sq=29, Skv=39, D=8, dtype=torch.float64, seed=1)
    kw = dict(scale=0.3, atten_mask=CAUSAL, sparse_mode=3, pse=randn((1, 2, 29, 39), torch.float64, gen(2)))
    compare(inp, kw, ["8x16", "16x8"], tol=1e-12)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
DET_CASES = {
    "causal-gqa": (dict(B=2, N1=4, N2=1, Sq=45, Skv=37), dict(atten_mask=CAUSAL, sparse_mode=3)),
    "pse-dropout-sink": (dict(B=2, N1=4, N2=2, Sq=33, Skv=47),
                         dict(keep_prob=0.8, seed=5, offset=1, sink=torch.tensor([0.1, 0.2, -0.3, 1.0]))),
    "explicit": (dict(B=2, N1=2, N2=2, Sq=40, Skv=24), dict(sparse_mode=1)),
}


@pytest.mark.parametrize("case", list(DET_CASES))
@pytest.mark.parametrize("cfg", ["8x16", "8x16-tiled-unmerged", None], ids=["8x16", "8x16-tiled", "default"])
def test_repeated_calls_bitwise_identical(case, cfg):
    geo, kw = DET_CASES[case]
    inp = make_qkv("BSH", D=16, seed=12, **geo)
    kw = dict(kw, scale=0.25)
    if case == "pse-dropout-sink":
        kw["pse"] = randn((1, geo["N1"], geo["Sq"], geo["Skv"]), torch.float32, gen(13))
    if case == "explicit":
        kw["atten_mask"] = structured_mask((geo["B"], geo["N1"], geo["Sq"], geo["Skv"]), 14)
    c = CFG[cfg] if cfg else {}
    a = run_engine(ENGINE, inp, kw, cfg=c)
    b = run_engine(ENGINE, inp, kw, cfg=c, dy=a.dy)
    for n, x, y in (("out", a.out, b.out), ("max", a.smax, b.smax), ("sum", a.ssum, b.ssum)):
        assert torch.equal(x, y), f"forward {n} not bitwise repeatable"
    for n, x, y in zip(GRAD_NAMES, a.grads, b.grads):
        if x is None:
            assert y is None
            continue
        assert torch.equal(x, y), f"{n} not bitwise repeatable"


# ----------------------------------------------------------------------------------------------
# CUDA vs CPU (skipped without a GPU)
# ----------------------------------------------------------------------------------------------
def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


CUDA_CASES = {
    "causal-gqa": (dict(layout="BSH", B=2, N1=4, N2=2, Sq=29, Skv=39, D=16),
                   dict(atten_mask=CAUSAL, sparse_mode=3)),
    "explicit-sink": (dict(layout="BNSD", B=2, N1=2, N2=2, Sq=37, Skv=21, D=8),
                      dict(atten_mask=structured_mask((2, 2, 37, 21), 3), sparse_mode=1,
                           sink=torch.tensor([0.4, -0.8]))),
    "pse-dropout": (dict(layout="BSND", B=1, N1=2, N2=1, Sq=33, Skv=33, D=8),
                    dict(pse=torch.randn(1, 2, 33, 33, generator=gen(3)), keep_prob=0.7, seed=17, offset=4)),
    "alibi-tnd": (dict(layout="TND", N1=2, N2=2, D=8, seqlens_q=[9, 0, 17], seqlens_kv=[9, 0, 17]),
                  dict(pse=torch.tensor([0.3, 0.8]), pse_type=3, q_start_idx=[2], atten_mask=CAUSAL,
                       sparse_mode=2)),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCuda:
    @pytest.mark.parametrize("case", list(CUDA_CASES))
    @pytest.mark.parametrize("tiles", [(8, 16), None])
    def test_cuda_matches_cpu(self, case, tiles):
        geo, kw = CUDA_CASES[case]
        geo = dict(geo)
        inp = make_qkv(geo.pop("layout"), seed=21, **geo)
        kw = dict(kw, scale=0.3)
        cpu_ref = run_engine("reference", inp, kw)
        cfg = dict(tiles=tiles)
        cpu = run_engine(ENGINE, inp, kw, dy=cpu_ref.dy, cfg=cfg)
        gpu = run_engine(ENGINE, _to_device(inp, "cuda"), _to_device(kw, "cuda"), dy=cpu_ref.dy.cuda(), cfg=cfg)
        gref = run_engine("reference", _to_device(inp, "cuda"), _to_device(kw, "cuda"), dy=cpu_ref.dy.cuda())
        assert gpu.out.device.type == "cuda"
        assert_same_results(gpu, gref, "cuda flash vs cuda reference")
        moved = Run(*(_to_cpu(x) for x in (gpu.out, gpu.smax, gpu.ssum)), tuple(_to_cpu(g) for g in gpu.grads),
                    gpu.dy.cpu(), gpu.res)
        assert_same_results(moved, cpu, "cuda flash vs cpu flash")
        assert gpu.res[4:] == cpu.res[4:]

    def test_cuda_repeatable(self):
        geo, kw = CUDA_CASES["pse-dropout"]
        geo = dict(geo)
        inp = _to_device(make_qkv(geo.pop("layout"), seed=22, **geo), "cuda")
        kw = _to_device(dict(kw, scale=0.3), "cuda")
        a = run_engine(ENGINE, inp, kw)
        b = run_engine(ENGINE, inp, kw, dy=a.dy)
        assert torch.equal(a.out, b.out) and torch.equal(a.smax, b.smax) and torch.equal(a.ssum, b.ssum)
        for x, y in zip(a.grads, b.grads):
            assert (x is None and y is None) or torch.equal(x, y)


def _to_cpu(x):
    return x.cpu() if torch.is_tensor(x) else x
