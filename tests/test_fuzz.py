"""Fuzzing the public entry points with hostile and valid argument combinations (hypothesis).

Every call either returns results equal to the dense reference engine (``use_engine("reference")``)
or raises ``FlashAttentionError`` with an aclnn status and a message naming the parameter. Never
another exception type, a crash or a hang; inputs are never modified (bits, ``_version``, shape,
strides, storage offset, ``requires_grad``, list contents). The aclnn layer returns status codes
and never raises.

Sizes are tiny (S <= 40, N <= 8, D <= 32). The number of examples per test is
``FASCORE_FUZZ_EXAMPLES`` (default 150; the invalid-argument test runs 3x, the grad test 1x,
aclnn 1x). ``FASCORE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` is the long run. The last test
prints how many cases were tried, by outcome; ``FASCORE_FUZZ_REPORT=path`` also writes it as JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fascore
from fascore import FlashAttentionError, aclnn

try:  # run-time knobs of the flash engine (tile sizes, fused backward); optional
    from fascore.engines.flash import config as _kernels
    _KCONFIG = getattr(_kernels, "config", None)
except Exception:  # pragma: no cover
    _KCONFIG = None

N_EXAMPLES = int(os.environ.get("FASCORE_FUZZ_EXAMPLES", "150"))
HANG_SECONDS = float(os.environ.get("FASCORE_FUZZ_HANG_SECONDS", "60"))
FLT_MAX = 3.4028234663852886e38
I32MAX, I32MIN = 2**31 - 1, -(2**31)
STATUSES = (fascore.ACLNN_ERR_PARAM_NULLPTR, fascore.ACLNN_ERR_PARAM_INVALID, fascore.ACLNN_ERR_RUNTIME_ERROR)
COUNTS: Counter = Counter()

FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def fuzz_settings(factor: float) -> settings:
    return settings(FUZZ, max_examples=max(1, int(N_EXAMPLES * factor)))


# ----------------------------------------------------------------------------------------------
# Hang guard, input snapshots
# ----------------------------------------------------------------------------------------------
class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Turn a call that runs longer than ``seconds`` into a test failure (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"call still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _tensor_state(t: torch.Tensor) -> dict:
    st_ = dict(version=t._version, shape=tuple(t.shape), stride=t.stride() if t.layout == torch.strided else None,
               dtype=t.dtype, device=t.device, requires_grad=t.requires_grad)
    if t.device.type != "meta" and t.layout == torch.strided:
        x = t.detach()
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        st_["offset"] = t.storage_offset()
        st_["bits"] = torch.empty(x.shape, dtype=x.dtype).copy_(x).reshape(-1).view(torch.uint8)
    return st_


class Snapshot:
    """Everything observable about the arguments of a call, to check nothing was modified."""

    def __init__(self, args: dict) -> None:
        self.items: list = []
        for k, v in args.items():
            self._add(k, v)

    def _add(self, path: str, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            self.items.append((path, o, _tensor_state(o)))
        elif isinstance(o, (list, tuple)):
            self.items.append((path, o, list(o)))
            for i, v in enumerate(o):
                self._add(f"{path}[{i}]", v)

    def verify(self) -> None:
        for path, o, before in self.items:
            if isinstance(o, torch.Tensor):
                now = _tensor_state(o)
                for key in before:
                    if key == "bits":
                        assert torch.equal(now["bits"], before["bits"]), f"{path}: values modified"
                    else:
                        assert now[key] == before[key], f"{path}: {key} changed {before[key]} -> {now[key]}"
            else:
                assert list(o) == before, f"{path}: list modified {before} -> {list(o)}"


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
V1_KEYS = {"pse", "padding_mask", "atten_mask", "scale", "keep_prob", "pre_tokens", "next_tokens",
           "inner_precise", "prefix", "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode",
           "softmax_layout", "sink", "dropout_mask", "seed", "offset"}
V2_ONLY = {"query_rope", "key_rope", "pse_type", "q_start_idx", "kv_start_idx"}
API_NAMES = {
    "v1": {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"},
    "v2": {},
    "grad_v1": {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens", "scale": "scale_value"},
    "grad_v2": {"scale": "scale_value"},
}


@dataclass
class Case:
    api: str  # "v1" or "v2"
    args: dict  # internal names (v2 spelling): query, key, value, head_num, input_layout, kwargs
    geo: dict  # what the generator chose: layout, dtype, B, N1, N2, Sq, Skv, D, Dv, ...
    notes: list = field(default_factory=list)
    nonfinite: bool = False


def spell(api: str, name: str) -> str:
    return API_NAMES.get(api, {}).get(name, name)


def call_forward(case: Case, args: dict | None = None):
    a = dict(case.args if args is None else args)
    pos = [a.pop(k) for k in ("query", "key", "value", "head_num", "input_layout")]
    if case.api == "v1":
        kw = {spell("v1", k): v for k, v in a.items()}
        return fascore.npu_fusion_attention(*pos, **kw)
    return fascore.npu_fusion_attention_v2(*pos, **a)


def layout_shape(layout: str, b: int, n: int, s: int, d: int) -> tuple:
    return {"BSH": (b, s, n * d), "SBH": (s, b, n * d), "BSND": (b, s, n, d), "BNSD": (b, n, s, d)}[layout]


def cumsum(xs):
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def make_tensor(shape, dtype, g, style="contig", scale=1.0) -> torch.Tensor:
    """Random values in ``dtype`` with a memory style: contiguous, strided (every other element),
    permuted storage, storage offset, or zero-stride (expanded along the size>1 dims)."""
    shape = tuple(shape)
    if style == "expanded":
        small = tuple(1 if (s > 1 and i % 2 == 0) else s for i, s in enumerate(shape))
        if small == shape:
            small = tuple(1 if s > 1 else s for s in shape)
        return (torch.randn(small, generator=g) * scale).to(dtype).expand(shape)
    if style == "strided" and shape:
        return (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * scale).to(dtype)[..., ::2]
    if style == "permuted" and len(shape) > 1:
        perm = list(range(len(shape)))[::-1]
        base = (torch.randn(*[shape[p] for p in perm], generator=g) * scale).to(dtype)
        return base.permute(*perm)
    if style == "offset":
        n = math.prod(shape)
        return (torch.randn(n + 3, generator=g) * scale).to(dtype)[3:].view(shape)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


_CMASK: dict = {}


def compressed(rows: int, dtype=torch.bool, lead: bool = False) -> torch.Tensor:
    key = (rows, dtype, lead)
    if key not in _CMASK:
        tri = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        if rows == 3072:
            block = torch.zeros(1024, 2048, dtype=torch.bool)
            block[:, 1024:] = True
            tri = torch.cat([tri, block])
        m = tri.to(dtype)
        _CMASK[key] = m.view(1, 1, rows, 2048) if lead else m
    return _CMASK[key]


def band_ok(pre: int, nxt: int, shift: int, sq: int, skv: int) -> bool:
    p, n = pre - shift, nxt + shift
    if p < 0 and n < 0:
        return False
    if p < 0 and (n < -p or -p >= skv):
        return False
    if n < 0 and (p < -n or -n >= sq):
        return False
    return True


def strip_padding(cum: list[int]) -> list[int]:
    end = len(cum)
    while end > 0 and cum[end - 1] == 0 and any(x > 0 for x in cum[:end - 1]):
        end -= 1
    return cum[:end]


def tnd_geoms(cq: list[int], ck: list[int]) -> list[tuple[int, int]]:
    a, b = strip_padding(cq), strip_padding(ck)
    n = min(len(a), len(b))
    out, pq, pk = [], 0, 0
    for i in range(n):
        out.append((a[i] - pq, b[i] - pk))
        pq, pk = a[i], b[i]
    return out


DTYPES = [torch.float32, torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]
STYLES = ["contig", "contig", "contig", "strided", "permuted", "offset", "expanded"]


@st.composite
def valid_cases(draw, api: str | None = None, tnd: bool | None = None, nonfinite: bool | None = None,
                dtypes=DTYPES, modes: tuple | None = None, mask: bool | None = None,
                pse_kinds: tuple | None = None) -> Case:
    """A valid call: every knob drawn, every rule of SPEC §§2-8 respected. The keyword arguments
    narrow the draw (API, TND or not, sparse modes, with a mask, pse kinds)."""
    api = api or draw(st.sampled_from(["v1", "v2"]))
    layouts = ["BSH", "SBH", "BSND", "BNSD", "TND"]
    if tnd is True:
        layouts = ["TND"]
    elif tnd is False:
        layouts = layouts[:4]
    layout = draw(st.sampled_from(layouts))
    spelled = draw(st.sampled_from([layout, layout, layout.lower(), layout.capitalize()]))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n2 = draw(st.integers(1, 4))
    n1 = n2 * draw(st.integers(1, max(1, 8 // n2)))
    d = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 24, 32]))
    dv = draw(st.sampled_from([d, d, d, max(1, d // 2), 1]))
    value_scale = draw(st.sampled_from([1.0, 1.0, 0.1, 3.0]))
    style = lambda: draw(st.sampled_from(STYLES))  # noqa: E731
    args: dict = {}
    notes: list = []

    # pse kind decides constraints on the geometry (ALiBi / TND pse need Sq == Skv).
    pse_kind = draw(st.sampled_from(pse_kinds or ["none"] * 5 + ["dense", "slopes"] + (["tnd"] if layout == "TND" else [])))
    if pse_kind == "tnd" and modes is not None:  # the TND pse needs causal modes 2/3
        pse_kind = "none"
    if api == "v1" and pse_kind == "slopes":
        pse_kind = "dense"
    if layout == "TND" and pse_kind == "dense":
        pse_kind = "none"
    equal_len = pse_kind in ("slopes", "tnd")

    if layout == "TND":
        nb = draw(st.integers(1, 4))
        lq = [draw(st.integers(0, 10)) for _ in range(nb)]
        if pse_kind == "tnd":
            lq[0] = max(1, lq[0])
        lk = list(lq) if equal_len else [draw(st.integers(0, 10)) for _ in range(nb)]
        cq, ck = cumsum(lq), cumsum(lk)
        npad = draw(st.sampled_from([0, 0, 0, 1, 2]))
        if npad and cq[-1] > 0 and ck[-1] > 0:
            cq, ck = cq + [0] * npad, ck + [0] * npad
        t1 = max(cq) + draw(st.integers(0, 2))
        t2 = max(ck) + draw(st.integers(0, 2))
        t1, t2 = max(t1, 1), max(t2, 1)
        geoms = tnd_geoms(cq, ck)
        b = len(cq)
        sq, skv = t1, t2
        max_sq = max((x for x, _ in geoms), default=0)
        max_skv = max((y for _, y in geoms), default=0)
        qshape, kshape, vshape = (t1, n1, d), (t2, n2, d), (t2, n2, dv)
        as_tensor = draw(st.sampled_from([False, False, True]))
        args["actual_seq_qlen"] = torch.tensor(cq, dtype=torch.int64) if as_tensor else cq
        args["actual_seq_kvlen"] = torch.tensor(ck, dtype=torch.int32) if as_tensor else ck
        live = [x for x in geoms if x[0] > 0]
    else:
        b = draw(st.integers(1, 3))
        sq = draw(st.integers(1, 40))
        skv = sq if equal_len else draw(st.sampled_from([sq, draw(st.integers(1, 40))]))
        geoms = live = [(sq, skv)]
        max_sq, max_skv = sq, skv
        qshape, kshape, vshape = (layout_shape(layout, b, n1, sq, d), layout_shape(layout, b, n2, skv, d),
                                  layout_shape(layout, b, n2, skv, dv))
    args["query"] = make_tensor(qshape, dtype, g, style(), value_scale)
    args["key"] = make_tensor(kshape, dtype, g, style(), value_scale)
    args["value"] = make_tensor(vshape, dtype, g, style())
    args["head_num"] = n1
    args["input_layout"] = spelled

    # sparse mode and mask
    allowed = [0, 1, 2, 3, 4, 6, 7, 8] if layout == "TND" else [0, 1, 2, 3, 4, 5, 6]
    if modes is not None:
        allowed = [x for x in allowed if x in modes] or [0]
    mode = draw(st.sampled_from([2, 3] if pse_kind == "tnd" else [allowed[0]] + allowed))
    with_mask = pse_kind == "tnd" or (mask if mask is not None else draw(st.sampled_from([True, True, True, False])))
    if mode != 0 or draw(st.booleans()):
        args["sparse_mode"] = mode
    pre = draw(st.sampled_from([I32MAX, I32MAX, 0, 1, 3, -2, I32MIN, draw(st.integers(-45, 45))]))
    nxt = draw(st.sampled_from([I32MAX, I32MAX, 0, 1, 3, -2, I32MIN, draw(st.integers(-45, 45))]))
    if with_mask:
        mdtype = draw(st.sampled_from([torch.bool, torch.uint8]))
        if mode in (2, 3, 4, 7, 8):
            args["atten_mask"] = compressed(2048, mdtype, draw(st.booleans()))
        elif mode == 6:
            args["atten_mask"] = compressed(3072, mdtype, draw(st.booleans()))
        else:
            if layout == "TND":
                shapes = [(max_sq, max_skv), (sq, skv)]
            elif mode == 5 and b > 1:
                shapes = [(b, 1, sq, skv), (b, n1, sq, skv)]
            else:
                shapes = [(sq, skv), (1, 1, sq, skv), (b, 1, sq, skv), (b, n1, sq, skv)]
            shp = draw(st.sampled_from(shapes))
            p = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
            m = torch.rand(shp, generator=g) < p
            if mdtype == torch.uint8:
                m = m.to(torch.uint8) * torch.randint(1, 4, shp, generator=g, dtype=torch.uint8)
            mstyle = draw(st.sampled_from(["contig", "contig", "strided", "expanded"]))
            if mstyle == "strided" and m.numel():
                m = torch.stack([m, torch.zeros_like(m)], -1)[..., 0]
            elif mstyle == "expanded":
                m = m[..., :1, :].expand(shp)
            args["atten_mask"] = m
        # band rules where the band is in effect
        checks = []
        if mode == 0:
            checks = [(0, x, y) for x, y in live]
        elif mode == 4:
            checks = [(y - x, x, y) for x, y in live]
        elif mode in (7, 8) and live:
            x, y = live[-1] if mode == 7 else live[0]
            checks = [(y - x, x, y)]
        if not all(band_ok(pre, nxt, *c) for c in checks):
            pre, nxt = I32MAX, I32MAX
        # prefix
        if mode in (5, 6):
            pf = []
            for k in range(b):
                if layout == "TND":
                    gq, gk = geoms[k] if k < len(geoms) else (None, None)
                    if gq is None:
                        pf.append(draw(st.integers(0, 50)))
                        continue
                else:
                    gq, gk = sq, skv
                lo = max(0, gk - gq) if mode == 6 else 0
                pf.append(draw(st.integers(lo, gk)))
            args["prefix"] = torch.tensor(pf) if draw(st.booleans()) else pf
    if pre != I32MAX:
        args["pre_tokens"] = pre
    if nxt != I32MAX:
        args["next_tokens"] = nxt

    # pse
    if pse_kind == "dense":
        shp = draw(st.sampled_from([(b, n1, sq, skv), (1, n1, sq, skv), (b, n1, 1, skv), (1, n1, 1, skv)]))
        args["pse"] = make_tensor(shp, dtype, g, draw(st.sampled_from(STYLES)))
        if api == "v2":
            args["pse_type"] = draw(st.sampled_from([0, 1]))
    elif pse_kind == "tnd":
        args["pse"] = make_tensor((draw(st.sampled_from([1, b])), n1, 1024, max_skv), dtype, g)
        if api == "v2":
            args["pse_type"] = draw(st.sampled_from([0, 1]))
    elif pse_kind == "slopes":
        args["pse"] = (torch.rand((b, n1) if draw(st.booleans()) else (n1,), generator=g) * 0.5)
        args["pse_type"] = draw(st.sampled_from([2, 3]))
        if draw(st.booleans()):
            args["q_start_idx"] = [draw(st.integers(-5, 5))]
            args["kv_start_idx"] = [draw(st.integers(-5, 5))]
    elif api == "v2" and draw(st.booleans()):
        args["pse_type"] = draw(st.sampled_from([0, 1]))

    # rope (v2)
    if api == "v2" and draw(st.sampled_from([False, False, False, True])):
        dr = draw(st.sampled_from([1, 2, 4, 8]))
        if layout == "TND":
            rq, rk = (qshape[0], n1, dr), (kshape[0], n2, dr)
        else:
            rq, rk = layout_shape(layout, b, n1, sq, dr), layout_shape(layout, b, n2, skv, dr)
        args["query_rope"] = make_tensor(rq, dtype, g, style())
        args["key_rope"] = make_tensor(rk, dtype, g, style())

    if draw(st.sampled_from([False, False, False, True])):
        args["sink"] = torch.randn(n1, generator=g) * 2
    args["scale"] = draw(st.sampled_from([1.0, d ** -0.5, d ** -0.5, 0.0, -0.3, 2.5]))
    if draw(st.booleans()):
        args["inner_precise"] = draw(st.integers(0, 3))
    if layout == "TND" and draw(st.booleans()):
        args["softmax_layout"] = draw(st.sampled_from(["TND", "tnd", ""]))

    # dropout
    kp = draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.9, 0.2]))
    if kp < 1.0 or draw(st.booleans()):
        args["keep_prob"] = kp
    numels = n1 * sum(x * y for x, y in geoms) if layout == "TND" else b * n1 * sq * skv
    src = draw(st.sampled_from(["mask", "seed", "drawn"]))
    if src == "mask":
        nbytes = -(-numels // 8) + draw(st.integers(0, 3))
        dm = torch.randint(0, 256, (max(nbytes, 1),), generator=g, dtype=torch.uint8)
        if draw(st.booleans()) and dm.numel() % 2 == 0:
            dm = dm.view(2, -1)
        if kp < 1.0 or draw(st.booleans()):
            args["dropout_mask"] = dm
    elif src == "seed":
        args["seed"] = draw(st.sampled_from([1, 12345, -7, 2**40 + 3, draw(st.integers(1, 2**63 - 1))]))
        args["offset"] = draw(st.sampled_from([0, 4, 1 << 20, draw(st.integers(0, 2**40))]))

    case = Case(api, args, dict(layout=layout, dtype=dtype, b=b, n1=n1, n2=n2, sq=sq, skv=skv, d=d, dv=dv,
                                mode=mode, mask=with_mask, geoms=geoms, numels=numels, pse_kind=pse_kind),
                notes)
    if nonfinite or (nonfinite is None and draw(st.sampled_from([False] * 5 + [True]))):
        inject_nonfinite(draw, case, g)
    return case


def inject_nonfinite(draw, case: Case, g) -> None:
    """NaN / +-Inf into one element of query, key, value or a dense pse (a fresh copy)."""
    names = ["query", "key", "value"] + (["pse"] if case.geo["pse_kind"] == "dense" else [])
    name = draw(st.sampled_from(names))
    t = case.args[name].detach().clone(memory_format=torch.contiguous_format)
    flat = t.view(-1)
    idx = draw(st.integers(0, flat.numel() - 1))
    flat[idx] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    case.args[name] = t
    case.nonfinite = True
    case.notes.append(f"{name}[{idx}]={flat[idx].item()}")


# ----------------------------------------------------------------------------------------------
# Comparison with the reference engine
# ----------------------------------------------------------------------------------------------
def tolerance(dtype: torch.dtype, ref: torch.Tensor, grad: bool = False) -> float:
    fin = ref[torch.isfinite(ref)] if ref.numel() else ref
    mag = max(1.0, fin.abs().max().item()) if fin.numel() else 1.0
    if dtype == torch.float64:
        # backward rebuilds P from float32 statistics (SPEC §2), and dpse accumulates in float32
        rel = 1e-9 if not grad else 1e-6
    elif dtype == torch.float32:
        rel = 1e-4 if not grad else 2e-4
    elif dtype == torch.float16:
        rel = 8 * 2.0**-10 if not grad else 3e-2
    else:
        rel = 8 * 2.0**-7 if not grad else 8e-2
    return rel * mag


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, grad: bool = False,
                 skip: torch.Tensor | None = None) -> None:
    assert isinstance(got, torch.Tensor), f"{name}: {type(got)} is not a tensor"
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{name}: {tuple(got.shape)} {got.dtype} != reference {tuple(ref.shape)} {ref.dtype}"
    x, y = got.detach().double(), ref.detach().double()
    if skip is not None:
        x, y = x[~skip], y[~skip]
    assert torch.equal(x.isnan(), y.isnan()), \
        f"{name}: NaN pattern differs ({int(x.isnan().sum())} vs reference {int(y.isnan().sum())})"
    inf = x.isinf() | y.isinf()
    assert torch.equal(x[inf], y[inf]), f"{name}: Inf pattern differs"
    fin = torch.isfinite(x) & torch.isfinite(y)
    if fin.any():
        err = (x[fin] - y[fin]).abs().max().item()
        tol = tolerance(dtype, y[fin], grad)
        assert err <= tol, f"{name}: max |flash - reference| = {err:.3e} > {tol:.3e}"


def compare_grads(case: Case, names, got, want) -> None:
    for k, a, r in zip(names, got, want):
        if a is None or r is None:
            assert a is None and r is None, f"d{k}: one engine gave no gradient"
            continue
        dt = case.geo["dtype"] if r.dtype == torch.float32 else r.dtype
        assert_close(f"d{k}", a, r, dt, grad=True)


def compare_forward(case: Case, res, ref) -> None:
    dtype = case.geo["dtype"]
    assert isinstance(res, tuple) and len(res) == 7, "forward must return a 7-tuple"
    assert res[4:] == ref[4:], f"seed/offset/numels {res[4:]} != reference {ref[4:]}"
    assert res[3].shape == (0,) and res[3].dtype == dtype
    assert_close("attention_out", res[0], ref[0], dtype)
    assert_close("softmax_max", res[1], ref[1], torch.float32)
    assert_close("softmax_sum", res[2], ref[2], torch.float32)


def known_forward_divergence(case: Case, res, ref) -> str | None:
    """Documented differences between the engines for non-finite inputs (README, Reliability)."""
    if not case.nonfinite:
        return None
    if case.args.get("scale") == 0.0:
        # the flash engine folds scale into the logits GEMM (alpha = 0): a NaN/Inf of query/key
        # never reaches the logits; the reference computes (Q K^T) * 0 = NaN
        return "scale 0 hides NaN/Inf of query/key (flash)"
    if case.notes and case.notes[0].startswith("value"):
        x, y = res[0].detach(), ref[0].detach()
        bad_x, bad_y = ~torch.isfinite(x), ~torch.isfinite(y)
        if not (bad_x & ~bad_y).any():
            fin = ~bad_y
            assert_close("attention_out (finite part)", x[fin], y[fin], case.geo["dtype"])
            assert_close("softmax_max", res[1], ref[1], torch.float32)
            assert_close("softmax_sum", res[2], ref[2], torch.float32)
            # a NaN/Inf value row j reaches rows that cannot see it through 0 * NaN in P @ V:
            # always in the dense reference, in the flash engine only inside computed tiles
            return "non-finite value seen through 0 * NaN (reference: every row; flash: computed tiles)"
    return None


def with_seed(case: Case, res) -> dict:
    """The case's arguments with the seed/offset the call drew (generated dropout, seed 0)."""
    args = dict(case.args)
    if args.get("keep_prob", 1.0) < 1.0 and args.get("dropout_mask") is None \
            and args.get("seed", 0) == 0 and args.get("offset", 0) == 0:
        args["seed"], args["offset"] = res[4], res[5]
    return args


@contextlib.contextmanager
def kernel_config(cfg: dict):
    """Flash-engine knobs for one example."""
    if _KCONFIG is None:
        yield
        return
    old = {k: _KCONFIG[k] for k in cfg if k in _KCONFIG}
    _KCONFIG.update({k: v for k, v in cfg.items() if k in _KCONFIG})
    try:
        yield
    finally:
        _KCONFIG.update(old)


kernel_configs = st.sampled_from([
    {}, {}, {},
    {"tiles": (4, 4)}, {"tiles": (8, 16)}, {"tiles": (16, 8)}, {"tiles": (5, 3)},
    {"tiles": (4, 8), "tile_bytes": 64}, {"fused_backward": False}, {"tiles": (8, 8), "fused_backward": False},
])


def check_error(e: FlashAttentionError, names: tuple, api: str) -> None:
    assert e.status in STATUSES, f"status {e.status} is not an aclnn code"
    msg = str(e)
    assert msg, "empty message"
    if names:
        spelled = [spell(api, n) for n in names]
        assert any(n in msg for n in spelled), f"message {msg!r} names none of {spelled}"


# ----------------------------------------------------------------------------------------------
# 1. Valid calls: flash == reference, forward and backward; inputs untouched.
# ----------------------------------------------------------------------------------------------
@fuzz_settings(1.0)
@given(case=valid_cases(), cfg=kernel_configs, grad=st.booleans(), data=st.data())
def test_valid_calls_match_reference(case, cfg, grad, data):
    COUNTS["valid"] += 1
    diff = ["query", "key", "value", "sink", "query_rope", "key_rope"]
    if case.geo["pse_kind"] in ("dense", "tnd"):
        diff.append("pse")
    leaves = [k for k in diff if isinstance(case.args.get(k), torch.Tensor)]
    if grad:
        for k in leaves:
            case.args[k] = case.args[k].detach().requires_grad_(True)
    snap = Snapshot(case.args)
    with warnings.catch_warnings(), no_hang(), kernel_config(cfg):
        warnings.simplefilter("ignore")
        res = call_forward(case)
        args_ref = with_seed(case, res)
        with fascore.use_engine("reference"):
            ref = call_forward(case, args_ref)
        try:
            compare_forward(case, res, ref)
        except AssertionError:
            label = known_forward_divergence(case, res, ref)
            if label is None:
                raise
            COUNTS[f"known: {label}"] += 1
            grad = False
        if grad:
            COUNTS["valid with backward"] += 1
            g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
            dy = torch.randn(res[0].shape, generator=g).to(res[0].dtype)
            ins = [case.args[k] for k in leaves]
            gf = torch.autograd.grad(res[0], ins, dy, allow_unused=True)
            with fascore.use_engine("reference"):
                gr = torch.autograd.grad(ref[0], ins, dy, allow_unused=True)
            if not case.nonfinite:
                compare_grads(case, [f"d{k}" for k in leaves], gf, gr)
    snap.verify()
    COUNTS["valid: results equal"] += 1



# ----------------------------------------------------------------------------------------------
# 2. Hostile arguments: FlashAttentionError naming the parameter, or results equal to reference.
# ----------------------------------------------------------------------------------------------
META = torch.device("meta")


def _other_float(dtype):
    return torch.float16 if dtype != torch.float16 else torch.float32


def _zero_expanded(shape, dtype):
    return torch.zeros((), dtype=dtype).expand(shape)


def mutations(case: Case) -> dict:
    """name -> function(draw) -> (args, names the message may use, must_fail)."""
    a, geo = case.args, case.geo
    layout, b, n1, n2, d, dv = geo["layout"], geo["b"], geo["n1"], geo["n2"], geo["d"], geo["dv"]
    sq, skv, dtype, mode = geo["sq"], geo["skv"], geo["dtype"], geo["mode"]
    tnd = layout == "TND"

    def shape_of(n, s, dd):
        return (s, n, dd) if tnd else layout_shape(layout, b, n, s, dd)

    def with_(**kw):
        x = dict(a)
        for k, v in kw.items():
            if v is _DROP:
                x.pop(k, None)
            else:
                x[k] = v
        return x

    m: dict = {}
    m["query dtype"] = lambda draw: (with_(query=a["query"].detach().to(draw(st.sampled_from(
        [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.float8_e4m3fn]
        if hasattr(torch, "float8_e4m3fn") else [torch.int32, torch.bool])))), ("query",), True)
    m["mixed dtypes"] = lambda draw: (with_(**{draw(st.sampled_from(["key", "value"])):
                                              a["key"].detach().to(_other_float(dtype))}), ("key", "value"), True)
    m["wrong rank"] = lambda draw: (with_(**{(w := draw(st.sampled_from(["query", "key", "value"]))):
                                             draw(st.sampled_from([a[w].unsqueeze(0), a[w].reshape(-1),
                                                                   a[w].reshape(1, 1, 1, 1, -1)]))}),
                                    ("query", "key", "value"), True)
    m["unknown layout"] = lambda draw: (with_(input_layout=draw(st.sampled_from(
        ["BHS", "xyz", "", "BSNH", "TNDD", "B S H", "bsh ", None, 3, b"BSH", ["BSH"]]))), ("input_layout",), True)
    m["head_num"] = lambda draw: (with_(head_num=draw(st.sampled_from(
        [0, -1, n1 + 1 if tnd or layout in ("BSND", "BNSD") else (n1 * d + 1), 2.0, True, "2", None, 2**70,
         torch.tensor([n1, n1]), torch.tensor(float(n1))]))), ("head_num",), True)

    def gqa(draw):
        bad = draw(st.sampled_from([x for x in (n1 + 1, 3 * n1 + 1, n1 * 2) if n1 % x]))
        return with_(key=_zero_expanded(shape_of(bad, skv, d), dtype),
                     value=_zero_expanded(shape_of(bad, skv, dv), dtype)), ("head_num", "key", "value"), True
    m["GQA ratio"] = gqa

    def big_d(draw):
        dd = draw(st.sampled_from([769, 1024, 100000]))
        return with_(query=_zero_expanded(shape_of(n1, sq, dd), dtype), key=_zero_expanded(shape_of(n2, skv, dd), dtype),
                     value=_zero_expanded(shape_of(n2, skv, dd), dtype)), ("query", "value", "D"), True
    m["D > 768"] = big_d
    m["Dv > D"] = lambda draw: (with_(value=_zero_expanded(shape_of(n2, skv, d + 1), dtype)), ("value",), True)
    m["zero-size"] = lambda draw: (with_(**{(w := draw(st.sampled_from(["query", "key", "value"]))):
                                            a[w].detach()[(slice(None),) * draw(st.integers(0, a[w].dim() - 1)) + (slice(0, 0),)]}),
                                   ("query", "key", "value"), True)

    def kv_mismatch(draw):
        if tnd:
            return with_(value=_zero_expanded((a["value"].shape[0] + 1, n2, dv), dtype)), ("key", "value"), True
        return with_(key=_zero_expanded(shape_of(n2, skv + 1, d), dtype)), ("key", "value"), True
    m["key/value mismatch"] = kv_mismatch
    if not tnd:
        m["batch mismatch"] = lambda draw: (with_(
            key=_zero_expanded(layout_shape(layout, b + 1, n2, skv, d), dtype),
            value=_zero_expanded(layout_shape(layout, b + 1, n2, skv, dv), dtype)), ("key",), True)
    m["pre/next"] = lambda draw: (with_(**{draw(st.sampled_from(["pre_tokens", "next_tokens"])): draw(st.sampled_from(
        [I32MAX + 1, I32MIN - 1, 2**40, -(2**63), 1.5, None, "3", True, torch.tensor([1, 2]), torch.tensor(0.5),
         -5, -40, I32MIN, 0, torch.tensor(3)]))}), ("pre_tokens", "next_tokens"), False)
    if a.get("atten_mask") is not None and mode in (0, 4, 7, 8):
        m["pre/next both negative"] = lambda draw: (with_(pre_tokens=-draw(st.integers(1, 50)),
                                                          next_tokens=-draw(st.integers(1, 50))),
                                                    ("pre_tokens", "next_tokens"),
                                                    mode == 0 and any(x > 0 for x, _ in geo["geoms"]))
    m["sparse_mode"] = lambda draw: (with_(sparse_mode=draw(st.sampled_from(
        [-1, 9, 100, 2**40, 1.0, None, "0", True] + ([5] if tnd else [7, 8])))), ("sparse_mode",), True)

    def bad_mask(draw):
        choices = [torch.zeros(sq + 1, skv, dtype=torch.bool), torch.zeros(1, sq, skv, dtype=torch.bool),
                   torch.zeros(b + 1, 1, sq, skv, dtype=torch.bool), torch.zeros(sq, dtype=torch.bool),
                   torch.zeros(sq, skv, dtype=torch.float32), torch.zeros(sq, skv, dtype=torch.int32), 1, [[0]],
                   torch.zeros((), dtype=torch.bool), torch.zeros(2048, 2047, dtype=torch.bool),
                   torch.zeros(3072, 2048, dtype=torch.bool)]
        if mode in (2, 3, 4, 6, 7, 8):
            flipped = compressed(3072 if mode == 6 else 2048).clone()
            i = draw(st.integers(0, flipped.shape[0] - 1))
            j = draw(st.integers(0, 2047))
            flipped[i, j] = ~flipped[i, j]
            choices += [flipped, compressed(2048 if mode == 6 else 3072),
                        torch.zeros(1, 1, 2048, 2048, dtype=torch.bool).expand(2, 1, 2048, 2048)]
        return with_(atten_mask=draw(st.sampled_from(choices)), sparse_mode=mode), ("atten_mask",), True
    m["atten_mask"] = bad_mask

    if mode in (5, 6) and a.get("atten_mask") is not None:
        def bad_prefix(draw):
            pf = list(a["prefix"].tolist() if isinstance(a["prefix"], torch.Tensor) else a["prefix"])
            k = draw(st.integers(0, len(pf) - 1))
            kind = draw(st.sampled_from(["long", "short", "high", "low", "none", "float", "str", "2d"]))
            if kind == "long":
                pf = pf + [0]
            elif kind == "short":
                pf = pf[:-1]
            elif kind == "high":
                pf[k] = (geo["geoms"][k][1] if tnd and k < len(geo["geoms"]) else skv) + draw(st.integers(1, 2**40))
                if tnd and k >= len(geo["geoms"]):
                    return with_(prefix=pf), ("prefix",), False
            elif kind == "low":
                pf[k] = -draw(st.integers(1, 2**40))
                if tnd and k >= len(geo["geoms"]):
                    return with_(prefix=pf), ("prefix",), False
            elif kind == "none":
                pf = None
            elif kind == "float":
                pf[k] = pf[k] + 0.5
            elif kind == "str":
                pf = "1"
            else:
                pf = torch.tensor([pf])
            return with_(prefix=pf), ("prefix",), True
        m["prefix"] = bad_prefix

    if tnd:
        def bad_seqlen(draw):
            which = draw(st.sampled_from(["actual_seq_qlen", "actual_seq_kvlen"]))
            other = "actual_seq_kvlen" if which == "actual_seq_qlen" else "actual_seq_qlen"
            cum = list(a[which].tolist() if isinstance(a[which], torch.Tensor) else a[which])
            total = a["query" if which == "actual_seq_qlen" else "key"].shape[0]
            kind = draw(st.sampled_from(["decrease", "overflow", "mismatch", "negative", "none", "empty",
                                         "too many", "float", "2d", "str"]))
            names: tuple = (which,)
            if kind == "decrease":  # [1, 0, 1]: not trailing padding
                return with_(**{which: [1, 0, 1], other: [0, 0, 0]}), names, True
            if kind == "overflow":
                cum[-1] = total + draw(st.integers(1, 100))
                if cum[-1] == 0:
                    cum[-1] = total + 1
            elif kind == "mismatch":
                cum = cum + [cum[-1]]
                names = ("actual_seq_qlen", "actual_seq_kvlen")
            elif kind == "negative":
                cum[0] = -draw(st.integers(1, 10))
            elif kind == "none":
                cum = None
                names = ("actual_seq_qlen", "actual_seq_kvlen")
            elif kind == "empty":
                cum = []
            elif kind == "too many":
                cum = cum + [cum[-1]] * 2048
            elif kind == "float":
                cum = [float(x) + 0.5 for x in cum]
            elif kind == "2d":
                cum = torch.tensor([cum])
            else:
                cum = "1,2"
            return with_(**{which: cum}), names, True
        m["TND lengths"] = bad_seqlen
    else:
        m["lengths without TND"] = lambda draw: (with_(**{draw(st.sampled_from(["actual_seq_qlen", "actual_seq_kvlen"])): [sq]}),
                                                 ("actual_seq_qlen", "actual_seq_kvlen"), True)

    def bad_pse(draw):
        if geo["pse_kind"] == "slopes":
            kind = draw(st.sampled_from(["dtype", "shape", "none", "int"]))
            pse = {"dtype": a["pse"].to(torch.float64), "shape": torch.zeros(n1 + 1), "none": None, "int": 2}[kind]
            return with_(pse=pse), ("pse",), True
        base = (b, n1, sq, skv) if not tnd else (b, n1, 1024, 1 + max((y for _, y in geo["geoms"]), default=0))
        shapes = [(b, n1, sq), (b, n1 + 1) + base[2:], base[:3] + (base[3] + 1,), (b + 1,) + base[1:],
                  (b, n1, 2, base[3]) if base[2] != 2 else (b, n1, 3, base[3]), ()]
        kind = draw(st.sampled_from(["shape", "shape", "dtype", "int", "list"]))
        if kind == "shape":
            pse = _zero_expanded(draw(st.sampled_from(shapes)), dtype)
        elif kind == "dtype":
            pse = torch.zeros(base[:2] + (1, base[3]), dtype=_other_float(dtype))
        elif kind == "int":
            pse = 1.0
        else:
            pse = [0.0]
        return with_(pse=pse), ("pse",), True
    m["pse"] = bad_pse
    if case.api == "v2" and not tnd:
        def slopes_sq_skv(draw):
            k2 = _zero_expanded(layout_shape(layout, b, n2, sq + 1, d), dtype)
            v2 = _zero_expanded(layout_shape(layout, b, n2, sq + 1, dv), dtype)
            return with_(key=k2, value=v2, pse=torch.ones(n1), pse_type=draw(st.sampled_from([2, 3])),
                         atten_mask=_DROP, sparse_mode=0, query_rope=_DROP, key_rope=_DROP,
                         dropout_mask=_DROP, prefix=_DROP), ("pse_type",), True
        m["slopes with Sq != Skv"] = slopes_sq_skv
        m["pse_type"] = lambda draw: (with_(pse_type=draw(st.sampled_from([-1, 4, 1.0, None, "1", 2**40]))),
                                      ("pse_type",), True)
        m["rope"] = lambda draw: (with_(**draw(st.sampled_from([
            {"query_rope": a["query"], "key_rope": _DROP},
            {"query_rope": _DROP, "key_rope": a["key"]},
            {"query_rope": a["query"].detach().to(_other_float(dtype)), "key_rope": a["key"].detach().to(_other_float(dtype))},
            {"query_rope": a["query"].detach()[..., :0], "key_rope": a["key"].detach()[..., :0]},
            {"query_rope": 1, "key_rope": 2},
            {"query_rope": a["query"].detach().unsqueeze(0), "key_rope": a["key"].detach()},
        ]))), ("query_rope", "key_rope"), True)
        m["start idx"] = lambda draw: (with_(**{draw(st.sampled_from(["q_start_idx", "kv_start_idx"])): draw(st.sampled_from(
            [[], "x", [2**40], [[1]], 1.5, [1.5], torch.tensor([[1]]), torch.tensor([0.5])]))}),
            ("q_start_idx", "kv_start_idx"), True)
    m["keep_prob"] = lambda draw: (with_(keep_prob=draw(st.sampled_from(
        [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf"), -float("inf"), None, "0.5", True,
         torch.tensor(0.5), 1j]))), ("keep_prob",), True)

    def bad_dropmask(draw):
        numels = geo["numels"]
        need = -(-numels // 8)
        kind = draw(st.sampled_from(["short", "dtype", "list", "int"] if need > 0 else ["dtype", "list", "int"]))
        dm = {"short": lambda: torch.zeros(need - 1, dtype=torch.uint8),
              "dtype": lambda: torch.zeros(need + 1, dtype=draw(st.sampled_from(
                  [torch.bool, torch.int8, torch.float32, torch.int32]))),
              "list": lambda: [255] * (need + 1), "int": lambda: 255}[kind]()
        return with_(dropout_mask=dm, keep_prob=0.5), ("dropout_mask",), True
    m["dropout_mask"] = bad_dropmask
    m["sink"] = lambda draw: (with_(sink=draw(st.sampled_from(
        [torch.zeros(n1 + 1), torch.zeros(1, n1), torch.zeros(()), torch.zeros(n1, dtype=torch.float64),
         torch.zeros(n1, dtype=torch.float16), 0.5, [0.0] * n1]))), ("sink",), True)
    m["scale"] = lambda draw: (with_(scale=draw(st.sampled_from(
        [float("nan"), float("inf"), -float("inf"), 1e300, -1e39, None, "1", torch.tensor(1.0), 1j, True]))), ("scale",), True)
    m["softmax_layout"] = lambda draw: (with_(softmax_layout=draw(st.sampled_from(
        ["BSH", 3, None, "T N D", "TND" if not tnd else "BNSD"]))), ("softmax_layout",), True)
    m["inner_precise"] = lambda draw: (with_(inner_precise=draw(st.sampled_from([-1, 4, 2**40, 1.5, None, "0"]))),
                                       ("inner_precise",), True)
    m["padding_mask"] = lambda draw: (with_(padding_mask=draw(st.sampled_from([torch.zeros(1), 0, []]))),
                                      ("padding_mask",), True)
    m["seed/offset"] = lambda draw: (with_(**draw(st.sampled_from([
        {"seed": 1.5}, {"seed": "1"}, {"seed": None}, {"offset": -1}, {"offset": 2**63}, {"offset": 1.5},
        {"offset": None}]))), ("seed", "offset"), True)

    def other_device(draw):
        cands = [k for k in ("key", "value", "pse", "atten_mask", "sink", "dropout_mask", "query_rope", "key_rope",
                             "actual_seq_qlen", "actual_seq_kvlen", "prefix") if isinstance(a.get(k), torch.Tensor)]
        w = draw(st.sampled_from(cands))
        t = a[w]
        ignored = (w == "dropout_mask" and a.get("keep_prob", 1.0) >= 1.0) or \
            (w == "prefix" and not (mode in (5, 6) and a.get("atten_mask") is not None))
        return with_(**{w: torch.empty(t.shape, dtype=t.dtype, device=META)}), (w,), not ignored
    m["other device"] = other_device
    m["all on meta"] = lambda draw: (with_(query=torch.empty(a["query"].shape, dtype=dtype, device=META),
                                           key=torch.empty(a["key"].shape, dtype=dtype, device=META),
                                           value=torch.empty(a["value"].shape, dtype=dtype, device=META)),
                                     ("query", "key", "value"), True)
    m["sparse tensor"] = lambda draw: (with_(**{(w := draw(st.sampled_from(["query", "key", "value"]))):
                                                a[w].detach().to_sparse()}), (w,), True)
    def not_a_tensor(draw):
        w = draw(st.sampled_from(["query", "key", "value"]))
        t = a[w].detach()
        numpy = t.numpy() if t.dtype in (torch.float32, torch.float64) else "q"
        return with_(**{w: draw(st.sampled_from([None, 3, 1.5, [1.0], t.tolist()[:1], numpy]))}), (w,), True
    m["not a tensor"] = not_a_tensor
    return m


class _Drop:
    pass


_DROP = _Drop()


# mutation -> what the valid case it starts from must have (valid_cases keywords)
MUTATIONS = {
    "query dtype": {}, "mixed dtypes": {}, "wrong rank": {}, "unknown layout": {}, "head_num": {},
    "GQA ratio": {}, "D > 768": {}, "Dv > D": {}, "zero-size": {}, "key/value mismatch": {},
    "batch mismatch": {"tnd": False}, "pre/next": {},
    "pre/next both negative": {"modes": (0, 4, 7, 8), "mask": True},
    "sparse_mode": {}, "atten_mask": {}, "prefix": {"modes": (5, 6), "mask": True},
    "TND lengths": {"tnd": True}, "lengths without TND": {"tnd": False}, "pse": {},
    "slopes with Sq != Skv": {"api": "v2", "tnd": False}, "pse_type": {"api": "v2", "tnd": False},
    "rope": {"api": "v2", "tnd": False}, "start idx": {"api": "v2", "tnd": False}, "keep_prob": {},
    "dropout_mask": {"tnd": False}, "sink": {}, "scale": {}, "softmax_layout": {}, "inner_precise": {},
    "padding_mask": {}, "seed/offset": {}, "other device": {}, "all on meta": {}, "sparse tensor": {},
    "not a tensor": {},
}
PER_MUTATION = max(2, 3 * N_EXAMPLES // len(MUTATIONS))


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_hostile_arguments(mutation):
    @settings(FUZZ, max_examples=PER_MUTATION)
    @given(case=valid_cases(nonfinite=False, **MUTATIONS[mutation]), data=st.data())
    def run(case, data):
        muts = mutations(case)
        assert mutation in muts, f"the generator did not satisfy {MUTATIONS[mutation]}"
        hostile_call(case, mutation, *muts[mutation](data.draw))
    run()


def hostile_call(case: Case, name: str, args: dict, names: tuple, must_fail: bool) -> None:
    COUNTS["hostile"] += 1
    snap = Snapshot(args)
    with warnings.catch_warnings(), no_hang(), kernel_config({}):
        warnings.simplefilter("ignore")
        try:
            res = call_forward(case, args)
        except FlashAttentionError as e:
            if args.get("query") is None or args.get("key") is None or args.get("value") is None:
                assert e.status == fascore.ACLNN_ERR_PARAM_NULLPTR, f"{name}: None tensor -> status {e.status}"
            check_error(e, names, case.api)
            COUNTS[f"hostile: FlashAttentionError {e.status}"] += 1
        else:
            assert not must_fail, f"{name}: the call succeeded; expected FlashAttentionError naming {names}"
            with fascore.use_engine("reference"):
                ref = call_forward(case, with_seed(Case(case.api, args, case.geo), res))
            compare_forward(case, res, ref)
            COUNTS["hostile: accepted, equal to reference"] += 1
    snap.verify()


# ----------------------------------------------------------------------------------------------
# 3. The grad entry points: valid (flash == reference) and hostile statistics / dy / numels.
# ----------------------------------------------------------------------------------------------
def call_grad(case: Case, args: dict, extra: dict):
    a = dict(args)
    pos = [a.pop(k) for k in ("query", "key", "value")]
    pos += [extra.pop("dy"), a.pop("head_num"), a.pop("input_layout")]
    api = "grad_v1" if case.api == "v1" else "grad_v2"
    kw = {spell(api, k): v for k, v in {**a, **extra}.items()}
    if case.api == "v1":
        return fascore.npu_fusion_attention_grad(*pos, **kw)
    return fascore.npu_fusion_attention_grad_v2(*pos, **kw)


@fuzz_settings(1.0)
@given(case=valid_cases(nonfinite=False), cfg=kernel_configs, data=st.data())
def test_grad_entry_points(case, cfg, data):
    COUNTS["grad op"] += 1
    with warnings.catch_warnings(), no_hang(), kernel_config(cfg):
        warnings.simplefilter("ignore")
        res = call_forward(case)
        args = with_seed(case, res)
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        dy = torch.randn(res[0].shape, generator=g).to(res[0].dtype)
        extra = {"dy": dy, "softmax_max": res[1], "softmax_sum": res[2], "attention_in": res[0],
                 "numels": data.draw(st.sampled_from([0, res[6]]))}
        kind = data.draw(st.sampled_from(["valid", "valid", "dy", "softmax_max", "softmax_sum", "attention_in",
                                          "numels"]))
        names: tuple = ()
        if kind != "valid":
            names = (kind,)
            t = extra[kind]
            if kind == "numels":
                extra["numels"] = data.draw(st.sampled_from([res[6] + 1, -1, 1.5, True, None, "0"]))
            else:
                extra[kind] = data.draw(st.sampled_from([
                    None, 0, t.unsqueeze(0), t.to(_other_float(t.dtype)),
                    torch.zeros(t.shape[:-1] + (t.shape[-1] + 1,), dtype=t.dtype),
                    torch.empty(t.shape, dtype=t.dtype, device=META)]))
        snap = Snapshot({**args, **extra})
        try:
            got = call_grad(case, args, dict(extra))
        except FlashAttentionError as e:
            assert kind != "valid", f"valid grad call raised {e}"
            check_error(e, names, case.api)
            if extra.get(kind, 0) is None and kind != "numels":
                assert e.status == fascore.ACLNN_ERR_PARAM_NULLPTR
            COUNTS[f"grad op: FlashAttentionError {e.status}"] += 1
        else:
            assert kind == "valid", f"grad op accepted a bad {kind}"
            with fascore.use_engine("reference"):
                want = call_grad(case, args, dict(extra))
            assert len(got) == len(want)
            compare_grads(case, [f"grad output {i}" for i in range(len(got))], got, want)
            COUNTS["grad op: equal to reference"] += 1
        snap.verify()


# ----------------------------------------------------------------------------------------------
# 4. aclnn: status codes only, the same verdicts as the torch-style API, outputs in place.
# ----------------------------------------------------------------------------------------------
ACLNN_ORDER = ["query", "key", "value", "pse", "dropout_mask", "padding_mask", "atten_mask", "prefix",
               "q_start_idx", "kv_start_idx", "scale", "keep_prob", "pre_tokens", "next_tokens", "head_num",
               "input_layout", "inner_precise", "sparse_mode", "pse_type"]
ACLNN_DEFAULTS = {"pse": None, "dropout_mask": None, "padding_mask": None, "atten_mask": None, "prefix": None,
                  "q_start_idx": None, "kv_start_idx": None, "scale": 1.0, "keep_prob": 1.0, "pre_tokens": I32MAX,
                  "next_tokens": I32MAX, "inner_precise": 0, "sparse_mode": 0, "pse_type": 1}


@fuzz_settings(1.0)
@given(case=valid_cases(api="v2", tnd=False, nonfinite=False), data=st.data())
def test_aclnn_status_codes(case, data):
    COUNTS["aclnn"] += 1
    for k in ("sink", "query_rope", "key_rope", "softmax_layout", "seed", "offset", "actual_seq_qlen", "actual_seq_kvlen"):
        case.args.pop(k, None)
    if case.args.get("keep_prob", 1.0) < 1.0 and case.args.get("dropout_mask") is None:
        case.args["keep_prob"] = 1.0  # no dropout at the aclnn layer without a mask
    args = dict(case.args)
    if data.draw(st.booleans()):
        muts = mutations(case)
        for drop in ("sink", "TND lengths", "lengths without TND", "rope", "softmax_layout", "seed/offset"):
            muts.pop(drop, None)
        name = data.draw(st.sampled_from(sorted(muts)), label="mutation")
        args = muts[name](data.draw)[0]
        if args.get("keep_prob", 1.0) is not None and isinstance(args.get("keep_prob"), float) \
                and 0 < args["keep_prob"] < 1 and args.get("dropout_mask") is None:
            args["keep_prob"] = 1.0
    with warnings.catch_warnings(), no_hang(), kernel_config({}):
        warnings.simplefilter("ignore")
        try:
            want = call_forward(case, args)
            want_status = 0
        except FlashAttentionError as e:
            want, want_status = None, e.status
        geo = case.geo
        if want is not None:
            out = torch.full_like(want[0], 7.0)
            smax, ssum = torch.full_like(want[1], 7.0), torch.full_like(want[2], 7.0)
        else:
            oshape = layout_shape(geo["layout"], geo["b"], geo["n1"], geo["sq"], geo["dv"])
            out = torch.zeros(oshape, dtype=geo["dtype"])
            smax = torch.zeros(geo["b"], geo["n1"], geo["sq"], 8)
            ssum = torch.zeros_like(smax)
        full = {**ACLNN_DEFAULTS, **args}
        snap = Snapshot(full)
        pos = [full[k] for k in ACLNN_ORDER]
        st1, ws, ex = aclnn.aclnnFlashAttentionScoreV2GetWorkspaceSize(*pos, smax, ssum, None, out)
        assert isinstance(st1, int)
        if st1 == 0:
            assert isinstance(ws, int) and ws >= 0 and ex is not None
            workspace = torch.empty(ws, dtype=torch.uint8) if ws else None
            st2 = aclnn.aclnnFlashAttentionScoreV2(workspace, ws, ex, None)
            assert st2 == 0, aclnn.get_recent_err_msg()
            assert aclnn.aclnnFlashAttentionScoreV2(workspace, ws, ex, None) == fascore.ACLNN_ERR_RUNTIME_ERROR
        else:
            assert st1 in STATUSES and ex is None and aclnn.get_recent_err_msg()
        assert st1 == want_status, (f"aclnn status {st1} ({aclnn.get_recent_err_msg()!r}) != torch-style "
                                    f"status {want_status}")
        if want is not None:
            compare_forward(case, (out, smax, ssum) + tuple(want[3:]), want)
        COUNTS[f"aclnn: status {st1}"] += 1
    snap.verify()


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def test_zz_fuzz_report(capsys):
    """Prints (and optionally writes) how many cases the fuzz tests above tried."""
    total = COUNTS["valid"] + COUNTS["hostile"] + COUNTS["grad op"] + COUNTS["aclnn"]
    lines = [f"fascore fuzz: {total} cases (FASCORE_FUZZ_EXAMPLES={N_EXAMPLES})"]
    lines += [f"  {k}: {v}" for k, v in sorted(COUNTS.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    path = os.environ.get("FASCORE_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"total": total, **COUNTS}, f, indent=1, sort_keys=True)
    if COUNTS["valid"]:  # the fuzz tests ran in this session
        assert total >= N_EXAMPLES
