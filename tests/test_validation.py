"""Input validation of the torch-style entry points (SPEC sections 2-9 + the README's Decisions section).

Black-box tests: every case builds an otherwise-valid small call and breaks exactly one rule,
then checks that ``fascore.FlashAttentionError`` is raised with the right ``.status`` and that
the message names the offending parameter.  Positive counter-tests check that the boundary
values of every rule are accepted, so a validator that rejects everything cannot pass.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from conftest import qkv_out_shapes

import fascore
from fascore import FlashAttentionError

NULLPTR = 161001
INVALID = 161002
RUNTIME = 361001

# default problem: B=2, N1=4, N2=2, Sq=Skv=16, D=Dv=8, float32, BSND
B, N1, N2, S, D = 2, 4, 2, 16, 8
F32 = torch.float32

V1_RENAME = {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"}
GRAD_RENAME = {"scale": "scale_value"}
DIM_KEYS = ("b", "n1", "n2", "sq", "skv", "d", "dv")
KEEP = object()

ALL = ("v2", "v1", "grad", "grad_v2")
STRUCT = ("v2", "v1")  # cases that change query/key/value shapes: forward entry points only
V2ONLY = ("v2", "grad_v2")  # cases using v2-only keywords (pse_type, rope, start indices)
FWD_V2 = ("v2",)

# TND default: T1=16 (Sq_b = 6, 10), T2=20 (Skv_b = 8, 12)
TND_Q = [6, 16]
TND_KV = [8, 20]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
_GEN = torch.Generator().manual_seed(1234)


def rnd(*shape, dtype=F32):
    return torch.randn(*shape, generator=_GEN, dtype=torch.float64).to(dtype)


def layout_shapes(layout, b=B, n1=N1, n2=N2, sq=S, skv=S, d=D, dv=None):
    """(query, key, value, attention_out) shapes; for TND sq/skv are T1/T2."""
    return qkv_out_shapes(layout, b, n1, n2, sq, skv, d, dv)


@functools.lru_cache(maxsize=None)
def _triu2048():
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def cmask(dtype=torch.bool, lead=False):
    """Compressed causal mask [2048, 2048] (optionally [1, 1, 2048, 2048])."""
    m = _triu2048().clone().to(dtype)
    return m.view(1, 1, 2048, 2048) if lead else m


def pmask(dtype=torch.bool, lead=False):
    """Compressed prefix mask [3072, 2048]."""
    bottom = torch.cat(
        [torch.zeros(1024, 1024, dtype=torch.bool), torch.ones(1024, 1024, dtype=torch.bool)], 1
    )
    m = torch.cat([_triu2048(), bottom], 0).to(dtype)
    return m.view(1, 1, 3072, 2048) if lead else m


def fmask(*shape, dtype=torch.bool):
    """A full (explicit) mask where nothing is masked."""
    return torch.zeros(*shape, dtype=dtype)


def causal_full(sq, skv, dtype=torch.bool):
    return torch.triu(torch.ones(sq, skv, dtype=dtype), diagonal=1)


def build(api, layout="BSND", dtype=F32, head_num=None, input_layout=None, query=KEEP,
          key=KEEP, value=KEEP, dy=KEEP, softmax_max=KEEP, softmax_sum=KEEP,
          attention_in=KEEP, **kw):
    """Return (fn, args, kwargs) of an otherwise-valid call of entry point ``api``."""
    dims = {k: kw.pop(k) for k in list(kw) if k in DIM_KEYS}
    is_tnd = layout.upper() == "TND"
    if is_tnd:
        dims.setdefault("sq", 16)
        dims.setdefault("skv", 20)
        kw.setdefault("actual_seq_qlen", list(TND_Q))
        kw.setdefault("actual_seq_kvlen", list(TND_KV))
    qs, ks, vs, os_ = layout_shapes(layout, **dims)
    n1 = dims.get("n1", N1)
    q = rnd(*qs, dtype=dtype) if query is KEEP else query
    k = rnd(*ks, dtype=dtype) if key is KEEP else key
    v = rnd(*vs, dtype=dtype) if value is KEEP else value
    hn = n1 if head_num is None else head_num
    lay = layout if input_layout is None else input_layout
    if api in ("v1", "grad"):
        kw = {V1_RENAME.get(k_, k_): v_ for k_, v_ in kw.items()}
    if api in ("grad", "grad_v2"):
        kw = {GRAD_RENAME.get(k_, k_): v_ for k_, v_ in kw.items()}
        if is_tnd:
            st = (dims["sq"], n1, 8)
        else:
            st = (dims.get("b", B), n1, dims.get("sq", S), 8)
        kw["softmax_max"] = torch.full(st, 30.0) if softmax_max is KEEP else softmax_max
        kw["softmax_sum"] = torch.full(st, 3.0) if softmax_sum is KEEP else softmax_sum
        kw["attention_in"] = (
            rnd(*os_, dtype=dtype) if attention_in is KEEP else attention_in
        )
        dyt = rnd(*os_, dtype=dtype) if dy is KEEP else dy
        fn = (fascore.npu_fusion_attention_grad if api == "grad"
              else fascore.npu_fusion_attention_grad_v2)
        return fn, (q, k, v, dyt, hn, lay), kw
    fn = fascore.npu_fusion_attention if api == "v1" else fascore.npu_fusion_attention_v2
    return fn, (q, k, v, hn, lay), kw


def names_for(params, api):
    out = set(params)
    for p in params:
        if api in ("v1", "grad") and p in V1_RENAME:
            out.add(V1_RENAME[p])
        if api in ("grad", "grad_v2") and p in GRAD_RENAME:
            out.add(GRAD_RENAME[p])
    return out


def expect_error(api, spec, params, status=INVALID, value=None):
    fn, args, kw = build(api, **spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FlashAttentionError) as ei:
            fn(*args, **kw)
    err = ei.value
    assert isinstance(err, ValueError)
    assert type(err.status) is int
    assert err.status == status, f"status {err.status} != {status}; message: {err}"
    msg = str(err)
    names = names_for(params, api)
    assert any(n in msg for n in names), f"none of {sorted(names)} named in message: {msg!r}"
    if value is not None:
        assert str(value) in msg, f"value {value!r} not in message: {msg!r}"
    return err


def expect_ok(api, spec, rope=False):
    fn, args, kw = build(api, **spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fn(*args, **kw)
    q, k, v = args[0], args[1], args[2]
    if api in ("v1", "v2"):
        assert isinstance(res, tuple) and len(res) == 7
        out, smax, ssum, sout = res[:4]
        assert out.dtype == q.dtype
        assert out.shape[:-1] == q.shape[:-1]
        assert smax.dtype == torch.float32 and ssum.dtype == torch.float32
        assert smax.shape == ssum.shape and smax.shape[-1] == 8
        assert tuple(sout.shape) == (0,)
        assert torch.isfinite(out.float()).all()
    else:
        assert isinstance(res, tuple) and len(res) == (7 if api == "grad_v2" else 5)  # grad_v2: torch_npu's 7-tuple
        dq, dk, dv = res[:3]
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dq.dtype == q.dtype
        assert torch.isfinite(dq.float()).all() and torch.isfinite(dv.float()).all()
    return res


@dataclass
class Case:
    id: str
    make: Callable[[], dict]
    params: tuple
    apis: tuple
    status: int = INVALID
    value: object = None


NEG: list[Case] = []
POS: list[Case] = []


def neg(id, params, make, apis=ALL, status=INVALID, value=None):
    if isinstance(params, str):
        params = (params,)
    NEG.append(Case(id, make, tuple(params), apis, status, value))


def pos(id, make, apis=ALL):
    POS.append(Case(id, make, (), apis))


# --------------------------------------------------------------------------------------------
# SPEC 2: layouts and shapes
# --------------------------------------------------------------------------------------------
for _lay in ["XYZ", "BHSD", "", "BSNDX", "TH", "BS", "NTD", "BSN D", "BSH "]:
    neg(f"layout-unknown-{_lay!r}", "input_layout",
        lambda _lay=_lay: dict(layout="BSND", input_layout=_lay), apis=ALL)
neg("layout-unknown-value-in-message", "input_layout",
    lambda: dict(input_layout="QQQ"), value="QQQ")

for _lay in ["bsnd", "Bsnd", "bsh", "Bsh", "sbh", "sBh", "bnsd", "BnSd", "tnd", "Tnd"]:
    pos(f"layout-case-insensitive-{_lay}", lambda _lay=_lay: dict(layout=_lay))
for _lay in ["BSH", "SBH", "BSND", "BNSD", "TND"]:
    pos(f"layout-{_lay}", lambda _lay=_lay: dict(layout=_lay))
    pos(f"layout-{_lay}-sq-ne-skv", lambda _lay=_lay: dict(layout=_lay, sq=16, skv=24)
        if _lay != "TND" else dict(layout=_lay))
    pos(f"layout-{_lay}-mqa", lambda _lay=_lay: dict(layout=_lay, n2=1))
    pos(f"layout-{_lay}-dv-lt-d", lambda _lay=_lay: dict(layout=_lay, d=8, dv=4))

# wrong ranks
neg("rank-BSH-query-4d", "query", lambda: dict(layout="BSH", query=rnd(B, S, N1, D)), STRUCT)
neg("rank-BSH-query-2d", "query", lambda: dict(layout="BSH", query=rnd(S, N1 * D)), STRUCT)
neg("rank-SBH-key-2d", "key", lambda: dict(layout="SBH", key=rnd(S, N2 * D)), STRUCT)
neg("rank-BSH-value-4d", "value", lambda: dict(layout="BSH", value=rnd(B, S, N2, D)), STRUCT)
neg("rank-BSND-query-3d", "query", lambda: dict(query=rnd(B, S, N1 * D)), STRUCT)
neg("rank-BSND-key-3d", "key", lambda: dict(key=rnd(B, S, N2 * D)), STRUCT)
neg("rank-BSND-value-3d", "value", lambda: dict(value=rnd(B, S, N2 * D)), STRUCT)
neg("rank-BNSD-value-5d", "value",
    lambda: dict(layout="BNSD", value=rnd(B, N2, S, D, 1)), STRUCT)
neg("rank-BNSD-query-5d", "query",
    lambda: dict(layout="BNSD", query=rnd(1, B, N1, S, D)), STRUCT)
neg("rank-TND-query-4d", "query", lambda: dict(layout="TND", query=rnd(1, 16, N1, D)), STRUCT)
neg("rank-TND-key-2d", "key", lambda: dict(layout="TND", key=rnd(20, N2 * D)), STRUCT)
neg("rank-TND-value-4d", "value", lambda: dict(layout="TND", value=rnd(1, 20, N2, D)), STRUCT)

# BSH/SBH hidden-size arithmetic
neg("BSH-H-not-multiple-of-head_num", ("head_num", "query"),
    lambda: dict(layout="BSH", query=rnd(B, S, 30)), STRUCT)
neg("SBH-H-not-multiple-of-head_num", ("head_num", "query"),
    lambda: dict(layout="SBH", query=rnd(S, B, 30)), STRUCT)
neg("BSH-key-H-not-multiple-of-D", "key",
    lambda: dict(layout="BSH", key=rnd(B, S, 20), value=rnd(B, S, 20)), STRUCT)
neg("SBH-key-H-not-multiple-of-D", "key",
    lambda: dict(layout="SBH", key=rnd(S, B, 12), value=rnd(S, B, 12)), STRUCT)
neg("BSH-value-H-not-multiple-of-N2", "value",
    lambda: dict(layout="BSH", value=rnd(B, S, 15)), STRUCT)
neg("BSH-N1-not-multiple-of-N2", ("key", "head_num", "query"),
    lambda: dict(layout="BSH", key=rnd(B, S, 24), value=rnd(B, S, 24)), STRUCT)
neg("SBH-N2-greater-than-N1", ("key", "head_num", "query"),
    lambda: dict(layout="SBH", key=rnd(S, B, 64), value=rnd(S, B, 64)), STRUCT)
for _lay in ["BSND", "BNSD", "TND"]:
    neg(f"{_lay}-N1-not-multiple-of-N2", ("key", "head_num", "query"),
        lambda _lay=_lay: dict(layout=_lay, n1=4, n2=3), STRUCT)
    neg(f"{_lay}-N2-greater-than-N1", ("key", "head_num", "query"),
        lambda _lay=_lay: dict(layout=_lay, n1=2, n2=4), STRUCT)

# head_num vs the N axis, head_num range
neg("BSND-head_num-ne-N-axis", ("head_num", "query"), lambda: dict(head_num=2), STRUCT)
neg("BSND-head_num-ne-N-axis-larger", ("head_num", "query"), lambda: dict(head_num=8), STRUCT)
neg("BNSD-head_num-ne-N-axis", ("head_num", "query"),
    lambda: dict(layout="BNSD", head_num=8), STRUCT)
neg("TND-head_num-ne-N-axis", ("head_num", "query"),
    lambda: dict(layout="TND", head_num=2), STRUCT)
neg("BSH-head_num-zero", "head_num", lambda: dict(layout="BSH", head_num=0), STRUCT)
neg("BSH-head_num-negative", "head_num", lambda: dict(layout="BSH", head_num=-4), STRUCT)
neg("BSND-head_num-zero", ("head_num", "query"), lambda: dict(head_num=0), STRUCT)

# head dims
neg("BSND-qD-ne-kD", ("key", "query"),
    lambda: dict(key=rnd(B, S, N2, 6), value=rnd(B, S, N2, 6)), STRUCT)
neg("BNSD-qD-ne-kD", ("key", "query"),
    lambda: dict(layout="BNSD", key=rnd(B, N2, S, 10), value=rnd(B, N2, S, 8)), STRUCT)
neg("TND-qD-ne-kD", ("key", "query"),
    lambda: dict(layout="TND", key=rnd(20, N2, 6), value=rnd(20, N2, 6)), STRUCT)
neg("BSND-vD-gt-kD", "value", lambda: dict(value=rnd(B, S, N2, 16)), STRUCT)
neg("BNSD-vD-gt-kD", "value", lambda: dict(layout="BNSD", value=rnd(B, N2, S, 9)), STRUCT)
neg("BSH-vD-gt-kD", "value", lambda: dict(layout="BSH", value=rnd(B, S, N2 * 16)), STRUCT)
neg("TND-vD-gt-kD", "value", lambda: dict(layout="TND", value=rnd(20, N2, 12)), STRUCT)

# key / value agree in every dim but the last
neg("BSND-value-S-ne-key-S", ("value", "key"), lambda: dict(value=rnd(B, 12, N2, D)), STRUCT)
neg("BSND-value-N-ne-key-N", ("value", "key"), lambda: dict(value=rnd(B, S, 1, D)), STRUCT)
neg("BNSD-value-B-ne-key-B", ("value", "key", "query"),
    lambda: dict(layout="BNSD", value=rnd(1, N2, S, D)), STRUCT)
neg("BSH-value-S-ne-key-S", ("value", "key"),
    lambda: dict(layout="BSH", value=rnd(B, 12, N2 * D)), STRUCT)
neg("SBH-value-S-ne-key-S", ("value", "key"),
    lambda: dict(layout="SBH", value=rnd(12, B, N2 * D)), STRUCT)
neg("TND-value-T-ne-key-T", ("value", "key"),
    lambda: dict(layout="TND", value=rnd(21, N2, D)), STRUCT)
neg("TND-value-N-ne-key-N", ("value", "key"),
    lambda: dict(layout="TND", value=rnd(20, 1, D)), STRUCT)

# batch sizes agree
for _lay, _ks in [("BSND", lambda: ((3, S, N2, D),) * 2), ("BNSD", lambda: ((3, N2, S, D),) * 2),
                  ("BSH", lambda: ((3, S, N2 * D),) * 2), ("SBH", lambda: ((S, 3, N2 * D),) * 2)]:
    neg(f"{_lay}-batch-mismatch", ("key", "query", "value"),
        lambda _lay=_lay, _ks=_ks: dict(layout=_lay, key=rnd(*_ks()[0]), value=rnd(*_ks()[1])),
        STRUCT)

# --------------------------------------------------------------------------------------------
# SPEC 8 dtypes (and 3: pse dtype)
# --------------------------------------------------------------------------------------------
_bad_dtypes = [torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool, torch.complex64]
if hasattr(torch, "float8_e4m3fn"):
    _bad_dtypes.append(torch.float8_e4m3fn)
for _dt in _bad_dtypes:
    neg(f"dtype-{str(_dt).split('.')[-1]}-not-supported", ("query", "dtype"),
        lambda _dt=_dt: dict(query=torch.zeros(B, S, N1, D, dtype=_dt),
                             key=torch.zeros(B, S, N2, D, dtype=_dt),
                             value=torch.zeros(B, S, N2, D, dtype=_dt)), STRUCT)
for _dt in [torch.float16, torch.bfloat16, torch.float32, torch.float64]:
    pos(f"dtype-{str(_dt).split('.')[-1]}-accepted", lambda _dt=_dt: dict(dtype=_dt))
    pos(f"dtype-{str(_dt).split('.')[-1]}-with-pse",
        lambda _dt=_dt: dict(dtype=_dt, pse=rnd(B, N1, S, S, dtype=_dt)))

neg("mixed-dtype-key-f16", "key", lambda: dict(key=rnd(B, S, N2, D, dtype=torch.float16)), STRUCT)
neg("mixed-dtype-key-f64", "key", lambda: dict(key=rnd(B, S, N2, D, dtype=torch.float64)), STRUCT)
neg("mixed-dtype-value-bf16", "value",
    lambda: dict(value=rnd(B, S, N2, D, dtype=torch.bfloat16)), STRUCT)
neg("mixed-dtype-query-f16", ("query", "key"),
    lambda: dict(query=rnd(B, S, N1, D, dtype=torch.float16)), STRUCT)
neg("mixed-dtype-pse-type1-f16", "pse", lambda: dict(pse=rnd(B, N1, S, S, dtype=torch.float16)))
neg("mixed-dtype-pse-type1-f64", "pse", lambda: dict(pse=rnd(B, N1, S, S, dtype=torch.float64)))
neg("mixed-dtype-pse-type1-bf16-vs-f16", "pse",
    lambda: dict(dtype=torch.float16, pse=rnd(B, N1, S, S, dtype=torch.bfloat16)))
neg("mixed-dtype-pse-type0-f64", "pse",
    lambda: dict(pse_type=0, pse=rnd(B, N1, S, S, dtype=torch.float64)), V2ONLY)
neg("mixed-dtype-pse-type0-f32-vs-f16", "pse",
    lambda: dict(dtype=torch.float16, pse_type=0, pse=rnd(1, N1, 1, S)), V2ONLY)

# --------------------------------------------------------------------------------------------
# SPEC 2: softmax_layout
# --------------------------------------------------------------------------------------------
for _sl in ["BSH", "BSND", "XYZ", "T", "TNDX", "BNSD"]:
    neg(f"softmax_layout-{_sl}", "softmax_layout", lambda _sl=_sl: dict(softmax_layout=_sl))
for _lay in ["BSND", "BSH", "SBH", "BNSD"]:
    neg(f"softmax_layout-TND-with-{_lay}", "softmax_layout",
        lambda _lay=_lay: dict(layout=_lay, softmax_layout="TND"))
pos("softmax_layout-TND-with-TND", lambda: dict(layout="TND", softmax_layout="TND"))
pos("softmax_layout-empty-with-TND", lambda: dict(layout="TND", softmax_layout=""))

# --------------------------------------------------------------------------------------------
# SPEC 2: TND actual_seq_qlen / actual_seq_kvlen
# --------------------------------------------------------------------------------------------
def tnd(q, kv, t1=None, t2=None, **kw):
    t1 = (max(q) if q else 1) if t1 is None else t1
    t2 = (max(kv) if kv else 1) if t2 is None else t2
    return dict(layout="TND", sq=t1, skv=t2, actual_seq_qlen=q, actual_seq_kvlen=kv, **kw)


neg("TND-seqlen-lengths-differ", ("actual_seq_qlen", "actual_seq_kvlen"),
    lambda: tnd([6, 16], [8, 12, 20]))
neg("TND-seqlen-lengths-differ-2", ("actual_seq_qlen", "actual_seq_kvlen"),
    lambda: tnd([6, 10, 16], [8, 20]))
neg("TND-seqlen-q-decreasing", "actual_seq_qlen", lambda: tnd([6, 4, 16], [8, 12, 20]))
neg("TND-seqlen-kv-decreasing", "actual_seq_kvlen", lambda: tnd([6, 10, 16], [8, 4, 20]))
neg("TND-seqlen-q-decrease-to-nonzero-at-end", "actual_seq_qlen",
    lambda: tnd([6, 16, 3], [8, 12, 20]))
neg("TND-seqlen-q-zero-then-nonzero", "actual_seq_qlen",
    lambda: tnd([6, 0, 16], [8, 12, 20]))
neg("TND-seqlen-q-negative-first", "actual_seq_qlen", lambda: tnd([-1, 16], [8, 20]))
neg("TND-seqlen-kv-negative-first", "actual_seq_kvlen", lambda: tnd([6, 16], [-2, 20]))
neg("TND-seqlen-empty-lists", ("actual_seq_qlen", "actual_seq_kvlen"),
    lambda: tnd([], [], t1=16, t2=20))
neg("TND-batch-2049", ("actual_seq_qlen", "actual_seq_kvlen", "query"),
    lambda: tnd(list(range(1, 2050)), list(range(1, 2050))), value=None)
neg("TND-T1-less-than-sum", ("actual_seq_qlen", "query"),
    lambda: tnd([6, 17], [8, 20], t1=16, t2=20))
neg("TND-T2-less-than-sum", ("actual_seq_kvlen", "key"),
    lambda: tnd([6, 16], [8, 21], t1=16, t2=20))
neg("TND-qlen-missing", "actual_seq_qlen", lambda: dict(layout="TND", actual_seq_qlen=None))
neg("TND-kvlen-missing", "actual_seq_kvlen", lambda: dict(layout="TND", actual_seq_kvlen=None))
neg("TND-both-missing", ("actual_seq_qlen", "actual_seq_kvlen"),
    lambda: dict(layout="TND", actual_seq_qlen=None, actual_seq_kvlen=None))
for _lay in ["BSND", "BSH", "SBH", "BNSD"]:
    neg(f"seqlen-given-without-TND-{_lay}", ("actual_seq_qlen", "actual_seq_kvlen"),
        lambda _lay=_lay: dict(layout=_lay, actual_seq_qlen=[16, 32], actual_seq_kvlen=[16, 32]))
neg("seqlen-kv-only-without-TND", "actual_seq_kvlen", lambda: dict(actual_seq_kvlen=[16, 32]))
neg("seqlen-q-only-without-TND", "actual_seq_qlen", lambda: dict(actual_seq_qlen=[16, 32]))

pos("TND-trailing-zero-padding", lambda: tnd([6, 16, 0, 0], [8, 20, 0, 0]))
pos("TND-repeated-value-empty-batch", lambda: tnd([6, 6, 16], [8, 8, 20]))
pos("TND-T1-T2-larger-than-sum", lambda: tnd([6, 16], [8, 20], t1=19, t2=23))
pos("TND-seqlen-as-tensors",
    lambda: tnd(torch.tensor([6, 16]), torch.tensor([8, 20]), t1=16, t2=20))
pos("TND-seqlen-as-tuples", lambda: tnd((6, 16), (8, 20)))
pos("TND-batch-2048", lambda: tnd(list(range(1, 2049)), list(range(1, 2049)), n1=1, n2=1),
    apis=("v2",))

# --------------------------------------------------------------------------------------------
# SPEC 3: pse_type, pse tensors, ALiBi slopes, sink, rope
# --------------------------------------------------------------------------------------------
for _pt in [-1, 4, 5, 7]:
    neg(f"pse_type-{_pt}-without-pse", "pse_type", lambda _pt=_pt: dict(pse_type=_pt), V2ONLY,
        value=_pt)
    neg(f"pse_type-{_pt}-with-pse", "pse_type",
        lambda _pt=_pt: dict(pse_type=_pt, pse=rnd(B, N1, S, S)), V2ONLY)
for _pt in [0, 1, 2, 3]:
    pos(f"pse_type-{_pt}-without-tensor-ok" if _pt < 2 else f"pse_type-{_pt}-with-slopes",
        lambda _pt=_pt: dict(pse_type=_pt, pse=None if _pt < 2 else torch.rand(B, N1)),
        apis=V2ONLY)

# pse shapes (Sq=16, Skv=24 so that a transposed pse is detectable)
_SQ, _SKV = 16, 24
_pse_ok = {
    "B-N1-Sq-Skv": (B, N1, _SQ, _SKV),
    "1-N1-Sq-Skv": (1, N1, _SQ, _SKV),
    "B-N1-1-Skv": (B, N1, 1, _SKV),
    "1-N1-1-Skv": (1, N1, 1, _SKV),
}
_pse_bad = {
    "B-N2-Sq-Skv": (B, N2, _SQ, _SKV),
    "B-1-Sq-Skv": (B, 1, _SQ, _SKV),
    "1-1-Sq-Skv": (1, 1, _SQ, _SKV),
    "B-N1-Sq-Skv+1": (B, N1, _SQ, _SKV + 1),
    "B-N1-Sq+1-Skv": (B, N1, _SQ + 1, _SKV),
    "B-N1-Skv-Sq": (B, N1, _SKV, _SQ),
    "B-N1-2-Skv": (B, N1, 2, _SKV),
    "B-N1-Sq-1": (B, N1, _SQ, 1),
    "3-N1-Sq-Skv": (3, N1, _SQ, _SKV),
    "N1-Sq-Skv-3d": (N1, _SQ, _SKV),
    "Sq-Skv-2d": (_SQ, _SKV),
    "5d": (1, B, N1, _SQ, _SKV),
}
for _name, _shp in _pse_ok.items():
    pos(f"pse-type1-shape-{_name}", lambda _shp=_shp: dict(sq=_SQ, skv=_SKV, pse=rnd(*_shp)))
    pos(f"pse-type0-shape-{_name}",
        lambda _shp=_shp: dict(sq=_SQ, skv=_SKV, pse=rnd(*_shp), pse_type=0), apis=V2ONLY)
for _name, _shp in _pse_bad.items():
    neg(f"pse-type1-shape-{_name}", "pse",
        lambda _shp=_shp: dict(sq=_SQ, skv=_SKV, pse=rnd(*_shp)))
    neg(f"pse-type0-shape-{_name}", "pse",
        lambda _shp=_shp: dict(sq=_SQ, skv=_SKV, pse=rnd(*_shp), pse_type=0), V2ONLY)
pos("pse-type1-BSH-layout", lambda: dict(layout="BSH", sq=_SQ, skv=_SKV, pse=rnd(B, N1, _SQ, _SKV)))

# ALiBi-compressed pse: [B or 1, N1, 1024, Skv], Sq > 1024, Sq == Skv, causal pattern
_CS = 1040
_CB, _CN1, _CN2 = 1, 2, 1


def cpse_spec(sq=_CS, skv=_CS, rows=1024, **kw):
    return dict(b=_CB, n1=_CN1, n2=_CN2, sq=sq, skv=skv,
                pse=rnd(_CB, _CN1, rows, skv), **kw)


pos("cpse-mode2", lambda: cpse_spec(sparse_mode=2, atten_mask=cmask()), apis=("v2", "grad_v2"))
pos("cpse-mode3", lambda: cpse_spec(sparse_mode=3, atten_mask=cmask()), apis=("v2",))
pos("cpse-mode3-type0", lambda: cpse_spec(sparse_mode=3, atten_mask=cmask(), pse_type=0),
    apis=("v2",))
pos("cpse-mode0-causal-full-mask",
    lambda: cpse_spec(sparse_mode=0, atten_mask=causal_full(_CS, _CS), pre_tokens=_CS,
                      next_tokens=0), apis=("v2",))
pos("cpse-mode0-causal-full-mask-default-pre",
    lambda: cpse_spec(sparse_mode=0, atten_mask=causal_full(_CS, _CS), next_tokens=0),
    apis=("v2",))
pos("cpse-Sq-1024-is-ordinary-full-pse", lambda: cpse_spec(sq=1024, skv=1024), apis=("v2",))
neg("cpse-without-mask", "pse", lambda: cpse_spec())
neg("cpse-mode2-without-mask", "pse", lambda: cpse_spec(sparse_mode=2))
neg("cpse-mode3-without-mask", "pse", lambda: cpse_spec(sparse_mode=3))
neg("cpse-mode1-full-mask", "pse",
    lambda: cpse_spec(sparse_mode=1, atten_mask=causal_full(_CS, _CS)))
neg("cpse-mode0-mask-next-1", "pse",
    lambda: cpse_spec(atten_mask=causal_full(_CS, _CS), pre_tokens=_CS, next_tokens=1))
neg("cpse-mode0-mask-pre-lt-Sq", "pse",
    lambda: cpse_spec(atten_mask=causal_full(_CS, _CS), pre_tokens=_CS - 1, next_tokens=0))
neg("cpse-mode4", "pse",
    lambda: cpse_spec(sparse_mode=4, atten_mask=cmask(), pre_tokens=_CS, next_tokens=0))
neg("cpse-Sq-ne-Skv", "pse", lambda: cpse_spec(skv=_CS + 8, sparse_mode=3, atten_mask=cmask()))
neg("cpse-rows-1024-but-Sq-16", "pse", lambda: dict(pse=rnd(B, N1, 1024, S)))
neg("cpse-rows-1023", "pse", lambda: cpse_spec(rows=1023, sparse_mode=3, atten_mask=cmask()))

# TND external pse: only compressed [B or 1, N1, 1024, maxSkv], Sq_b == Skv_b, causal mode
def tnd_pse(q=(6, 16), kv=(6, 16), maxskv=10, rows=1024, n1=2, **kw):
    return tnd(list(q), list(kv), n1=n1, n2=1, pse=rnd(1, n1, rows, maxskv), **kw)


pos("TND-cpse-mode3", lambda: tnd_pse(sparse_mode=3, atten_mask=cmask()))
pos("TND-cpse-mode2", lambda: tnd_pse(sparse_mode=2, atten_mask=cmask()), apis=("v2",))
neg("TND-cpse-without-mask", "pse", lambda: tnd_pse())
neg("TND-cpse-mode1-full-mask", "pse", lambda: tnd_pse(sparse_mode=1, atten_mask=fmask(10, 10)))
neg("TND-cpse-Sq_b-ne-Skv_b", "pse",
    lambda: tnd_pse(kv=(8, 16), maxskv=8, sparse_mode=3, atten_mask=cmask()))
neg("TND-cpse-wrong-maxSkv", "pse", lambda: tnd_pse(maxskv=11, sparse_mode=3, atten_mask=cmask()))
neg("TND-full-pse-rejected", "pse",
    lambda: tnd([6, 16], [6, 16], n1=2, n2=1, pse=rnd(2, 2, 10, 10), sparse_mode=3,
                atten_mask=cmask()))
neg("TND-full-pse-TT-rejected", "pse",
    lambda: tnd([6, 16], [6, 16], n1=2, n2=1, pse=rnd(1, 2, 16, 16), sparse_mode=3,
                atten_mask=cmask()))

# ALiBi slopes (pse_type 2 / 3)
for _pt in [2, 3]:
    neg(f"alibi{_pt}-slopes-missing", ("pse", "pse_type"), lambda _pt=_pt: dict(pse_type=_pt),
        V2ONLY)
    neg(f"alibi{_pt}-slopes-f16", "pse",
        lambda _pt=_pt: dict(pse_type=_pt, pse=torch.rand(B, N1).half()), V2ONLY)
    neg(f"alibi{_pt}-slopes-f64", "pse",
        lambda _pt=_pt: dict(pse_type=_pt, pse=torch.rand(B, N1).double()), V2ONLY)
    neg(f"alibi{_pt}-slopes-bf16-with-bf16-query", "pse",
        lambda _pt=_pt: dict(dtype=torch.bfloat16, pse_type=_pt,
                             pse=torch.rand(B, N1).bfloat16()), V2ONLY)
    for _name, _shp in {"N1+1": (N1 + 1,), "B-N2": (B, N2), "B-N1-1": (B, N1, 1),
                        "3-N1": (3, N1), "N1-B": (N1, B), "full-pse-shape": (B, N1, S, S),
                        "scalar": ()}.items():
        neg(f"alibi{_pt}-slopes-shape-{_name}", "pse",
            lambda _pt=_pt, _shp=_shp: dict(pse_type=_pt, pse=torch.rand(_shp)), V2ONLY)
    neg(f"alibi{_pt}-Sq-ne-Skv", ("pse_type", "pse", "query", "key"),
        lambda _pt=_pt: dict(pse_type=_pt, sq=16, skv=24, pse=torch.rand(B, N1)), V2ONLY)
    neg(f"alibi{_pt}-TND-Sq_b-ne-Skv_b", ("pse_type", "pse", "actual_seq_qlen",
                                          "actual_seq_kvlen", "query", "key"),
        lambda _pt=_pt: tnd([6, 16], [8, 16], pse_type=_pt, pse=torch.rand(N1)), V2ONLY)
    pos(f"alibi{_pt}-slopes-B-N1", lambda _pt=_pt: dict(pse_type=_pt, pse=torch.rand(B, N1)),
        apis=V2ONLY)
    pos(f"alibi{_pt}-slopes-N1", lambda _pt=_pt: dict(pse_type=_pt, pse=torch.rand(N1)),
        apis=V2ONLY)
    pos(f"alibi{_pt}-f16-query-f32-slopes",
        lambda _pt=_pt: dict(dtype=torch.float16, pse_type=_pt, pse=torch.rand(B, N1)),
        apis=V2ONLY)
    pos(f"alibi{_pt}-TND-equal-lengths",
        lambda _pt=_pt: tnd([6, 16], [6, 16], pse_type=_pt, pse=torch.rand(N1)), apis=V2ONLY)
    pos(f"alibi{_pt}-start-idx",
        lambda _pt=_pt: dict(pse_type=_pt, pse=torch.rand(N1), q_start_idx=[3],
                             kv_start_idx=[1]), apis=V2ONLY)
    # mode 8 (SPEC 3): actual_seq_qlen[0] - actual_seq_kvlen[0] + qs - ks == 0
    neg(f"alibi{_pt}-mode8-start-idx-differ", ("sparse_mode", "actual_seq_qlen", "actual_seq_kvlen",
                                               "q_start_idx", "kv_start_idx"),
        lambda _pt=_pt: tnd([6, 16], [6, 16], pse_type=_pt, pse=torch.rand(N1), sparse_mode=8,
                            atten_mask=cmask(), q_start_idx=[3], kv_start_idx=[1]), V2ONLY)
    neg(f"alibi{_pt}-mode8-first-lengths-differ", ("sparse_mode", "actual_seq_qlen", "actual_seq_kvlen"),
        lambda _pt=_pt: tnd([0, 6, 16], [2, 8, 18], pse_type=_pt, pse=torch.rand(N1), sparse_mode=8,
                            atten_mask=cmask()), V2ONLY)
    pos(f"alibi{_pt}-mode8-balanced-offsets",
        lambda _pt=_pt: tnd([0, 6, 16], [2, 8, 18], pse_type=_pt, pse=torch.rand(N1), sparse_mode=8,
                            atten_mask=cmask(), q_start_idx=[2], kv_start_idx=[0]), apis=V2ONLY)
    pos(f"alibi{_pt}-mode8-equal-start-idx",
        lambda _pt=_pt: tnd([6, 16], [6, 16], pse_type=_pt, pse=torch.rand(N1), sparse_mode=8,
                            atten_mask=cmask(), q_start_idx=[3], kv_start_idx=[3]), apis=V2ONLY)

# sink: float32 [N1]
for _name, _mk in {"f16": lambda: torch.zeros(N1, dtype=torch.float16),
                   "f64": lambda: torch.zeros(N1, dtype=torch.float64),
                   "bf16": lambda: torch.zeros(N1, dtype=torch.bfloat16),
                   "int32": lambda: torch.zeros(N1, dtype=torch.int32)}.items():
    neg(f"sink-dtype-{_name}", "sink", lambda _mk=_mk: dict(sink=_mk()))
neg("sink-bf16-with-bf16-query", "sink",
    lambda: dict(dtype=torch.bfloat16, sink=torch.zeros(N1, dtype=torch.bfloat16)))
neg("sink-f64-with-f64-query", "sink",
    lambda: dict(dtype=torch.float64, sink=torch.zeros(N1, dtype=torch.float64)))
for _name, _shp in {"N2": (N2,), "N1+1": (N1 + 1,), "1-N1": (1, N1), "B-N1": (B, N1),
                    "scalar": (), "1": (1,)}.items():
    neg(f"sink-shape-{_name}", "sink", lambda _shp=_shp: dict(sink=torch.zeros(_shp)))
pos("sink-f32-N1", lambda: dict(sink=torch.randn(N1)))
pos("sink-f32-N1-with-f16-query", lambda: dict(dtype=torch.float16, sink=torch.randn(N1)))
pos("sink-f32-N1-with-f64-query", lambda: dict(dtype=torch.float64, sink=torch.randn(N1)))
pos("sink-TND", lambda: tnd([6, 16], [8, 20], sink=torch.randn(N1)))

# rope (v2 only): both or neither, layout of query/key with own last dim Dr, query's dtype
DR = 4
neg("rope-query-only", ("query_rope", "key_rope"), lambda: dict(query_rope=rnd(B, S, N1, DR)),
    V2ONLY)
neg("rope-key-only", ("query_rope", "key_rope"), lambda: dict(key_rope=rnd(B, S, N2, DR)), V2ONLY)
for _name, _qr, _kr in [
    ("query_rope-N2-heads", (B, S, N2, DR), (B, S, N2, DR)),
    ("query_rope-S+1", (B, S + 1, N1, DR), (B, S, N2, DR)),
    ("query_rope-B+1", (B + 1, S, N1, DR), (B, S, N2, DR)),
    ("query_rope-rank3", (B, S, N1 * DR), (B, S, N2, DR)),
]:
    neg(f"rope-{_name}", "query_rope",
        lambda _qr=_qr, _kr=_kr: dict(query_rope=rnd(*_qr), key_rope=rnd(*_kr)), V2ONLY)
for _name, _qr, _kr in [
    ("key_rope-N1-heads", (B, S, N1, DR), (B, S, N1, DR)),
    ("key_rope-S+1", (B, S, N1, DR), (B, S + 1, N2, DR)),
    ("key_rope-rank5", (B, S, N1, DR), (B, S, N2, DR, 1)),
]:
    neg(f"rope-{_name}", "key_rope",
        lambda _qr=_qr, _kr=_kr: dict(query_rope=rnd(*_qr), key_rope=rnd(*_kr)), V2ONLY)
neg("rope-Dr-mismatch", ("query_rope", "key_rope"),
    lambda: dict(query_rope=rnd(B, S, N1, 4), key_rope=rnd(B, S, N2, 6)), V2ONLY)
neg("rope-query_rope-dtype", ("query_rope",),
    lambda: dict(query_rope=rnd(B, S, N1, DR, dtype=torch.float16),
                 key_rope=rnd(B, S, N2, DR)), V2ONLY)
neg("rope-key_rope-dtype", ("key_rope",),
    lambda: dict(query_rope=rnd(B, S, N1, DR),
                 key_rope=rnd(B, S, N2, DR, dtype=torch.float64)), V2ONLY)
neg("rope-BSH-hidden-not-multiple-of-N1", ("query_rope",),
    lambda: dict(layout="BSH", query_rope=rnd(B, S, N1 * DR + 1),
                 key_rope=rnd(B, S, N2 * DR)), V2ONLY)
POS_ROPE = []
for _lay, _qr, _kr in [("BSND", (B, S, N1, DR), (B, S, N2, DR)),
                       ("BNSD", (B, N1, S, DR), (B, N2, S, DR)),
                       ("BSH", (B, S, N1 * DR), (B, S, N2 * DR)),
                       ("SBH", (S, B, N1 * DR), (S, B, N2 * DR)),
                       ("TND", (16, N1, DR), (20, N2, DR))]:
    POS_ROPE.append(pytest.param(
        lambda _lay=_lay, _qr=_qr, _kr=_kr: dict(layout=_lay, query_rope=rnd(*_qr),
                                                 key_rope=rnd(*_kr)),
        id=f"rope-{_lay}"))

# --------------------------------------------------------------------------------------------
# SPEC 4: masks and sparse modes
# --------------------------------------------------------------------------------------------
for _name, _dt in {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32,
                   "int8": torch.int8, "int64": torch.int64}.items():
    neg(f"mask-dtype-{_name}", "atten_mask",
        lambda _dt=_dt: dict(atten_mask=torch.zeros(S, S, dtype=_dt)))
    neg(f"mask-dtype-{_name}-compressed", "atten_mask",
        lambda _dt=_dt: dict(sparse_mode=2, atten_mask=cmask().to(_dt)))

_full_ok = {"Sq-Skv": (_SQ, _SKV), "1-1-Sq-Skv": (1, 1, _SQ, _SKV),
            "B-1-Sq-Skv": (B, 1, _SQ, _SKV), "B-N1-Sq-Skv": (B, N1, _SQ, _SKV)}
_full_bad = {"Sq-Skv+1": (_SQ, _SKV + 1), "Skv-Sq": (_SKV, _SQ), "B-N2-Sq-Skv": (B, N2, _SQ, _SKV),
             "1-N1-Sq-Skv": (1, N1, _SQ, _SKV), "3-1-Sq-Skv": (3, 1, _SQ, _SKV),
             "Sq": (_SQ,), "1-Sq-Skv": (1, _SQ, _SKV), "5d": (1, 1, 1, _SQ, _SKV),
             "B-1-1-Skv": (B, 1, 1, _SKV), "compressed-2048": (2048, 2048)}
for _mode in [0, 1]:
    for _name, _shp in _full_ok.items():
        for _dt in [torch.bool, torch.uint8]:
            pos(f"mask-mode{_mode}-{_name}-{str(_dt).split('.')[-1]}",
                lambda _mode=_mode, _shp=_shp, _dt=_dt: dict(
                    sq=_SQ, skv=_SKV, sparse_mode=_mode, atten_mask=fmask(*_shp, dtype=_dt)),
                apis=("v2", "grad"))
    for _name, _shp in _full_bad.items():
        neg(f"mask-mode{_mode}-shape-{_name}", "atten_mask",
            lambda _mode=_mode, _shp=_shp: dict(sq=_SQ, skv=_SKV, sparse_mode=_mode,
                                                atten_mask=fmask(*_shp)))

for _mode in [2, 3, 4]:
    pos(f"mask-mode{_mode}-compressed", lambda _mode=_mode: dict(
        sq=_SQ, skv=_SKV, sparse_mode=_mode, atten_mask=cmask()), apis=("v2", "grad"))
    pos(f"mask-mode{_mode}-compressed-lead-dims", lambda _mode=_mode: dict(
        sparse_mode=_mode, atten_mask=cmask(lead=True)), apis=("v2",))
    pos(f"mask-mode{_mode}-compressed-uint8", lambda _mode=_mode: dict(
        sparse_mode=_mode, atten_mask=cmask(torch.uint8)), apis=("v2",))
    for _name, _mk in {
        "full-Sq-Skv": lambda: fmask(_SQ, _SKV),
        "full-causal-Sq-Skv": lambda: causal_full(_SQ, _SKV),
        "3072x2048": lambda: pmask(),
        "B-1-2048-2048": lambda: cmask().expand(B, 1, 2048, 2048).clone(),
        "2048x2047": lambda: cmask()[:, :2047].clone(),
        "1x2048x2048": lambda: cmask().view(1, 2048, 2048),
        "tril": lambda: torch.tril(torch.ones(2048, 2048, dtype=torch.bool), diagonal=-1),
        "triu-diag0": lambda: torch.triu(torch.ones(2048, 2048, dtype=torch.bool)),
        "triu-diag2": lambda: torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=2),
        "one-bit-flipped": lambda: _flip(cmask(), 5, 1000),
        "one-bit-flipped-lower": lambda: _flip(cmask(), 2000, 3),
        "zeros": lambda: fmask(2048, 2048),
        "ones": lambda: torch.ones(2048, 2048, dtype=torch.bool),
        "transposed": lambda: cmask().t().contiguous(),
    }.items():
        neg(f"mask-mode{_mode}-{_name}", "atten_mask",
            lambda _mode=_mode, _mk=_mk: dict(sq=_SQ, skv=_SKV, sparse_mode=_mode,
                                              atten_mask=_mk()))


def _flip(m, i, j):
    m = m.clone()
    m[i, j] = ~m[i, j]
    return m


# mode 5 (prefix with explicit mask): [B,1,Sq,Skv] or [B,N1,Sq,Skv]; any full* when B == 1
pos("mask-mode5-B-1-Sq-Skv", lambda: dict(sq=_SQ, skv=_SKV, sparse_mode=5, prefix=[3, 9],
                                          atten_mask=fmask(B, 1, _SQ, _SKV)))
pos("mask-mode5-B-N1-Sq-Skv", lambda: dict(sq=_SQ, skv=_SKV, sparse_mode=5, prefix=[3, 9],
                                           atten_mask=fmask(B, N1, _SQ, _SKV)))
for _name, _shp in {"Sq-Skv": (_SQ, _SKV), "1-1-Sq-Skv": (1, 1, _SQ, _SKV),
                    "B-1-Sq-Skv": (1, 1, _SQ, _SKV), "B-N1-Sq-Skv": (1, N1, _SQ, _SKV)}.items():
    pos(f"mask-mode5-batch1-{_name}",
        lambda _shp=_shp: dict(b=1, sq=_SQ, skv=_SKV, sparse_mode=5, prefix=[4],
                               atten_mask=fmask(*_shp)))
for _name, _shp in {"Sq-Skv": (_SQ, _SKV), "1-1-Sq-Skv": (1, 1, _SQ, _SKV),
                    "B-N2-Sq-Skv": (B, N2, _SQ, _SKV), "B-1-Skv-Sq": (B, 1, _SKV, _SQ),
                    "compressed-2048": (2048, 2048), "3072x2048": (3072, 2048)}.items():
    neg(f"mask-mode5-shape-{_name}", "atten_mask",
        lambda _shp=_shp: dict(sq=_SQ, skv=_SKV, sparse_mode=5, prefix=[3, 9],
                               atten_mask=fmask(*_shp)))
neg("mask-mode5-TND", "sparse_mode", lambda: tnd([6, 16], [8, 20], sparse_mode=5, prefix=[2, 2],
                                                  atten_mask=fmask(10, 12)))
neg("mask-mode5-TND-no-mask", "sparse_mode", lambda: tnd([6, 16], [8, 20], sparse_mode=5))

# mode 6: compressed [3072, 2048]
pos("mask-mode6-compressed", lambda: dict(sq=_SQ, skv=_SKV, sparse_mode=6, prefix=[8, 24],
                                          atten_mask=pmask()), apis=("v2", "grad"))
pos("mask-mode6-compressed-lead-dims", lambda: dict(sparse_mode=6, prefix=[0, 16],
                                                    atten_mask=pmask(lead=True)), apis=("v2",))
pos("mask-mode6-compressed-uint8", lambda: dict(sparse_mode=6, prefix=[0, 16],
                                                atten_mask=pmask(torch.uint8)), apis=("v2",))
for _name, _mk in {
    "compressed-2048": lambda: cmask(),
    "full-Sq-Skv": lambda: fmask(_SQ, _SKV),
    "bottom-left-ones": lambda: torch.cat([_triu2048(), torch.ones(1024, 2048, dtype=torch.bool)]),
    "bottom-zeros": lambda: torch.cat([_triu2048(), torch.zeros(1024, 2048, dtype=torch.bool)]),
    "bottom-swapped": lambda: torch.cat([_triu2048(), torch.cat(
        [torch.ones(1024, 1024, dtype=torch.bool), torch.zeros(1024, 1024, dtype=torch.bool)],
        1)]),
    "top-tril": lambda: torch.cat([torch.tril(torch.ones(2048, 2048, dtype=torch.bool), -1),
                                   pmask()[2048:]]),
    "one-bit-flipped": lambda: _flip(pmask(), 3000, 10),
}.items():
    neg(f"mask-mode6-{_name}", "atten_mask",
        lambda _mk=_mk: dict(sq=_SQ, skv=_SKV, sparse_mode=6, prefix=[8, 24], atten_mask=_mk()))

# TND masks: full [maxSq, maxSkv] or [T1, T2] (2-D only), compressed for 2,3,4,7,8
pos("TND-mask-mode0-maxSq-maxSkv", lambda: tnd([6, 16], [8, 20], atten_mask=fmask(10, 12)))
pos("TND-mask-mode0-T1-T2", lambda: tnd([6, 16], [8, 20], atten_mask=fmask(16, 20)))
pos("TND-mask-mode1-T1-T2", lambda: tnd([6, 16], [8, 20], sparse_mode=1,
                                        atten_mask=fmask(16, 20)), apis=("v2",))
for _mode in [2, 3, 4, 7, 8]:
    pos(f"TND-mask-mode{_mode}-compressed",
        lambda _mode=_mode: tnd([6, 16], [8, 20], sparse_mode=_mode, atten_mask=cmask()),
        apis=("v2", "grad_v2"))
    neg(f"TND-mask-mode{_mode}-full-rejected", "atten_mask",
        lambda _mode=_mode: tnd([6, 16], [8, 20], sparse_mode=_mode, atten_mask=fmask(10, 12)))
    neg(f"TND-mask-mode{_mode}-content-wrong", "atten_mask",
        lambda _mode=_mode: tnd([6, 16], [8, 20], sparse_mode=_mode,
                                atten_mask=_flip(cmask(), 100, 1800)))
pos("TND-mask-mode6-compressed",
    lambda: tnd([6, 16], [8, 20], sparse_mode=6, prefix=[2, 12], atten_mask=pmask()),
    apis=("v2",))
neg("TND-mask-mode0-4d", "atten_mask", lambda: tnd([6, 16], [8, 20], atten_mask=fmask(1, 1, 10, 12)))
neg("TND-mask-mode0-maxSq-maxSkv+1", "atten_mask",
    lambda: tnd([6, 16], [8, 20], atten_mask=fmask(10, 13)))
neg("TND-mask-mode0-T1-T2+1", "atten_mask", lambda: tnd([6, 16], [8, 20], atten_mask=fmask(16, 21)))

# sparse_mode range (validated with or without a mask)
for _m in [-1, 7, 8, 9, 100]:
    neg(f"sparse_mode-{_m}-no-mask", "sparse_mode", lambda _m=_m: dict(sparse_mode=_m), value=_m)
    neg(f"sparse_mode-{_m}-with-mask", "sparse_mode",
        lambda _m=_m: dict(sparse_mode=_m, atten_mask=cmask()))
for _m in [-1, 5, 9]:
    neg(f"TND-sparse_mode-{_m}-no-mask", "sparse_mode",
        lambda _m=_m: tnd([6, 16], [8, 20], sparse_mode=_m))
    neg(f"TND-sparse_mode-{_m}-with-mask", "sparse_mode",
        lambda _m=_m: tnd([6, 16], [8, 20], sparse_mode=_m, atten_mask=cmask()))
for _m in [0, 1, 2, 3, 4]:
    pos(f"sparse_mode-{_m}-no-mask", lambda _m=_m: dict(sparse_mode=_m, pre_tokens=-5,
                                                        next_tokens=-5))
for _m in [0, 1, 2, 3, 4, 7, 8]:
    pos(f"TND-sparse_mode-{_m}-no-mask", lambda _m=_m: tnd([6, 16], [8, 20], sparse_mode=_m),
        apis=("v2",))

# band rules: mode 0 with a mask (Sq = Skv = 16)
for _pre, _nxt in [(-1, -1), (-3, 2), (2, -3), (-16, 20), (20, -16), (-2**31, 5), (-100, -1)]:
    neg(f"band-mode0-pre{_pre}-next{_nxt}", ("pre_tokens", "next_tokens"),
        lambda _pre=_pre, _nxt=_nxt: dict(atten_mask=fmask(S, S), pre_tokens=_pre,
                                          next_tokens=_nxt))
for _pre, _nxt in [(-3, 3), (3, -3), (-15, 20), (20, -15), (0, 0), (2**31 - 1, 2**31 - 1),
                   (-15, 2**31 - 1), (2**31 - 1, -15), (15, -15)]:
    pos(f"band-mode0-pre{_pre}-next{_nxt}",
        lambda _pre=_pre, _nxt=_nxt: dict(atten_mask=fmask(S, S), pre_tokens=_pre,
                                          next_tokens=_nxt))
# Sq=16, Skv=24: |pre| < Skv for mode 0 uses Skv
pos("band-mode0-Sq16-Skv24-pre-23", lambda: dict(sq=16, skv=24, atten_mask=fmask(16, 24),
                                                 pre_tokens=-23, next_tokens=30))
neg("band-mode0-Sq16-Skv24-pre-24", ("pre_tokens", "next_tokens"),
    lambda: dict(sq=16, skv=24, atten_mask=fmask(16, 24), pre_tokens=-24, next_tokens=30))
# mode 4 (bottom-right origin): pre' = pre - d, next' = next + d, d = Skv - Sq = 8
neg("band-mode4-translated-pre-too-negative", ("pre_tokens", "next_tokens"),
    lambda: dict(sq=16, skv=24, sparse_mode=4, atten_mask=cmask(), pre_tokens=-20,
                 next_tokens=22))
pos("band-mode0-same-values-valid-untranslated",
    lambda: dict(sq=16, skv=24, atten_mask=fmask(16, 24), pre_tokens=-20, next_tokens=22))
pos("band-mode4-translated-next-valid",
    lambda: dict(sq=16, skv=24, sparse_mode=4, atten_mask=cmask(), pre_tokens=30,
                 next_tokens=-16))
neg("band-mode0-same-values-invalid-untranslated", ("pre_tokens", "next_tokens"),
    lambda: dict(sq=16, skv=24, atten_mask=fmask(16, 24), pre_tokens=30, next_tokens=-16))
neg("band-mode4-spec-example", ("pre_tokens", "next_tokens"),
    lambda: dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=-5, next_tokens=2))
neg("band-mode4-both-negative", ("pre_tokens", "next_tokens"),
    lambda: dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=-1, next_tokens=-1))
pos("band-mode4-boundary", lambda: dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=-5,
                                        next_tokens=5))
pos("band-mode4-boundary-next", lambda: dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=15,
                                             next_tokens=-15))
neg("band-mode4-next-equals-minus-Sq", ("pre_tokens", "next_tokens"),
    lambda: dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=20, next_tokens=-16))
# pre / next ignored: no mask, modes 1, 2, 3
pos("band-no-mask-anything-goes", lambda: dict(pre_tokens=-5, next_tokens=-5))
pos("band-no-mask-mode4-anything-goes", lambda: dict(sparse_mode=4, pre_tokens=-20,
                                                     next_tokens=-20))
pos("band-mode1-ignores-pre-next", lambda: dict(sparse_mode=1, atten_mask=fmask(S, S),
                                                pre_tokens=-1, next_tokens=-1))
pos("band-mode2-ignores-pre-next", lambda: dict(sparse_mode=2, atten_mask=cmask(),
                                                pre_tokens=-1, next_tokens=-1))
pos("band-mode3-ignores-pre-next", lambda: dict(sparse_mode=3, atten_mask=cmask(),
                                                pre_tokens=-1, next_tokens=-1))
pos("band-int32-extremes-no-mask", lambda: dict(pre_tokens=-2**31, next_tokens=2**31 - 1))
# int32 range checked always (decisions)
neg("pre_tokens-above-int32", "pre_tokens", lambda: dict(pre_tokens=2**31))
neg("next_tokens-above-int32", "next_tokens", lambda: dict(next_tokens=2**31))
neg("pre_tokens-below-int32", "pre_tokens", lambda: dict(pre_tokens=-2**31 - 1))
neg("next_tokens-below-int32", "next_tokens", lambda: dict(next_tokens=-2**31 - 1))

# modes 7/8: band batch (7: last batch with Sq_b > 0, 8: first); q lens (4, 8), kv lens (6, 8)
# pre=-5, next=6: invalid for (Sq=4, Skv=6) after translation, valid for (8, 8)
neg("band-mode8-band-batch-first", ("pre_tokens", "next_tokens"),
    lambda: tnd([4, 12], [6, 14], sparse_mode=8, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6))
pos("band-mode7-band-batch-last",
    lambda: tnd([4, 12], [6, 14], sparse_mode=7, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6), apis=("v2", "grad_v2"))
neg("band-mode7-band-batch-last-invalid", ("pre_tokens", "next_tokens"),
    lambda: tnd([8, 12], [8, 14], sparse_mode=7, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6))
pos("band-mode8-band-batch-first-valid",
    lambda: tnd([8, 12], [8, 14], sparse_mode=8, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6), apis=("v2",))
pos("band-mode7-skips-trailing-empty-batch",
    lambda: tnd([4, 12, 12], [6, 14, 14], sparse_mode=7, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6), apis=("v2",))
pos("band-mode7-skips-trailing-padding",
    lambda: tnd([4, 12, 0], [6, 14, 0], sparse_mode=7, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6), apis=("v2",))
pos("band-mode8-skips-leading-empty-batch",
    lambda: tnd([0, 4, 12], [0, 6, 14], sparse_mode=8, atten_mask=cmask(), pre_tokens=-1,
                next_tokens=3), apis=("v2",))
neg("band-mode8-leading-empty-batch-then-invalid", ("pre_tokens", "next_tokens"),
    lambda: tnd([0, 4, 12], [0, 6, 14], sparse_mode=8, atten_mask=cmask(), pre_tokens=-5,
                next_tokens=6))
neg("band-mode7-both-negative", ("pre_tokens", "next_tokens"),
    lambda: tnd([6, 16], [8, 20], sparse_mode=7, atten_mask=cmask(), pre_tokens=-1,
                next_tokens=-1))

# prefix (modes 5 / 6)
neg("prefix-missing-mode5", "prefix",
    lambda: dict(sparse_mode=5, atten_mask=fmask(B, 1, S, S)))
neg("prefix-missing-mode6", "prefix", lambda: dict(sparse_mode=6, atten_mask=pmask()))
neg("prefix-too-short", "prefix", lambda: dict(sparse_mode=6, atten_mask=pmask(), prefix=[3]))
neg("prefix-too-long", "prefix",
    lambda: dict(sparse_mode=6, atten_mask=pmask(), prefix=[3, 3, 3]))
neg("prefix-too-short-mode5", "prefix",
    lambda: dict(sparse_mode=5, atten_mask=fmask(B, 1, S, S), prefix=[3]))
# mode 6 with Sq=16, Skv=24: each in [8, 24]
neg("prefix-mode6-below-Skv-Sq", "prefix",
    lambda: dict(sq=16, skv=24, sparse_mode=6, atten_mask=pmask(), prefix=[7, 10]))
neg("prefix-mode6-above-Skv", "prefix",
    lambda: dict(sq=16, skv=24, sparse_mode=6, atten_mask=pmask(), prefix=[8, 25]))
neg("prefix-mode6-negative-Sq-gt-Skv", "prefix",
    lambda: dict(sq=24, skv=16, sparse_mode=6, atten_mask=pmask(), prefix=[-1, 0]))
pos("prefix-mode6-both-ends", lambda: dict(sq=16, skv=24, sparse_mode=6, atten_mask=pmask(),
                                           prefix=[8, 24]))
pos("prefix-mode6-Sq-gt-Skv-zero", lambda: dict(sq=24, skv=16, sparse_mode=6, atten_mask=pmask(),
                                                prefix=[0, 16]))
# mode 5: each in [0, Skv]
neg("prefix-mode5-negative", "prefix",
    lambda: dict(sq=16, skv=24, sparse_mode=5, atten_mask=fmask(B, 1, 16, 24), prefix=[-1, 3]))
neg("prefix-mode5-above-Skv", "prefix",
    lambda: dict(sq=16, skv=24, sparse_mode=5, atten_mask=fmask(B, 1, 16, 24), prefix=[3, 25]))
pos("prefix-mode5-both-ends", lambda: dict(sq=16, skv=24, sparse_mode=5,
                                           atten_mask=fmask(B, 1, 16, 24), prefix=[0, 24]))
pos("prefix-mode5-below-Skv-Sq", lambda: dict(sq=16, skv=24, sparse_mode=5,
                                              atten_mask=fmask(B, 1, 16, 24), prefix=[2, 3]))
# TND mode 6: per batch [max(0, Skv_b - Sq_b), Skv_b]; q lens (6, 10), kv lens (8, 12)
neg("prefix-TND-mode6-below-batch-lower-bound", "prefix",
    lambda: tnd([6, 16], [8, 20], sparse_mode=6, atten_mask=pmask(), prefix=[1, 12]))
neg("prefix-TND-mode6-above-batch-Skv", "prefix",
    lambda: tnd([6, 16], [8, 20], sparse_mode=6, atten_mask=pmask(), prefix=[2, 13]))
neg("prefix-TND-mode6-wrong-length", "prefix",
    lambda: tnd([6, 16], [8, 20], sparse_mode=6, atten_mask=pmask(), prefix=[2]))
# With prefix B <= 2048
neg("prefix-batch-2049", ("prefix", "query", "batch"),
    lambda: dict(b=2049, n1=1, n2=1, sq=1, skv=1, sparse_mode=6, atten_mask=pmask(),
                 prefix=[0] * 2049), STRUCT)
pos("prefix-batch-2048", lambda: dict(b=2048, n1=1, n2=1, sq=1, skv=1, sparse_mode=6,
                                      atten_mask=pmask(), prefix=[1] * 2048), apis=("v2",))

# --------------------------------------------------------------------------------------------
# SPEC 5: inner_precise, keep_prob, dropout
# --------------------------------------------------------------------------------------------
for _ip in [-1, 4, 5, 8, 100]:
    neg(f"inner_precise-{_ip}", "inner_precise", lambda _ip=_ip: dict(inner_precise=_ip),
        value=_ip)
for _ip in [0, 1, 2, 3]:
    pos(f"inner_precise-{_ip}", lambda _ip=_ip: dict(inner_precise=_ip, atten_mask=fmask(S, S)))

for _kp in [0.0, -0.5, -1.0, 1.0000001, 1.5, 2.0, math.nan, math.inf, -math.inf]:
    neg(f"keep_prob-{_kp}", "keep_prob", lambda _kp=_kp: dict(keep_prob=_kp))
for _kp in [1.0, 0.999, 0.5, 1e-3]:
    pos(f"keep_prob-{_kp}", lambda _kp=_kp: dict(keep_prob=_kp, seed=7))

# dropout_mask: uint8, at least ceil(numels/8) bytes.  B=1,N1=N2=1,Sq=3,Skv=5: numels=15 -> 2
_DSMALL = dict(b=1, n1=1, n2=1, sq=3, skv=5)
for _name, _dt in {"bool": torch.bool, "int8": torch.int8, "float32": torch.float32,
                   "int32": torch.int32}.items():
    neg(f"dropout_mask-dtype-{_name}", "dropout_mask",
        lambda _dt=_dt: dict(keep_prob=0.5, dropout_mask=torch.ones(256, dtype=_dt)))
neg("dropout_mask-too-short-ceil", "dropout_mask",
    lambda: dict(_DSMALL, keep_prob=0.5, dropout_mask=torch.full((1,), 255, dtype=torch.uint8)))
pos("dropout_mask-exact-ceil", lambda: dict(_DSMALL, keep_prob=0.5,
                                            dropout_mask=torch.full((2,), 255, dtype=torch.uint8)))
neg("dropout_mask-too-short-default", "dropout_mask",
    lambda: dict(keep_prob=0.5, dropout_mask=torch.full((255,), 255, dtype=torch.uint8)))
pos("dropout_mask-exact-default", lambda: dict(keep_prob=0.5, dropout_mask=torch.full(
    (256,), 255, dtype=torch.uint8)))
pos("dropout_mask-any-shape", lambda: dict(keep_prob=0.5, dropout_mask=torch.full(
    (2, 8, 16), 170, dtype=torch.uint8)))
# TND: numels = N1 * sum Sq_b*Skv_b = 4 * (6*8 + 10*12) = 672 -> 84 bytes
neg("dropout_mask-TND-too-short", "dropout_mask",
    lambda: tnd([6, 16], [8, 20], keep_prob=0.5,
                dropout_mask=torch.full((83,), 255, dtype=torch.uint8)))
pos("dropout_mask-TND-exact", lambda: tnd([6, 16], [8, 20], keep_prob=0.5,
                                          dropout_mask=torch.full((84,), 255, dtype=torch.uint8)))
neg("offset-negative", "offset", lambda: dict(keep_prob=0.5, seed=5, offset=-1))
neg("offset-2**63", "offset", lambda: dict(keep_prob=0.5, seed=5, offset=2**63))
pos("offset-max", lambda: dict(keep_prob=0.5, seed=5, offset=2**63 - 1))
pos("seed-negative", lambda: dict(keep_prob=0.5, seed=-1))
pos("seed-huge", lambda: dict(keep_prob=0.5, seed=2**70 + 3))

# --------------------------------------------------------------------------------------------
# SPEC 8: limits
# --------------------------------------------------------------------------------------------
neg("limit-N1-257", ("head_num", "query"),
    lambda: dict(b=1, n1=257, n2=1, sq=2, skv=2, d=4), STRUCT)
neg("limit-N1-512", ("head_num", "query"),
    lambda: dict(layout="BSH", b=1, n1=512, n2=1, sq=2, skv=2, d=2), STRUCT)
pos("limit-N1-256", lambda: dict(b=1, n1=256, n2=1, sq=2, skv=2, d=4), apis=STRUCT)
pos("limit-N1-256-BSH", lambda: dict(layout="BSH", b=1, n1=256, n2=2, sq=2, skv=2, d=2),
    apis=("v2",))
neg("limit-D-769", ("query", "key"), lambda: dict(b=1, n1=1, n2=1, sq=2, skv=2, d=769, dv=8),
    STRUCT)
neg("limit-D-Dv-769", ("query", "key", "value"),
    lambda: dict(b=1, n1=1, n2=1, sq=2, skv=2, d=769, dv=769), STRUCT)
neg("limit-D-769-BSH", ("query", "key", "head_num"),
    lambda: dict(layout="BSH", b=1, n1=1, n2=1, sq=2, skv=2, d=769), STRUCT)
pos("limit-D-768", lambda: dict(b=1, n1=1, n2=1, sq=2, skv=2, d=768, dv=768), apis=STRUCT)
pos("limit-D-768-Dv-8", lambda: dict(b=1, n1=1, n2=1, sq=2, skv=2, d=768, dv=8), apis=("v2",))
pos("limit-D-1", lambda: dict(b=1, n1=1, n2=1, sq=2, skv=2, d=1), apis=("v2",))
pos("limit-all-ones", lambda: dict(b=1, n1=1, n2=1, sq=1, skv=1, d=1), apis=("v2", "grad"))
# zero-size dims
neg("zero-B", ("query", "key", "value", "batch"), lambda: dict(b=0), STRUCT)
neg("zero-Sq", ("query",), lambda: dict(sq=0), STRUCT)
neg("zero-Skv", ("key", "value"), lambda: dict(skv=0), STRUCT)
neg("zero-D", ("query", "key"), lambda: dict(d=0, dv=0), STRUCT)
neg("zero-Dv", ("value",), lambda: dict(d=8, dv=0), STRUCT)
neg("zero-N2", ("key", "value"), lambda: dict(n2=0), STRUCT)
neg("zero-BSH-Sq", ("query",), lambda: dict(layout="BSH", sq=0), STRUCT)
neg("zero-TND-T1", ("query", "actual_seq_qlen"),
    lambda: tnd([0], [20], t1=0, t2=20), STRUCT)
neg("zero-TND-T2", ("key", "value", "actual_seq_kvlen"),
    lambda: tnd([16], [0], t1=16, t2=0), STRUCT)


# huge but cheap: zero-stride expanded tensors (nothing big is allocated by the test itself)
def _exp(*shape, dtype=F32):
    return torch.empty((1,) * len(shape), dtype=dtype).expand(*shape)


neg("limit-B-above-2M", ("query", "batch"),
    lambda: dict(query=_exp(2**22, 1, 1, 8), key=_exp(2**22, 1, 1, 8), value=_exp(2**22, 1, 1, 8),
                 head_num=1), STRUCT)
neg("limit-Sq-above-1M", ("query",),
    lambda: dict(query=_exp(1, 2**21, 1, 8), key=_exp(1, 4, 1, 8), value=_exp(1, 4, 1, 8),
                 head_num=1), STRUCT)
neg("limit-Skv-above-1M", ("key", "value"),
    lambda: dict(query=_exp(1, 4, 1, 8), key=_exp(1, 2**21, 1, 8), value=_exp(1, 2**21, 1, 8),
                 head_num=1), STRUCT)

neg("limit-TND-T1-above-1M", ("query", "actual_seq_qlen"),
    lambda: dict(layout="TND", head_num=1, query=_exp(2**21, 1, 8), key=_exp(4, 1, 8),
                 value=_exp(4, 1, 8), actual_seq_qlen=[2**21], actual_seq_kvlen=[4]), STRUCT)

# decisions: seq lens are lists/tuples of ints or 1-D integer tensors
neg("TND-seqlen-2d-tensor", "actual_seq_qlen",
    lambda: tnd(torch.tensor([[6, 16]]), torch.tensor([8, 20]), t1=16, t2=20))
neg("TND-seqlen-float-tensor", "actual_seq_kvlen",
    lambda: tnd(torch.tensor([6, 16]), torch.tensor([8.0, 20.0]), t1=16, t2=20))
# decisions: pre/next are integers in int32 range, checked even without a mask
neg("pre_tokens-float", "pre_tokens", lambda: dict(pre_tokens=1.5))
neg("next_tokens-float", "next_tokens", lambda: dict(next_tokens=2.5))
# decisions: with keep_prob == 1 the dropout_mask, seed and offset are ignored
pos("keep_prob-1-ignores-bad-dropout_mask",
    lambda: dict(keep_prob=1.0, dropout_mask=torch.ones(1, dtype=torch.bool)))
# compressed pse: B or 1 batches, N1 heads
neg("cpse-N2-heads", "pse",
    lambda: dict(b=1, n1=2, n2=1, sq=_CS, skv=_CS, pse=rnd(1, 1, 1024, _CS), sparse_mode=3,
                 atten_mask=cmask()))
neg("cpse-batch-3", "pse",
    lambda: dict(b=2, n1=2, n2=1, sq=_CS, skv=_CS, pse=rnd(3, 2, 1024, _CS), sparse_mode=3,
                 atten_mask=cmask()))
pos("cpse-batch-B", lambda: dict(b=2, n1=2, n2=1, sq=_CS, skv=_CS, pse=rnd(2, 2, 1024, _CS),
                                 sparse_mode=3, atten_mask=cmask()), apis=("v2",))

# padding_mask is reserved
for _name, _mk in {"zeros-bool": lambda: torch.zeros(B, 1, S, S, dtype=torch.bool),
                   "float": lambda: torch.zeros(S, S),
                   "empty": lambda: torch.empty(0)}.items():
    neg(f"padding_mask-{_name}", "padding_mask", lambda _mk=_mk: dict(padding_mask=_mk()))


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------
def _params(cases):
    out = []
    for c in cases:
        for api in c.apis:
            out.append(pytest.param(api, c, id=f"{api}-{c.id}"))
    return out


@pytest.mark.parametrize("api,case", _params(NEG))
def test_rule_violation_is_rejected(api, case):
    expect_error(api, case.make(), case.params, case.status, case.value)


@pytest.mark.parametrize("api,case", _params(POS))
def test_boundary_is_accepted(api, case):
    expect_ok(api, case.make())


@pytest.mark.parametrize("make", POS_ROPE)
@pytest.mark.parametrize("api", ["v2", "grad_v2"])
def test_rope_accepted(api, make):
    expect_ok(api, make(), rope=(api == "grad_v2"))


def test_case_ids_unique():
    ids = [f"{api}-{c.id}" for c in NEG + POS for api in c.apis]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------------------------
# None for required tensors -> 161001
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ALL)
@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_required_input_none_is_nullptr(api, which):
    expect_error(api, {which: None}, (which,), status=NULLPTR)


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
@pytest.mark.parametrize("which", ["dy", "softmax_max", "softmax_sum", "attention_in"])
def test_grad_required_none_is_nullptr(api, which):
    expect_error(api, {which: None}, (which,), status=NULLPTR)


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
@pytest.mark.parametrize("which", ["dy", "softmax_max", "softmax_sum", "attention_in"])
def test_grad_required_none_is_nullptr_tnd(api, which):
    expect_error(api, {"layout": "TND", which: None}, (which,), status=NULLPTR)


# --------------------------------------------------------------------------------------------
# grad-only rules: statistics and dy / attention_in
# --------------------------------------------------------------------------------------------
GRAD_NEG = {
    "softmax_max-f16": ("softmax_max", lambda: dict(softmax_max=torch.zeros(B, N1, S, 8).half())),
    "softmax_max-f64": ("softmax_max", lambda: dict(softmax_max=torch.zeros(B, N1, S, 8).double())),
    "softmax_sum-bf16": ("softmax_sum",
                         lambda: dict(softmax_sum=torch.ones(B, N1, S, 8).bfloat16())),
    "softmax_max-last-1": ("softmax_max", lambda: dict(softmax_max=torch.zeros(B, N1, S, 1))),
    "softmax_max-3d": ("softmax_max", lambda: dict(softmax_max=torch.zeros(B, N1, S))),
    "softmax_sum-wrong-S": ("softmax_sum", lambda: dict(softmax_sum=torch.ones(B, N1, S + 1, 8))),
    "softmax_sum-N2-heads": ("softmax_sum", lambda: dict(softmax_sum=torch.ones(B, N2, S, 8))),
    "dy-wrong-shape": ("dy", lambda: dict(dy=rnd(B, S, N1, D + 1))),
    "dy-wrong-rank": ("dy", lambda: dict(dy=rnd(B, S, N1 * D))),
    "attention_in-wrong-shape": ("attention_in", lambda: dict(attention_in=rnd(B, S + 1, N1, D))),
    "TND-softmax_max-wrong": ("softmax_max", lambda: dict(layout="TND",
                                                          softmax_max=torch.zeros(16, N1, 1))),
    "TND-softmax_sum-4d": ("softmax_sum", lambda: dict(layout="TND",
                                                       softmax_sum=torch.ones(2, N1, 10, 8))),
    "TND-dy-wrong": ("dy", lambda: dict(layout="TND", dy=rnd(15, N1, D))),
}


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
@pytest.mark.parametrize("name", list(GRAD_NEG))
def test_grad_specific_rules(api, name):
    param, make = GRAD_NEG[name]
    expect_error(api, make(), (param,))


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
def test_grad_softmax_in_is_ignored(api):
    expect_ok(api, dict(softmax_in=torch.full((3,), float("nan"))))


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
def test_grad_softmax_layout_tnd_accepted(api):
    expect_ok(api, dict(layout="TND", softmax_layout="TND"))


# --------------------------------------------------------------------------------------------
# error object, constants
# --------------------------------------------------------------------------------------------
def test_error_class_and_constants():
    assert issubclass(FlashAttentionError, ValueError)
    assert fascore.ACLNN_SUCCESS == 0
    assert fascore.ACLNN_ERR_PARAM_NULLPTR == 161001
    assert fascore.ACLNN_ERR_PARAM_INVALID == 161002
    assert fascore.ACLNN_ERR_RUNTIME_ERROR == 361001


def test_message_names_parameter_value_and_rule():
    err = expect_error("v2", dict(sparse_mode=4, atten_mask=cmask(), pre_tokens=-5, next_tokens=2),
                       ("pre_tokens",))
    msg = str(err)
    assert "-5" in msg and "2" in msg
    assert len(msg) > len("pre_tokens=-5 next_tokens=2")  # states a rule, not just the values


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_band_message_reports_received_values_mode4(api):
    """SPEC 9: the message names the value *received*; with mode 4 the check runs on the
    translated pre'/next', but the user passed pre_tokens=-20, next_tokens=22."""
    err = expect_error(api, dict(sq=16, skv=24, sparse_mode=4, atten_mask=cmask(),
                                 pre_tokens=-20, next_tokens=22), ("pre_tokens",))
    assert "-20" in str(err) and "22" in str(err), str(err)


def test_band_message_reports_received_values_mode8():
    err = expect_error("v2", tnd([4, 12], [6, 14], sparse_mode=8, atten_mask=cmask(),
                                 pre_tokens=-5, next_tokens=6), ("pre_tokens",))
    assert "-5" in str(err) and "6" in str(err), str(err)


def test_message_names_value_keep_prob():
    err = expect_error("v2", dict(keep_prob=1.5), ("keep_prob",))
    assert "1.5" in str(err)


def test_message_names_value_head_num():
    err = expect_error("v2", dict(b=1, n1=257, n2=1, sq=2, skv=2, d=4), ("head_num", "query"))
    assert "257" in str(err)


# --------------------------------------------------------------------------------------------
# sparse_mode without mask warns once per process (fresh interpreter)
# --------------------------------------------------------------------------------------------
def test_sparse_mode_without_mask_warns_once():
    code = textwrap.dedent("""
        import warnings, torch, fascore
        q = torch.randn(1, 4, 2, 8); k = torch.randn(1, 4, 2, 8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fascore.npu_fusion_attention_v2(q, k, k, 2, "BSND")
            n0 = sum(issubclass(x.category, UserWarning) for x in w)
            fascore.npu_fusion_attention_v2(q, k, k, 2, "BSND", sparse_mode=2)
            fascore.npu_fusion_attention_v2(q, k, k, 2, "BSND", sparse_mode=3)
            n = sum(issubclass(x.category, UserWarning) for x in w)
        print(n0, n)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["0", "1"], r.stdout


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["key", "value", "pse", "atten_mask", "sink", "dropout_mask"])
def test_tensors_on_different_devices_rejected(which):
    spec = dict(pse=rnd(B, N1, S, S), atten_mask=fmask(S, S), sink=torch.zeros(N1),
                keep_prob=0.5, dropout_mask=torch.full((256,), 255, dtype=torch.uint8))
    fn, args, kw = build("v2", **spec)
    args = [a.cuda() if torch.is_tensor(a) else a for a in args]
    kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    if which in ("key", "value"):
        idx = {"key": 1, "value": 2}[which]
        args[idx] = args[idx].cpu()
    else:
        kw[which] = kw[which].cpu()
    with pytest.raises(FlashAttentionError) as ei:
        fn(*args, **kw)
    assert ei.value.status == INVALID
    assert which in str(ei.value) or "device" in str(ei.value)


# --------------------------------------------------------------------------------------------
# memory guard: a legal but impossibly large request fails with 361001 before work starts
# --------------------------------------------------------------------------------------------
_MB, _MN, _MS, _MD = 1000, 64, 1_000_000, 768


def _huge_spec():
    q = _exp(_MB, _MN, _MS, _MD)
    return dict(layout="BNSD", query=q, key=q, value=q, head_num=_MN)


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_memory_guard_forward(api):
    err = expect_error(api, _huge_spec(), ("memory", "query", "bytes", "MiB", "GiB"),
                       status=RUNTIME)
    assert isinstance(err, FlashAttentionError)


@pytest.mark.parametrize("api", ["grad", "grad_v2"])
def test_memory_guard_grad(api):
    spec = _huge_spec()
    spec.update(dy=_exp(_MB, _MN, _MS, _MD), attention_in=_exp(_MB, _MN, _MS, _MD),
                softmax_max=_exp(_MB, _MN, _MS, 8), softmax_sum=_exp(_MB, _MN, _MS, 8))
    expect_error(api, spec, ("memory", "query", "bytes", "MiB", "GiB"), status=RUNTIME)
