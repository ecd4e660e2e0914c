"""The aclnn layer (SPEC 1.4): two-stage API, status codes instead of exceptions, outputs written
in place into caller-allocated tensors, executor single use, workspace checks, and agreement with
the torch-style entry points."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

from conftest import qkv_out_shapes, skip_unless_engine_dtype

import fascore
from fascore import FlashAttentionError
from fascore import aclnn

OK = 0
NULLPTR = 161001
INVALID = 161002
RUNTIME = 361001
I32MAX = 2147483647

B, N1, N2, S, D = 2, 4, 2, 16, 8
F32 = torch.float32
_GEN = torch.Generator().manual_seed(4321)


def rnd(*shape, dtype=F32):
    return torch.randn(*shape, generator=_GEN, dtype=torch.float64).to(dtype)


def shapes(layout, b=B, n1=N1, n2=N2, sq=S, skv=S, d=D, dv=None):
    """(query, key, value, attention_out) shapes; for TND sq/skv are T1/T2."""
    return qkv_out_shapes(layout, b, n1, n2, sq, skv, d, dv)


@functools.lru_cache(maxsize=None)
def _triu2048():
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def cmask():
    return _triu2048().clone()


def pmask():
    bottom = torch.cat([torch.zeros(1024, 1024, dtype=torch.bool),
                        torch.ones(1024, 1024, dtype=torch.bool)], 1)
    return torch.cat([_triu2048(), bottom], 0)


def norm(s):
    return s.lower().replace("_", "")


class Problem:
    """Tensors + torch-style keyword arguments; can be run through v2 or through aclnn."""

    def __init__(self, layout="BSND", dtype=F32, b=B, n1=N1, n2=N2, sq=S, skv=S, d=D, dv=None,
                 query=None, key=None, value=None, head_num=None, **kw):
        self.layout = layout
        self.dims = dict(b=b, n1=n1, n2=n2, sq=sq, skv=skv, d=d, dv=d if dv is None else dv)
        qs, ks, vs, os_ = shapes(layout, b, n1, n2, sq, skv, d, dv)
        self.out_shape = os_
        self.in_shapes = (qs, ks, vs)
        self.stat_shape = (b, n1, sq, 8)
        self.dtype = dtype
        self.q = rnd(*qs, dtype=dtype) if query is None else query
        self.k = rnd(*ks, dtype=dtype) if key is None else key
        self.v = rnd(*vs, dtype=dtype) if value is None else value
        self.head_num = n1 if head_num is None else head_num
        self.kw = kw

    # ---- torch-style --------------------------------------------------------------------
    def v2(self, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fascore.npu_fusion_attention_v2(self.q, self.k, self.v, self.head_num,
                                                   self.layout, **kw)

    def grad_v2(self, dy, out, smax, ssum, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        if "scale" in kw:
            kw["scale_value"] = kw.pop("scale")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fascore.npu_fusion_attention_grad_v2(
                self.q, self.k, self.v, dy, self.head_num, self.layout, softmax_max=smax,
                softmax_sum=ssum, attention_in=out, **kw)

    # ---- aclnn ---------------------------------------------------------------------------
    def _common(self, kw):
        return dict(
            prefix=kw.get("prefix"), qs=kw.get("q_start_idx"), ks=kw.get("kv_start_idx"),
            scale=kw.get("scale", 1.0), keep=kw.get("keep_prob", 1.0),
            pre=kw.get("pre_tokens", I32MAX), nxt=kw.get("next_tokens", I32MAX),
            inner=kw.get("inner_precise", 0), mode=kw.get("sparse_mode", 0),
            pse_type=kw.get("pse_type", 1),
        )

    def fwd_outputs(self):
        nan = float("nan")
        return dict(
            softmaxMaxOut=torch.full(self.stat_shape, nan),
            softmaxSumOut=torch.full(self.stat_shape, nan),
            softmaxOutOut=torch.empty(0, dtype=self.dtype),
            attentionOutOut=torch.full(self.out_shape, nan, dtype=self.dtype),
        )

    def aclnn_fwd_ws(self, outs=None, input_layout=None, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        c = self._common(kw)
        outs = self.fwd_outputs() if outs is None else outs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
                self.q, self.k, self.v, kw.get("pse"), kw.get("dropout_mask"),
                kw.get("padding_mask"), kw.get("atten_mask"), c["prefix"], c["qs"], c["ks"],
                c["scale"], c["keep"], c["pre"], c["nxt"], self.head_num,
                self.layout if input_layout is None else input_layout, c["inner"], c["mode"],
                c["pse_type"], outs["softmaxMaxOut"], outs["softmaxSumOut"],
                outs["softmaxOutOut"], outs["attentionOutOut"])
        assert isinstance(res, tuple) and len(res) == 3
        return res, outs

    def grad_outputs(self):
        nan = float("nan")
        pse = self.kw.get("pse")
        dpse = None
        if pse is not None and self.kw.get("pse_type", 1) in (0, 1):
            dpse = torch.full(pse.shape, nan, dtype=pse.dtype)
        qs, ks, vs = (t.shape if t is not None else s for t, s in
                      zip((self.q, self.k, self.v), self.in_shapes))
        return dict(dqOut=torch.full(qs, nan, dtype=self.dtype),
                    dkOut=torch.full(ks, nan, dtype=self.dtype),
                    dvOut=torch.full(vs, nan, dtype=self.dtype),
                    dpseOut=dpse)

    def aclnn_grad_ws(self, dy, out, smax, ssum, outs=None, input_layout=None, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        c = self._common(kw)
        outs = self.grad_outputs() if outs is None else outs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = aclnn.aclnnFlashAttentionScoreGradV2GetWorkspaceSize(
                self.q, self.k, self.v, dy, kw.get("pse"), kw.get("dropout_mask"),
                kw.get("padding_mask"), kw.get("atten_mask"), smax, ssum, None, out,
                c["prefix"], c["qs"], c["ks"], c["scale"], c["keep"], c["pre"], c["nxt"],
                self.head_num, self.layout if input_layout is None else input_layout,
                c["inner"], c["mode"], c["pse_type"], outs["dqOut"], outs["dkOut"],
                outs["dvOut"], outs["dpseOut"])
        assert isinstance(res, tuple) and len(res) == 3
        return res, outs


def workspace_for(ws):
    return torch.empty(ws, dtype=torch.uint8) if ws else None


def run_fwd(executor, ws):
    return aclnn.aclnnFlashAttentionScoreV2(workspace_for(ws), ws, executor, None)


def run_grad(executor, ws):
    return aclnn.aclnnFlashAttentionScoreGradV2(workspace_for(ws), ws, executor, None)


def assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    # bitwise for finite values; NaN positions must agree too
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), (
        f"{what}: max diff {(a.double() - b.double()).abs().max().item()}")


# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------
def test_status_constants():
    for mod in (fascore, aclnn):
        assert mod.ACLNN_SUCCESS == 0
        assert mod.ACLNN_ERR_PARAM_NULLPTR == 161001
        assert mod.ACLNN_ERR_PARAM_INVALID == 161002
        assert mod.ACLNN_ERR_RUNTIME_ERROR == 361001


# --------------------------------------------------------------------------------------------
# invalid input: same status as the torch-style API, never raises, message names the parameter
# --------------------------------------------------------------------------------------------
INVALID_CASES = {
    # id: (Problem kwargs, expected status, parameter names (torch-style, aclnn-style))
    "layout-unknown": (dict(input_layout_override="XYZ"), INVALID, ("input_layout",)),
    "sparse_mode-9": (dict(sparse_mode=9), INVALID, ("sparse_mode",)),
    "sparse_mode-7-non-TND": (dict(sparse_mode=7, atten_mask="cmask"), INVALID, ("sparse_mode",)),
    "inner_precise-4": (dict(inner_precise=4), INVALID, ("inner_precise",)),
    "keep_prob-0-with-mask": (dict(keep_prob=0.0, dropout_mask="dmask"), INVALID, ("keep_prob",)),
    "keep_prob-nan-with-mask": (dict(keep_prob=math.nan, dropout_mask="dmask"), INVALID,
                                ("keep_prob",)),
    "dropout_mask-too-short": (dict(keep_prob=0.5, dropout_mask="dmask-short"), INVALID,
                               ("dropout_mask", "dropMask")),
    "dropout_mask-dtype": (dict(keep_prob=0.5, dropout_mask="dmask-bool"), INVALID,
                           ("dropout_mask", "dropMask")),
    "head_num-ne-N": (dict(head_num=2), INVALID, ("head_num",)),
    "head_num-257": (dict(b=1, n1=257, n2=1, sq=2, skv=2, d=4), INVALID, ("head_num",)),
    "key-dtype": (dict(key="key-f16"), INVALID, ("key",)),
    "vD-gt-kD": (dict(value="value-D16"), INVALID, ("value",)),
    "D-769": (dict(b=1, n1=1, n2=1, sq=2, skv=2, d=769), INVALID, ("query", "key")),
    "pse_type-5": (dict(pse_type=5), INVALID, ("pse_type",)),
    "pse-shape": (dict(pse="pse-bad"), INVALID, ("pse", "realShift")),
    "pse-dtype": (dict(pse="pse-f16"), INVALID, ("pse", "realShift")),
    "alibi-missing-slopes": (dict(pse_type=2), INVALID, ("pse", "realShift", "pse_type")),
    "mask-dtype": (dict(atten_mask="mask-float"), INVALID, ("atten_mask",)),
    "mask-compressed-content": (dict(sparse_mode=3, atten_mask="cmask-bad"), INVALID,
                                ("atten_mask",)),
    "band-both-negative": (dict(atten_mask="fmask", pre_tokens=-1, next_tokens=-1), INVALID,
                           ("pre_tokens", "next_tokens")),
    "band-mode4": (dict(sparse_mode=4, atten_mask="cmask", pre_tokens=-5, next_tokens=2), INVALID,
                   ("pre_tokens", "next_tokens")),
    "prefix-missing": (dict(sparse_mode=6, atten_mask="pmask"), INVALID, ("prefix",)),
    "prefix-range": (dict(sparse_mode=6, atten_mask="pmask", prefix=[0, 17]), INVALID,
                     ("prefix",)),
    "padding_mask-given": (dict(padding_mask="padding"), INVALID, ("padding_mask",)),
    "query-none": (dict(query="none"), NULLPTR, ("query",)),
    "key-none": (dict(key="none"), NULLPTR, ("key",)),
    "value-none": (dict(value="none"), NULLPTR, ("value",)),
}


def _materialise(kw):
    kw = dict(kw)
    lay_override = kw.pop("input_layout_override", None)
    makers = {
        "cmask": cmask,
        "cmask-bad": lambda: torch.tril(torch.ones(2048, 2048, dtype=torch.bool)),
        "pmask": pmask,
        "fmask": lambda: torch.zeros(S, S, dtype=torch.bool),
        "mask-float": lambda: torch.zeros(S, S),
        "dmask": lambda: torch.full((256,), 255, dtype=torch.uint8),
        "dmask-short": lambda: torch.full((255,), 255, dtype=torch.uint8),
        "dmask-bool": lambda: torch.ones(2048, dtype=torch.bool),
        "key-f16": lambda: rnd(B, S, N2, D, dtype=torch.float16),
        "value-D16": lambda: rnd(B, S, N2, 16),
        "pse-bad": lambda: rnd(B, N2, S, S),
        "pse-f16": lambda: rnd(B, N1, S, S, dtype=torch.float16),
        "padding": lambda: torch.zeros(B, 1, S, S, dtype=torch.bool),
    }
    none_fields = []
    for k_, v_ in list(kw.items()):
        if v_ == "none":
            none_fields.append(k_)
            del kw[k_]
        elif isinstance(v_, str) and v_ in makers:
            kw[k_] = makers[v_]()
    p = Problem(**kw)
    for f in none_fields:
        setattr(p, {"query": "q", "key": "k", "value": "v"}[f], None)
    return p, lay_override


def _names_match(msg, params):
    aliases = {"input_layout": ["inputLayout"], "sparse_mode": ["sparseMode"],
               "inner_precise": ["innerPrecise"], "keep_prob": ["keepProb"],
               "head_num": ["headNum"], "pse_type": ["pseType"],
               "atten_mask": ["attenMask"], "pre_tokens": ["preTokens"],
               "next_tokens": ["nextTokens"], "prefix": ["prefixOptional"],
               "padding_mask": ["paddingMask"], "pse": ["realShift", "pseShift"],
               "dropout_mask": ["dropMask"]}
    m = norm(msg)
    for p in params:
        for name in [p] + aliases.get(p, []):
            if norm(name) in m:
                return True
    return False


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_status_matches_torch_api(case):
    kw, status, params = INVALID_CASES[case]
    p, lay = _materialise(kw)
    # torch-style API
    if lay is not None:
        p_layout = p.layout
        p.layout = lay
    with pytest.raises(FlashAttentionError) as ei:
        p.v2()
    assert ei.value.status == status
    if lay is not None:
        p.layout = p_layout
    # aclnn: returns the same status, does not raise
    (st, ws, ex), outs = p.aclnn_fwd_ws(input_layout=lay)
    assert st == status, aclnn.get_recent_err_msg()
    msg = aclnn.get_recent_err_msg()
    assert isinstance(msg, str) and msg
    assert _names_match(msg, params), f"{params} not named in {msg!r}"
    # outputs untouched on failure (still NaN)
    assert torch.isnan(outs["attentionOutOut"]).all()


@pytest.mark.parametrize("case", ["sparse_mode-9", "inner_precise-4", "head_num-ne-N",
                                  "mask-compressed-content", "band-mode4", "prefix-range",
                                  "padding_mask-given", "query-none", "key-none",
                                  "keep_prob-0-with-mask", "pse-shape", "layout-unknown"])
def test_grad_invalid_status_matches_torch_api(case):
    kw, status, params = INVALID_CASES[case]
    p, lay = _materialise(kw)
    dy = rnd(*p.out_shape)
    out = rnd(*p.out_shape)
    smax = torch.zeros(p.stat_shape)
    ssum = torch.ones(p.stat_shape)
    if lay is not None:
        p_layout, p.layout = p.layout, lay
    with pytest.raises(FlashAttentionError) as ei:
        p.grad_v2(dy, out, smax, ssum)
    assert ei.value.status == status
    if lay is not None:
        p.layout = p_layout
    (st, ws, ex), outs = p.aclnn_grad_ws(dy, out, smax, ssum, input_layout=lay)
    assert st == status, aclnn.get_recent_err_msg()
    assert _names_match(aclnn.get_recent_err_msg(), params), aclnn.get_recent_err_msg()


@pytest.mark.parametrize("kind", ["headNum-str", "prefix-str", "layout-none", "layout-int"])
def test_garbage_arguments_return_status_not_raise(kind):
    p = Problem()
    args = dict(input_layout=None)
    if kind == "headNum-str":
        p.head_num = "4"
    elif kind == "prefix-str":
        p.kw.update(prefix="abc", sparse_mode=6, atten_mask=pmask())
    elif kind == "layout-none":
        args["input_layout"] = None
        p.layout = None
    elif kind == "layout-int":
        p.layout = 5
    (st, ws, ex), _ = p.aclnn_fwd_ws(**args)
    assert st in (NULLPTR, INVALID)
    assert ex is None or st != OK


def test_tnd_rejected_at_aclnn():
    q, k = rnd(16, N1, D), rnd(16, N2, D)
    for lay in ["TND", "tnd"]:
        outs = dict(softmaxMaxOut=torch.zeros(16, N1, 8), softmaxSumOut=torch.zeros(16, N1, 8),
                    softmaxOutOut=None, attentionOutOut=torch.zeros(16, N1, D))
        st, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(
            q, k, k, None, None, None, None, None, None, None, 1.0, 1.0, I32MAX, I32MAX, N1,
            lay, 0, 0, 1, outs["softmaxMaxOut"], outs["softmaxSumOut"], None,
            outs["attentionOutOut"])
        assert st == INVALID
        assert _names_match(aclnn.get_recent_err_msg(), ("input_layout",))
        dq = torch.zeros_like(q)
        st, ws, ex = aclnn.aclnnFlashAttentionScoreGradV2GetWorkspaceSize(
            q, k, k, rnd(16, N1, D), None, None, None, None, torch.zeros(16, N1, 8),
            torch.ones(16, N1, 8), None, rnd(16, N1, D), None, None, None, 1.0, 1.0, I32MAX,
            I32MAX, N1, lay, 0, 0, 1, dq, torch.zeros_like(k), torch.zeros_like(k), None)
        assert st == INVALID


@pytest.mark.parametrize("which", ["softmaxMaxOut", "softmaxSumOut", "attentionOutOut"])
def test_required_forward_output_none_is_nullptr(which):
    p = Problem()
    outs = p.fwd_outputs()
    outs[which] = None
    (st, ws, ex), _ = p.aclnn_fwd_ws(outs=outs)
    assert st == NULLPTR
    assert _names_match(aclnn.get_recent_err_msg(), (which, which.replace("Out", "")))


@pytest.mark.parametrize("which", ["dqOut", "dkOut", "dvOut"])
def test_required_grad_output_none_is_nullptr(which):
    p = Problem()
    outs = p.grad_outputs()
    outs[which] = None
    dy, out = rnd(*p.out_shape), rnd(*p.out_shape)
    (st, ws, ex), _ = p.aclnn_grad_ws(dy, out, torch.zeros(p.stat_shape),
                                      torch.ones(p.stat_shape), outs=outs)
    assert st == NULLPTR
    assert _names_match(aclnn.get_recent_err_msg(), (which,))


def test_grad_dy_none_is_nullptr():
    p = Problem()
    (st, ws, ex), _ = p.aclnn_grad_ws(None, rnd(*p.out_shape), torch.zeros(p.stat_shape),
                                      torch.ones(p.stat_shape))
    assert st == NULLPTR
    assert _names_match(aclnn.get_recent_err_msg(), ("dy",))


@pytest.mark.parametrize("which,shape", [("attentionOutOut", (B, S, N1, D + 1)),
                                         ("softmaxMaxOut", (B, N1, S, 1)),
                                         ("softmaxSumOut", (B, N1, S))])
def test_wrong_output_shape_is_invalid(which, shape):
    p = Problem()
    outs = p.fwd_outputs()
    outs[which] = torch.zeros(shape, dtype=outs[which].dtype)
    (st, ws, ex), _ = p.aclnn_fwd_ws(outs=outs)
    assert st == INVALID


# --------------------------------------------------------------------------------------------
# success path
# --------------------------------------------------------------------------------------------
SUCCESS_CASES = {
    "BSH": dict(layout="BSH"),
    "SBH": dict(layout="SBH"),
    "BSND": dict(layout="BSND"),
    "BNSD": dict(layout="BNSD"),
    "BSH-gqa-sq-ne-skv": dict(layout="BSH", n2=1, sq=12, skv=20, dv=4),
    "SBH-pse-mask-band": dict(layout="SBH", pse=lambda: rnd(1, N1, S, S),
                              atten_mask=lambda: torch.rand(S, S, generator=_GEN) < 0.3,
                              pre_tokens=3, next_tokens=2, scale=0.3),
    "BSND-mode3-pse0": dict(layout="BSND", sq=12, skv=20, sparse_mode=3, atten_mask=cmask,
                            pse=lambda: rnd(B, N1, 1, 20), pse_type=0),
    "BNSD-alibi2-start": dict(layout="BNSD", pse_type=2, pse=lambda: torch.rand(B, N1),
                              q_start_idx=[2], kv_start_idx=[1]),
    "BSND-alibi3": dict(layout="BSND", pse_type=3, pse=lambda: torch.rand(N1)),
    "BSH-mode6-prefix": dict(layout="BSH", sparse_mode=6, atten_mask=pmask, prefix=[3, 16]),
    "BSND-mode5-prefix": dict(layout="BSND", sparse_mode=5, prefix=[0, 7],
                              atten_mask=lambda: torch.rand(B, 1, S, S, generator=_GEN) < 0.2),
    "BNSD-mode4-band": dict(layout="BNSD", sparse_mode=4, atten_mask=cmask, pre_tokens=4,
                            next_tokens=1),
    "BSND-f16": dict(layout="BSND", dtype=torch.float16),
    "BSH-bf16": dict(layout="BSH", dtype=torch.bfloat16),
    "BSND-f64": dict(layout="BSND", dtype=torch.float64),
    "BSND-inner3-empty-rows": dict(layout="BSND", inner_precise=3, atten_mask=lambda: torch.ones(
        S, S, dtype=torch.bool).triu(0)),
}


def _problem(case):
    kw = {k: (v() if callable(v) else v) for k, v in SUCCESS_CASES[case].items()}
    return Problem(**kw)


@pytest.mark.parametrize("case", list(SUCCESS_CASES))
def test_forward_success_in_place_equals_v2(case, engine):
    p = _problem(case)
    skip_unless_engine_dtype(engine, p.dtype)
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    assert st == OK, aclnn.get_recent_err_msg()
    assert type(ws) is int and ws >= 0
    assert ex is not None
    ptrs = {k: v.data_ptr() for k, v in outs.items() if v is not None}
    st = run_fwd(ex, ws)
    assert st == OK, aclnn.get_recent_err_msg()
    for k, v in outs.items():
        if v is not None:
            assert v.data_ptr() == ptrs[k], f"{k} was replaced, not written in place"
    ref = p.v2()
    assert_same(outs["attentionOutOut"], ref[0], "attention_out")
    assert_same(outs["softmaxMaxOut"], ref[1], "softmax_max")
    assert_same(outs["softmaxSumOut"], ref[2], "softmax_sum")
    assert not torch.isnan(outs["attentionOutOut"]).any()


def test_forward_nothing_happens_before_run():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    assert st == OK
    assert torch.isnan(outs["attentionOutOut"]).all()


def test_softmax_out_may_be_none():
    p = Problem(layout="BSH")
    outs = p.fwd_outputs()
    outs["softmaxOutOut"] = None
    (st, ws, ex), outs = p.aclnn_fwd_ws(outs=outs)
    assert st == OK
    assert run_fwd(ex, ws) == OK
    assert_same(outs["attentionOutOut"], p.v2()[0], "attention_out")


def test_executor_runs_once():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    assert st == OK
    assert run_fwd(ex, ws) == OK
    assert run_fwd(ex, ws) == RUNTIME
    assert aclnn.get_recent_err_msg()


def test_grad_executor_runs_once():
    p = Problem()
    out, smax, ssum = p.v2()[:3]
    (st, ws, ex), outs = p.aclnn_grad_ws(rnd(*p.out_shape), out, smax, ssum)
    assert st == OK
    assert run_grad(ex, ws) == OK
    assert run_grad(ex, ws) == RUNTIME


def test_workspace_size_is_int():
    for case in ["BSH", "BSND-mode3-pse0", "BSND-f16"]:
        (st, ws, ex), _ = _problem(case).aclnn_fwd_ws()
        assert st == OK and type(ws) is int and ws >= 0


def test_workspace_too_small_is_runtime_error():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    assert st == OK
    if ws == 0:
        pytest.skip("workspace_size == 0: nothing can be smaller")
    st = aclnn.aclnnFlashAttentionScoreV2(torch.empty(ws - 1, dtype=torch.uint8), ws, ex, None)
    assert st == RUNTIME
    assert torch.isnan(outs["attentionOutOut"]).all(), "outputs written despite the failure"


def test_workspace_none_when_size_positive_is_runtime_error():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    if ws == 0:
        pytest.skip("workspace_size == 0")
    assert aclnn.aclnnFlashAttentionScoreV2(None, ws, ex, None) == RUNTIME


def test_grad_workspace_too_small_is_runtime_error():
    p = Problem()
    out, smax, ssum = p.v2()[:3]
    (st, ws, ex), outs = p.aclnn_grad_ws(rnd(*p.out_shape), out, smax, ssum)
    assert st == OK
    if ws == 0:
        pytest.skip("workspace_size == 0")
    st = aclnn.aclnnFlashAttentionScoreGradV2(torch.empty(ws - 1, dtype=torch.uint8), ws, ex,
                                              None)
    assert st == RUNTIME


def test_larger_workspace_is_fine():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws()
    st = aclnn.aclnnFlashAttentionScoreV2(torch.empty(ws + 64, dtype=torch.uint8), ws, ex, None)
    assert st == OK
    assert_same(outs["attentionOutOut"], p.v2()[0], "attention_out")


# dropout happens only with dropMaskOptional
def test_keep_prob_without_drop_mask_means_no_dropout():
    p = Problem()
    (st, ws, ex), outs = p.aclnn_fwd_ws(keep_prob=0.5)
    assert st == OK
    assert run_fwd(ex, ws) == OK
    ref = p.v2(keep_prob=1.0)
    assert_same(outs["attentionOutOut"], ref[0], "attention_out")
    assert_same(outs["softmaxSumOut"], ref[2], "softmax_sum")


def test_drop_mask_applies_dropout(engine):
    p = Problem()
    g = torch.Generator().manual_seed(9)
    dmask = torch.randint(0, 256, (B * N1 * S * S // 8,), dtype=torch.uint8, generator=g)
    (st, ws, ex), outs = p.aclnn_fwd_ws(keep_prob=0.5, dropout_mask=dmask)
    assert st == OK
    assert run_fwd(ex, ws) == OK
    ref = p.v2(keep_prob=0.5, dropout_mask=dmask)
    assert_same(outs["attentionOutOut"], ref[0], "attention_out")
    nodrop = p.v2()
    assert not torch.allclose(outs["attentionOutOut"], nodrop[0]), "dropout had no effect"
    assert_same(outs["softmaxSumOut"], nodrop[2], "softmax_sum unchanged by dropout")


# --------------------------------------------------------------------------------------------
# grad pair
# --------------------------------------------------------------------------------------------
GRAD_CASES = ["BSH", "SBH", "BSND", "BNSD", "BSH-gqa-sq-ne-skv", "SBH-pse-mask-band",
              "BSND-mode3-pse0", "BNSD-alibi2-start", "BSH-mode6-prefix", "BSND-mode5-prefix",
              "BSND-f16", "BSND-f64", "BSND-inner3-empty-rows"]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_grad_success_in_place_equals_grad_v2(case, engine):
    p = _problem(case)
    skip_unless_engine_dtype(engine, p.dtype)
    out, smax, ssum = p.v2()[:3]
    dy = rnd(*p.out_shape, dtype=p.dtype)
    (st, ws, ex), outs = p.aclnn_grad_ws(dy, out, smax, ssum)
    assert st == OK, aclnn.get_recent_err_msg()
    assert type(ws) is int and ws >= 0
    ptrs = {k: v.data_ptr() for k, v in outs.items() if v is not None}
    assert run_grad(ex, ws) == OK, aclnn.get_recent_err_msg()
    for k, v in outs.items():
        if v is not None:
            assert v.data_ptr() == ptrs[k], f"{k} was replaced, not written in place"
    ref = p.grad_v2(dy, out, smax, ssum)
    assert_same(outs["dqOut"], ref[0], "dq")
    assert_same(outs["dkOut"], ref[1], "dk")
    assert_same(outs["dvOut"], ref[2], "dv")
    if outs["dpseOut"] is not None:
        assert ref[3] is not None
        assert_same(outs["dpseOut"], ref[3].to(outs["dpseOut"].dtype), "dpse")


def test_grad_drop_mask_matches_grad_v2(engine):
    p = Problem(layout="BSND")
    g = torch.Generator().manual_seed(3)
    dmask = torch.randint(0, 256, (B * N1 * S * S // 8,), dtype=torch.uint8, generator=g)
    out, smax, ssum = p.v2(keep_prob=0.7, dropout_mask=dmask)[:3]
    dy = rnd(*p.out_shape)
    (st, ws, ex), outs = p.aclnn_grad_ws(dy, out, smax, ssum, keep_prob=0.7, dropout_mask=dmask)
    assert st == OK
    assert run_grad(ex, ws) == OK
    ref = p.grad_v2(dy, out, smax, ssum, keep_prob=0.7, dropout_mask=dmask)
    for i, k in enumerate(["dqOut", "dkOut", "dvOut"]):
        assert_same(outs[k], ref[i], k)


def test_grad_keep_prob_without_drop_mask_means_no_dropout():
    p = Problem(layout="BNSD")
    out, smax, ssum = p.v2()[:3]
    dy = rnd(*p.out_shape)
    (st, ws, ex), outs = p.aclnn_grad_ws(dy, out, smax, ssum, keep_prob=0.5)
    assert st == OK
    assert run_grad(ex, ws) == OK
    ref = p.grad_v2(dy, out, smax, ssum, keep_prob=1.0)
    for i, k in enumerate(["dqOut", "dkOut", "dvOut"]):
        assert_same(outs[k], ref[i], k)


def test_forward_then_grad_round_trip_through_aclnn(engine):
    """Statistics produced by the aclnn forward feed the aclnn backward."""
    p = _problem("SBH-pse-mask-band")
    (st, ws, ex), fo = p.aclnn_fwd_ws()
    assert st == OK and run_fwd(ex, ws) == OK
    dy = rnd(*p.out_shape)
    (st, ws, ex), go = p.aclnn_grad_ws(dy, fo["attentionOutOut"], fo["softmaxMaxOut"],
                                       fo["softmaxSumOut"])
    assert st == OK and run_grad(ex, ws) == OK
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (p.q, p.k, p.v))
    pse = p.kw["pse"].clone().requires_grad_(True)
    kw = dict(p.kw, pse=pse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = fascore.npu_fusion_attention_v2(qq, kk, vv, p.head_num, p.layout, **kw)[0]
    o.backward(dy)
    torch.testing.assert_close(go["dqOut"], qq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(go["dkOut"], kk.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(go["dvOut"], vv.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(go["dpseOut"], pse.grad, rtol=1e-5, atol=1e-5)
