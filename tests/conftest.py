"""Shared helpers for the fascore test suite: tolerance rule (SPEC section 7), seeded input
builders for every layout, the engine fixture and the hypothesis profile."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))
from oracle import (FLT_MAX, attention_oracle, compressed_causal_mask,  # noqa: E402
                    compressed_prefix_mask)

CAUSAL_MASK = compressed_causal_mask()

try:
    import fascore  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - library not installed yet
    fascore = None
    _IMPORT_ERROR = exc

# ----------------------------------------------------------------------------------------------
# Hypothesis: reproducible and bounded.
# ----------------------------------------------------------------------------------------------
settings.register_profile(
    "fascore",
    derandomize=True,
    max_examples=int(os.environ.get("FASCORE_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
settings.load_profile("fascore")


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------
def _engines():
    if fascore is None:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"fascore not importable: {_IMPORT_ERROR!r}"))]
    return list(fascore.available_engines())


@pytest.fixture(params=_engines())
def engine(request):
    """Runs the test once per available fascore engine, with that engine selected."""
    with fascore.use_engine(request.param):
        yield request.param


@pytest.fixture
def clean(monkeypatch):
    """No torch_npu stand-in installed before and after the test (and no torch_npu module)."""
    from fascore import compat

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    compat.uninstall_torch_npu_shim()
    yield
    compat.uninstall_torch_npu_shim()


def band_keep(sq: int, skv: int, lo: int | None, hi: int | None, shift: int = 0) -> torch.Tensor:
    """Keep-mask (True = attend) of the band lo <= j - i - shift <= hi (None: unbounded side)."""
    diff = torch.arange(skv)[None, :] - torch.arange(sq)[:, None] - shift
    keep = torch.ones(sq, skv, dtype=torch.bool)
    if lo is not None:
        keep &= diff >= lo
    if hi is not None:
        keep &= diff <= hi
    return keep


def skip_unless_engine_dtype(engine: str, dtype: torch.dtype) -> None:
    """Skip a case in a dtype the forced engine does not declare (the native engine: no float64)."""
    if dtype not in fascore.engines.get_engine(engine).dtypes:
        pytest.skip(f"engine {engine!r} does not run {dtype} (it declares "
                    f"{sorted(str(d) for d in fascore.engines.get_engine(engine).dtypes)})")


_ONLY_DTYPE_REASONS = r"engine='(\w+)' cannot run this call: ((\w+ )?dtype (torch\.)?float64(; |$))+"


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test run with a forced engine that refuses the call for float64 alone (the dispatcher's
    declared dtypes, nothing else) is skipped, not failed: gradcheck and float64 cases exist for
    the engines that run float64. Any other refusal or error fails the test."""
    try:
        return (yield)
    except Exception as e:
        import re

        m = re.fullmatch(_ONLY_DTYPE_REASONS, str(e)) if type(e).__name__ == "FlashAttentionError" else None
        name = pyfuncitem.funcargs.get("engine")
        if m and m.group(1) == name and torch.float64 not in fascore.engines.get_engine(name).dtypes:
            pytest.skip(f"engine {name!r} does not run float64 ({e})")
        raise


@pytest.fixture
def fa():
    if fascore is None:
        pytest.skip(f"fascore not importable: {_IMPORT_ERROR!r}")
    return fascore


# ----------------------------------------------------------------------------------------------
# Tolerance rule (SPEC section 7)
# ----------------------------------------------------------------------------------------------
# eps is an absolute floor, scaled by max(1, max|ref64|) of the compared tensor, for the cases
# where ref_same happens to be (nearly) exact at its worst element, e.g. outputs that are
# exactly representable, rows that are exactly 0, or tiny problems where naive's rounding happens
# to cancel.  fp32: 1e-5 (~84 ulp at 1.0): the flash engine's online-softmax rescaling and a
# different summation order legitimately accumulate a few tens of ulp that naive fp32 might dodge
# by luck at its worst element, while any real bug (wrong mask entry, wrong bias, missing
# dropout scale) moves results by >= 1e-3.  fp16/bf16: one ulp at 1.0 of the dtype, i.e. the final
# rounding of the result to the output dtype.  float64: 1e-12.
EPS = {
    torch.float32: 1e-5,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float64: 1e-12,
}


def assert_within_rule(name, lib, ref64, naive, dtype, factor=2.0, scale_floor=1.0):
    """max|lib - ref64| <= factor * max|naive - ref64| + eps (SPEC section 7), naive = ref_same:
    the reference formula with float32 logits, rounded to the input dtype.

    eps = EPS[dtype] * max(scale_floor, max|ref64|).  Entries where ref64 is exactly +-FLT_MAX
    (invalid-row sentinels) must match exactly.
    """
    assert lib is not None, f"{name}: library returned None"
    assert tuple(lib.shape) == tuple(ref64.shape), \
        f"{name}: shape {tuple(lib.shape)} != expected {tuple(ref64.shape)}"
    lib64 = lib.detach().to("cpu", torch.float64)
    ref = ref64.detach().to("cpu", torch.float64)
    nv = naive.detach().to("cpu", torch.float64)
    assert not torch.isnan(lib64).any(), f"{name}: NaN in library result"
    sentinel = ref.abs() == FLT_MAX
    if sentinel.any():
        bad = (lib64 != ref) & sentinel
        assert not bad.any(), (
            f"{name}: invalid-row sentinel mismatch at {bad.nonzero()[:5].tolist()}: "
            f"got {lib64[bad][:5].tolist()} expected {ref[bad][:5].tolist()}")
    rest = ~sentinel
    if not rest.any():
        return
    err_lib = (lib64 - ref)[rest].abs().max().item()
    err_naive = (nv - ref)[rest].abs().max().item()
    scale = max(scale_floor, ref[rest].abs().max().item())
    tol = factor * err_naive + EPS[dtype] * scale
    if not err_lib <= tol:
        diff = (lib64 - ref).abs().masked_fill(sentinel, 0)
        idx = diff.argmax()
        idx = list(torch.unravel_index(idx, diff.shape)) if diff.dim() else []
        idx = [int(x) for x in idx]
        raise AssertionError(
            f"{name}: max|lib-ref64|={err_lib:.3e} > {factor}*max|naive-ref64|"
            f"({err_naive:.3e}) + eps({EPS[dtype] * scale:.1e}); worst at {idx}: "
            f"lib={lib64[tuple(idx)].item() if idx else lib64.item()!r} "
            f"ref={ref[tuple(idx)].item() if idx else ref.item()!r}")


def compute_dtype(dtype):
    """SPEC section 7's accumulation dtype: float32 for fp16/bf16/fp32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_same(result, dtype):
    """SPEC section 7's ref_same from an oracle result computed in compute_dtype(dtype): the
    reference formula with float32 logits and accumulation, rounded to the input dtype as the
    operator returns it."""
    return result.to(dtype) if result.dtype != dtype else result


STATS_TOL = {"softmax_max": 1e-5, "softmax_sum": 1e-4}


def assert_stats_rule(name, lib, ref64, kind=None):
    """SPEC section 7: statistics at float32 level for every input dtype, per element:
    |max - ref64| <= 1e-5 * max(1, |ref64|) and |sum - ref64| <= 1e-4 * ref64; the invalid-row
    sentinels (+-FLT_MAX) exact. ``kind``: "softmax_max" / "softmax_sum" (default from name)."""
    kind = kind or ("softmax_max" if "max" in name else "softmax_sum")
    assert tuple(lib.shape) == tuple(ref64.shape), f"{name}: shape {tuple(lib.shape)} != {tuple(ref64.shape)}"
    got = lib.detach().to("cpu", torch.float64)
    ref = ref64.detach().to("cpu", torch.float64)
    assert not torch.isnan(got).any(), f"{name}: NaN in library result"
    sentinel = ref.abs() == FLT_MAX
    bad = (got != ref) & sentinel
    assert not bad.any(), (f"{name}: invalid-row sentinel mismatch at {bad.nonzero()[:5].tolist()}: "
                           f"got {got[bad][:5].tolist()} expected {ref[bad][:5].tolist()}")
    rest = ~sentinel
    err = (got - ref).abs().masked_fill(sentinel, 0)
    if kind == "softmax_max":
        tol = STATS_TOL[kind] * ref.abs().clamp(min=1.0)
    else:
        tol = STATS_TOL[kind] * ref.abs()
    over = (err > tol) & rest
    if over.any():
        idx = over.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(over.sum())} of {int(rest.sum())} elements beyond SPEC 7's float32-level "
                             f"bound ({STATS_TOL[kind]:g} relative); first at {idx}: lib={got[tuple(idx)].item()!r} "
                             f"ref64={ref[tuple(idx)].item()!r}")


GOLDEN_REL, GOLDEN_ABS, GOLDEN_FRACTION = 0.005, 2.5e-5, 0.005


def assert_golden_fraction(name, lib, ref64):
    """SPEC section 7 (Ascend's golden criterion): at most 0.5 % of the elements differ from ref64
    by more than max(0.005 * |ref64|, 2.5e-5)."""
    got = lib.detach().to("cpu", torch.float64)
    ref = ref64.detach().to("cpu", torch.float64)
    if ref.numel() == 0:
        return
    off = (got - ref).abs() > torch.clamp(GOLDEN_REL * ref.abs(), min=GOLDEN_ABS)
    frac = off.double().mean().item()
    assert frac <= GOLDEN_FRACTION, (f"{name}: {frac:.2%} of {ref.numel()} elements beyond "
                                     f"max(0.005 |ref64|, 2.5e-5) (at most 0.5 % allowed)")


def assert_spec7(what, run, r64, same, dtype, names):
    """All of SPEC section 7 for one engine run (attributes out, smax, ssum, grads) against a
    float64 run ``r64`` and ``same`` = the reference engine on the same inputs (ref_same)."""
    assert_within_rule(f"{what} attention_out", run.out, r64.out, same.out, dtype, 2.0)
    assert_golden_fraction(f"{what} attention_out", run.out, r64.out)
    assert_stats_rule(f"{what} softmax_max", run.smax, r64.smax, "softmax_max")
    assert_stats_rule(f"{what} softmax_sum", run.ssum, r64.ssum, "softmax_sum")
    floor = max([1.0] + [g.abs().max().item() for g in r64.grads if g is not None and g.numel()])
    for n, a, b, c in zip(names, run.grads, r64.grads, same.grads):
        if b is None or b.numel() == 0:
            continue
        assert_within_rule(f"{what} {n}", a, b, c, dtype, 3.0, floor)


def assert_stats_shape(t, shape):
    assert t.dtype == torch.float32, f"statistics dtype {t.dtype} != float32"
    assert tuple(t.shape) == tuple(shape), f"statistics shape {tuple(t.shape)} != {shape}"
    assert torch.equal(t, t[..., :1].expand_as(t)), "the 8 copies of a statistic differ"


# ----------------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------------
def gen(seed):
    g = torch.Generator().manual_seed(int(seed))
    return g


def randn(shape, dtype, g, scale=1.0):
    """Standard normal drawn in float32 with generator g, then rounded to dtype, so that the
    library, ref_same and ref64 all see the very same input values."""
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def layout_shape(layout, B, N, S, d):
    layout = layout.upper()
    if layout == "BSH":
        return (B, S, N * d)
    if layout == "SBH":
        return (S, B, N * d)
    if layout == "BSND":
        return (B, S, N, d)
    if layout == "BNSD":
        return (B, N, S, d)
    raise ValueError(layout)


def cumsum(lengths):
    out, acc = [], 0
    for x in lengths:
        acc += int(x)
        out.append(acc)
    return out


def make_qkv(layout, B=2, N1=2, N2=None, Sq=8, Skv=8, D=16, Dv=None, dtype=torch.float32,
             seed=0, Dr=None, seqlens_q=None, seqlens_kv=None, pad_q=0, pad_kv=0,
             cum_q=None, cum_kv=None):
    """Seeded random inputs.  Returns a dict of keyword arguments for both the library and the
    oracle: query, key, value, head_num, input_layout (+ query_rope/key_rope with Dr,
    + actual_seq_qlen/actual_seq_kvlen for TND).

    TND: give per-batch lengths seqlens_q/seqlens_kv (cumulated here; pad_q/pad_kv extra
    trailing rows beyond the last batch), or the cumulative lists cum_q/cum_kv directly
    (they may contain repeated values and trailing zeros)."""
    N2 = N1 if N2 is None else N2
    Dv = D if Dv is None else Dv
    g = gen(seed)
    kw = dict(head_num=N1, input_layout=layout)
    if layout.upper() == "TND":
        if cum_q is None:
            cum_q = cumsum(seqlens_q)
        if cum_kv is None:
            cum_kv = cumsum(seqlens_kv)
        T1 = max(cum_q + [0]) + pad_q
        T2 = max(cum_kv + [0]) + pad_kv
        kw["query"] = randn((T1, N1, D), dtype, g)
        kw["key"] = randn((T2, N2, D), dtype, g)
        kw["value"] = randn((T2, N2, Dv), dtype, g)
        if Dr:
            kw["query_rope"] = randn((T1, N1, Dr), dtype, g)
            kw["key_rope"] = randn((T2, N2, Dr), dtype, g)
        kw["actual_seq_qlen"] = list(cum_q)
        kw["actual_seq_kvlen"] = list(cum_kv)
        return kw
    kw["query"] = randn(layout_shape(layout, B, N1, Sq, D), dtype, g)
    kw["key"] = randn(layout_shape(layout, B, N2, Skv, D), dtype, g)
    kw["value"] = randn(layout_shape(layout, B, N2, Skv, Dv), dtype, g)
    if Dr:
        kw["query_rope"] = randn(layout_shape(layout, B, N1, Sq, Dr), dtype, g)
        kw["key_rope"] = randn(layout_shape(layout, B, N2, Skv, Dr), dtype, g)
    return kw


def random_mask(shape, p, seed, dtype=torch.bool):
    g = gen(seed)
    return (torch.rand(*shape, generator=g) < p).to(dtype)


# ----------------------------------------------------------------------------------------------
# Forward check
# ----------------------------------------------------------------------------------------------
V1_RENAMES = {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"}


def call_forward(api, inputs, **kw):
    """Call fascore's v1 or v2 forward.  inputs: dict from make_qkv; kw: v2-style keywords."""
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["head_num"],
            inputs["input_layout"])
    extra = {k: v for k, v in inputs.items()
             if k not in ("query", "key", "value", "head_num", "input_layout")}
    extra.update(kw)
    if api == "v1":
        extra = {V1_RENAMES.get(k, k): v for k, v in extra.items()}
        assert extra.pop("pse_type", 1) == 1
        return fascore.npu_fusion_attention(*args, **extra)
    return fascore.npu_fusion_attention_v2(*args, **extra)


def expected_stats_shape(inputs):
    q = inputs["query"]
    layout = inputs["input_layout"].upper()
    N1 = inputs["head_num"]
    if layout == "TND":
        return (q.shape[0], N1, 8)
    B, Sq = {"BSH": (q.shape[0], q.shape[1]), "SBH": (q.shape[1], q.shape[0]),
             "BSND": (q.shape[0], q.shape[1]), "BNSD": (q.shape[0], q.shape[2])}[layout]
    return (B, N1, Sq, 8)


def check_forward(inputs, api="v2", factor=2.0, **kw):
    """Run fascore and the oracle (ref64 and ref_same) and apply SPEC section 7 to
    attention_out (2x rule and the 0.5 % golden criterion), softmax_max and softmax_sum
    (float32 level).  Also checks shapes/dtypes.  Returns the library's 7-tuple."""
    dtype = inputs["query"].dtype
    res = call_forward(api, inputs, **kw)
    assert isinstance(res, tuple) and len(res) == 7, "forward must return a 7-tuple"
    out, smax, ssum, sout = res[:4]
    okw = dict(inputs)
    okw.update(kw)
    if kw.get("keep_prob", 1.0) < 1.0:
        okw["seed"], okw["offset"] = res[4], res[5]
    ref_out, ref_max, ref_sum = attention_oracle(**okw)
    nv_out = ref_same(attention_oracle(**okw, dtype=compute_dtype(dtype))[0], dtype)
    assert out.dtype == dtype, f"attention_out dtype {out.dtype} != {dtype}"
    assert_stats_shape(smax, expected_stats_shape(inputs))
    assert_stats_shape(ssum, expected_stats_shape(inputs))
    assert sout.dtype == dtype and tuple(sout.shape) == (0,), \
        f"softmax_out must be empty [0] of {dtype}, got {sout.dtype} {tuple(sout.shape)}"
    assert_within_rule("attention_out", out, ref_out, nv_out, dtype, factor)
    assert_golden_fraction("attention_out", out, ref_out)
    assert_stats_rule("softmax_max", smax, ref_max)
    assert_stats_rule("softmax_sum", ssum, ref_sum)
    return res


def oracle_grads(inputs, dy, dtype, wrt, **kw):
    """Gradients of sum(out * dy) through the oracle computed in `dtype`, w.r.t. the entries
    named in `wrt` (keys of inputs/kw).  The leaves are copies of the given tensors."""
    okw = dict(inputs)
    okw.update(kw)
    leaves = {}
    for name in wrt:
        t = okw[name].detach().clone().requires_grad_(True)
        okw[name] = t
        leaves[name] = t
    out = attention_oracle(**okw, dtype=dtype)[0]
    grads = torch.autograd.grad(out, [leaves[n] for n in wrt], dy.to(out.dtype),
                                allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(wrt, grads)}


def lib_autograd(inputs, dy, wrt, api="v2", **kw):
    """fascore forward + torch.autograd.grad w.r.t. the named entries."""
    ins = dict(inputs)
    kws = dict(kw)
    leaves = {}
    for name in wrt:
        src = ins if name in ins else kws
        t = src[name].detach().clone().requires_grad_(True)
        src[name] = t
        leaves[name] = t
    res = call_forward(api, ins, **kws)
    grads = torch.autograd.grad(res[0], [leaves[n] for n in wrt], dy, allow_unused=True)
    return res, dict(zip(wrt, grads))


def check_grads(inputs, wrt, seed=123, factor=3.0, **kw):
    """Library autograd gradients vs oracle autograd gradients with SPEC's 3x rule."""
    dtype = inputs["query"].dtype
    res0 = call_forward("v2", inputs, **kw)
    dy = randn(tuple(res0[0].shape), dtype, gen(seed))
    if kw.get("keep_prob", 1.0) < 1.0:
        kw = dict(kw, seed=res0[4], offset=res0[5])
    res, g_lib = lib_autograd(inputs, dy, wrt, **kw)
    g_ref = oracle_grads(inputs, dy, torch.float64, wrt, **kw)
    g_nv = {n: ref_same(g, g_lib[n].dtype) for n, g in oracle_grads(inputs, dy, compute_dtype(dtype), wrt, **kw).items()}
    # eps floor for gradients: the largest reference gradient of this backward pass.  A gradient
    # can be exactly 0 in exact arithmetic through cancellation (e.g. Skv = 1: P = 1, so
    # dS = P * (dy.v - dy.out) = 0 and dq = dk = 0) while ref_same happens to cancel
    # exactly too; the library's float32 noise then scales with the ingredients of dS, whose size
    # shows in dv, not with max|dk| = 0.
    floor = max([1.0] + [g_ref[n].abs().max().item() for n in wrt if g_ref[n].numel()])
    for n in wrt:
        src = inputs.get(n, kw.get(n))
        assert g_lib[n] is not None, f"d{n}: no gradient from the library"
        assert g_lib[n].dtype == src.dtype, f"d{n} dtype {g_lib[n].dtype} != {src.dtype}"
        assert_within_rule(f"d{n}", g_lib[n], g_ref[n], g_nv[n], dtype, factor, floor)
    return res, g_lib, dy


def band_ok(pre, nxt, Sq, Skv):
    """SPEC section 4 band rules for top-left pre/next."""
    if pre < 0 and nxt < 0:
        return False
    if pre < 0 and not (nxt >= -pre and -pre < Skv):
        return False
    if nxt < 0 and not (pre >= -nxt and -nxt < Sq):
        return False
    return True


def causal_slopes(N, seed=0):
    g = gen(seed)
    return (torch.rand(N, generator=g) * 0.5 + 0.05).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# several tiles: sizes beyond typical block sizes (256 / 512), N = 1 to stay cheap
# ----------------------------------------------------------------------------------------------
def _blocky_mask(Sq, Skv, seed):
    m = random_mask((Sq, Skv), 0.1, seed)
    m[: Sq // 2, Skv // 3: 2 * Skv // 3] = True  # whole tiles masked out
    m[Sq - 3:, :] = True  # fully masked rows at the end
    return m


MULTI_BLOCK = {
    "mode0_band_mask": (dict(layout="BSND", Sq=300, Skv=1100),
                        dict(atten_mask="blocky", pre_tokens=200, next_tokens=-50)),
    "mode1_blocky": (dict(layout="BNSD", Sq=600, Skv=1030), dict(atten_mask="blocky",
                                                                  sparse_mode=1)),
    "mode3_sink_dropout": (dict(layout="BSH", Sq=600, Skv=300),
                           dict(atten_mask=CAUSAL_MASK, sparse_mode=3, sink=True, keep_prob=0.9,
                                seed=77)),
    "mode4_fp16": (dict(layout="SBH", Sq=777, Skv=777, dtype=torch.float16),
                   dict(atten_mask=CAUSAL_MASK, sparse_mode=4, pre_tokens=300, next_tokens=10)),
    "mode6": (dict(layout="BSND", Sq=520, Skv=1030),
              dict(atten_mask=compressed_prefix_mask(), sparse_mode=6, prefix=[700])),
    "tnd_mode3": (dict(layout="TND", seqlens_q=[300, 0, 650], seqlens_kv=[700, 20, 600]),
                  dict(atten_mask=CAUSAL_MASK, sparse_mode=3)),
    "tnd_mode8_alibi": (dict(layout="TND", seqlens_q=[520, 300], seqlens_kv=[520, 300]),
                        dict(atten_mask=CAUSAL_MASK, sparse_mode=8, pre_tokens=100, next_tokens=30,
                             pse="slopes", pse_type=2, q_start_idx=[5], kv_start_idx=[5],
                             softmax_layout="TND")),
}


def multi_block_case(name):
    shape, kw = MULTI_BLOCK[name]
    shape, kw = dict(shape), dict(kw)
    layout = shape.pop("layout")
    inp = make_qkv(layout, B=1, N1=1, D=8, seed=47, **shape)
    if kw.get("atten_mask") == "blocky":
        kw["atten_mask"] = _blocky_mask(shape["Sq"], shape["Skv"], 47)
    if kw.get("sink") is True:
        kw["sink"] = torch.tensor([1.5])
    if kw.get("pse") == "slopes":
        kw["pse"] = torch.tensor([0.01])
    return inp, kw


def qkv_out_shapes(layout, b, n1, n2, sq, skv, d, dv=None):
    """(query, key, value, attention_out) shapes of ``layout``; for TND sq/skv are T1/T2."""
    dv = d if dv is None else dv
    lay = layout.upper()
    if lay == "BSH":
        return (b, sq, n1 * d), (b, skv, n2 * d), (b, skv, n2 * dv), (b, sq, n1 * dv)
    if lay == "SBH":
        return (sq, b, n1 * d), (skv, b, n2 * d), (skv, b, n2 * dv), (sq, b, n1 * dv)
    if lay == "BSND":
        return (b, sq, n1, d), (b, skv, n2, d), (b, skv, n2, dv), (b, sq, n1, dv)
    if lay == "BNSD":
        return (b, n1, sq, d), (b, n2, skv, d), (b, n2, skv, dv), (b, n1, sq, dv)
    if lay == "TND":
        return (sq, n1, d), (skv, n2, d), (skv, n2, dv), (sq, n1, dv)
    raise AssertionError(layout)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster, above all on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
