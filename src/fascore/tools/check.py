"""``fascore check``: a conformance run of the installed fascore against its float64 reference.

Every case runs the operator (the current engine, on the chosen device) forward and, for most,
backward through autograd, and compares with fascore's dense reference engine on CPU in float64
(``ref64``), under semantics §7's rules: for attention_out and the gradients
``max|fascore - ref64| <= factor * max|ref_same - ref64| + eps`` with ``ref_same`` the reference
engine on the same inputs in the input dtype (float32 logits), factor 2 for outputs and 3 for
gradients, eps one unit of the dtype's rounding at 1.0 (fp32 1e-5) scaled by
``max(1, max|ref64|)``; at most 0.5 % of attention_out's elements beyond
max(0.005 |ref64|, 2.5e-5); softmax_max / softmax_sum at float32 level per element (1e-5 / 1e-4
relative) whatever the input dtype. Invalid-row sentinels (+-FLT_MAX) must match exactly.

The cases cover layouts x sparse modes x pse types x dtypes x dropout x TND x GQA (plus sink,
rope, invalid rows, softmax_layout, the v1 spelling, and error codes). ``quick`` is the CI
subset; the full run adds random combinations and longer sequences.

    results = fascore.tools.check.run(fascore.tools.check.cases(quick=True))
    fascore.tools.check.feature_table(results)   # [(feature, n, n_failed, worst)]
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

import fascore

from .. import engines as _engine
from ..errors import FlashAttentionError
from ..rng.generator import DEFAULT_SEED as DEFAULT_NPU_SEED, default_generator

__all__ = ["Spec", "Check", "Result", "cases", "run", "run_case", "run_errors", "feature_table", "compare",
           "compare_stats", "compare_golden", "make_inputs", "case_inputs", "snippet"]

FLT_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1
SEED_STRIDE = 1_000_003  # --seed s shifts data seeds and generator seeds by s * SEED_STRIDE
EPS = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-12}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# --------------------------------------------------------------------------- case description
@dataclass
class Spec:
    """One conformance case (v2 spellings). TND: ``seqs`` are per-batch (Sq_b, Skv_b)."""

    name: str = ""
    layout: str = "BSH"
    dtype: torch.dtype = torch.float32
    b: int = 2
    n1: int = 4
    n2: int = 4
    sq: int = 24
    skv: int = 24
    d: int = 16
    dv: int | None = None
    seqs: tuple[tuple[int, int], ...] = ()
    pad_q: int = 0
    pad_kv: int = 0
    mode: int = 0
    mask: str = "none"  # none | full | compressed (modes 2/3/4/6/7/8 always compressed)
    mask_dtype: torch.dtype = torch.bool
    full_row_masked: bool = False  # mode 0/1/5: mask a whole query row (invalid row)
    pre: int = INT32_MAX
    nxt: int = INT32_MAX
    prefix: tuple[int, ...] = ()
    pse: str = "none"  # none | full | full1 | row | tnd | compressed | slopes | slopes_b
    pse_type: int = 1
    start_idx: tuple[int, int] | None = None
    keep_prob: float = 1.0
    drop: str = "seed"  # seed (generated Philox; 0 = drawn) | mask (explicit bit-packed)
    seed: int = 0
    sink: bool = False
    rope: int = 0
    softmax_layout: str = ""
    api: str = "v2"
    backward: bool = True
    data_seed: int = 0
    npu_seed: int = 0  # the emulated NPU generator's seed for this case (seed == 0 dropout draws from it)

    @property
    def tnd(self) -> bool:
        return self.layout == "TND"

    def features(self) -> list[str]:
        f = [f"layout {self.layout}", f"dtype {DTYPE_NAMES[self.dtype]}", f"sparse_mode {self.mode}"]
        f.append("pse none" if self.pse == "none" else f"pse_type {self.pse_type}" +
                 (" compressed" if self.pse in ("tnd", "compressed") else ""))
        if self.keep_prob < 1:
            f.append("dropout " + ("explicit mask" if self.drop == "mask" else "Philox"))
        if self.n1 != self.n2:
            f.append("GQA/MQA")
        if self.sink:
            f.append("sink")
        if self.rope:
            f.append("rope")
        if self.full_row_masked:
            f.append("invalid rows")
        if self.softmax_layout:
            f.append("softmax_layout TND")
        if self.api == "v1":
            f.append("v1 signature")
        if (not self.tnd and self.sq != self.skv) or any(a != b for a, b in self.seqs):
            f.append("Sq != Skv")
        f.append("backward" if self.backward else "forward only")
        return f


@dataclass
class Check:
    quantity: str
    err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol  # NaN fails


@dataclass
class Result:
    name: str
    features: list[str]
    checks: list[Check] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    skipped: str = ""  # why the forced engine cannot run the case (a declared limit, not a failure)

    @property
    def ok(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)

    def worst(self) -> Check | None:
        def ratio(c: Check) -> float:
            return math.inf if not c.ok else c.err / c.tol if c.tol > 0 else 0.0
        return max(self.checks, key=ratio, default=None)


# --------------------------------------------------------------------------- inputs
def _causal2048() -> Tensor:
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def _prefix3072() -> Tensor:
    lower = torch.cat([torch.zeros(1024, 1024, dtype=torch.bool), torch.ones(1024, 1024, dtype=torch.bool)], 1)
    return torch.cat([_causal2048(), lower], 0)


def _shape(layout: str, b: int, n: int, s: int, d: int) -> tuple[int, ...]:
    return {"BSH": (b, s, n * d), "SBH": (s, b, n * d), "BSND": (b, s, n, d), "BNSD": (b, n, s, d)}[layout]


def _cum(xs: Iterable[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def make_inputs(s: Spec) -> dict[str, Any]:
    """The case's arguments (v2 keywords) as CPU tensors; float tensors in float32 for now."""
    g = torch.Generator().manual_seed(s.data_seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    dv = s.dv or s.d
    kw: dict[str, Any] = {"head_num": s.n1, "input_layout": s.layout}
    if s.tnd:
        cq, ck = _cum(a for a, _ in s.seqs), _cum(b for _, b in s.seqs)
        t1, t2 = cq[-1] + s.pad_q, ck[-1] + s.pad_kv
        kw.update(query=rnd(t1, s.n1, s.d), key=rnd(t2, s.n2, s.d), value=rnd(t2, s.n2, dv),
                  actual_seq_qlen=cq, actual_seq_kvlen=ck)
        if s.rope:
            kw.update(query_rope=rnd(t1, s.n1, s.rope), key_rope=rnd(t2, s.n2, s.rope))
        b, max_sq, max_skv = len(s.seqs), max(a for a, _ in s.seqs), max(b_ for _, b_ in s.seqs)
    else:
        kw.update(query=rnd(*_shape(s.layout, s.b, s.n1, s.sq, s.d)),
                  key=rnd(*_shape(s.layout, s.b, s.n2, s.skv, s.d)),
                  value=rnd(*_shape(s.layout, s.b, s.n2, s.skv, dv)))
        if s.rope:
            kw.update(query_rope=rnd(*_shape(s.layout, s.b, s.n1, s.sq, s.rope)),
                      key_rope=rnd(*_shape(s.layout, s.b, s.n2, s.skv, s.rope)))
        b, max_sq, max_skv = s.b, s.sq, s.skv
    kw["scale"] = 1.0 / math.sqrt(s.d + s.rope)
    if s.mode:
        kw["sparse_mode"] = s.mode
    if s.mode in (2, 3, 4, 7, 8):
        kw["atten_mask"] = _causal2048()
    elif s.mode == 6:
        kw["atten_mask"] = _prefix3072()
    elif s.mask == "full" or s.mode in (1, 5):
        if s.tnd:
            shape: tuple[int, ...] = (max_sq, max_skv)
        elif s.mode == 5 and s.b > 1:
            shape = (s.b, 1, s.sq, s.skv)
        else:
            shape = (s.sq, s.skv)
        m = torch.rand(*shape, generator=g) < 0.25
        if s.full_row_masked:
            m[..., min(3, shape[-2] - 1), :] = True
        kw["atten_mask"] = m.to(s.mask_dtype)
    if s.pre != INT32_MAX:
        kw["pre_tokens"] = s.pre
    if s.nxt != INT32_MAX:
        kw["next_tokens"] = s.nxt
    if s.prefix:
        kw["prefix"] = list(s.prefix)
    if s.pse in ("full", "full1", "row", "compressed"):
        rows = {"full": s.sq, "full1": s.sq, "row": 1, "compressed": 1024}[s.pse]
        kw["pse"] = rnd(1 if s.pse == "full1" else b, s.n1, rows, s.skv, scale=0.5)
    elif s.pse == "tnd":
        kw["pse"] = rnd(b, s.n1, 1024, max_skv, scale=0.5)
    elif s.pse in ("slopes", "slopes_b"):
        kw["pse"] = (torch.rand(*((b, s.n1) if s.pse == "slopes_b" else (s.n1,)), generator=g) * 0.4 + 0.05)
    if s.pse != "none":
        kw["pse_type"] = s.pse_type
    if s.start_idx is not None:
        kw["q_start_idx"], kw["kv_start_idx"] = [s.start_idx[0]], [s.start_idx[1]]
    if s.keep_prob < 1:
        kw["keep_prob"] = s.keep_prob
        if s.drop == "mask":
            numels = s.n1 * (sum(a * b_ for a, b_ in s.seqs) if s.tnd else s.b * s.sq * s.skv)
            kw["dropout_mask"] = torch.randint(0, 256, (-(-numels // 8),), generator=g, dtype=torch.uint8)
        else:
            kw["seed"] = s.seed
    if s.sink:
        kw["sink"] = rnd(s.n1)
    if s.softmax_layout:
        kw["softmax_layout"] = s.softmax_layout
    return kw


_FOLLOW_DTYPE = ("query", "key", "value", "query_rope", "key_rope")


def _place(s: Spec, kw: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in kw.items():
        if isinstance(v, Tensor):
            if k in _FOLLOW_DTYPE or (k == "pse" and s.pse_type in (0, 1)):
                v = v.to(dtype)
            v = v.to(device)
        out[k] = v
    return out


def case_inputs(s: Spec, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The case's arguments (v2 keywords, canonical names) as the check passes them: query, key,
    value, rope and a type 0/1 pse in ``dtype`` (default: the case's), on ``device``."""
    return _place(s, make_inputs(s), dtype or s.dtype, torch.device(device))


def _wrt(s: Spec) -> list[str]:
    names = ["query", "key", "value"]
    if s.pse != "none" and s.pse_type in (0, 1):
        names.append("pse")
    if s.sink:
        names.append("sink")
    if s.rope:
        names += ["query_rope", "key_rope"]
    return names


def _call(api: str, kw: dict[str, Any]) -> tuple:
    kw = dict(kw)
    args = [kw.pop(n) for n in ("query", "key", "value", "head_num", "input_layout")]
    if api == "v1":
        kw = {{"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"}.get(k, k): v for k, v in kw.items()}
        kw.pop("pse_type", None)
        return fascore.npu_fusion_attention(*args, **kw)
    return fascore.npu_fusion_attention_v2(*args, **kw)


# --------------------------------------------------------------------------- comparison
def compare(quantity: str, lib: Tensor, ref: Tensor, same: Tensor, dtype: torch.dtype, factor: float) -> Check:
    """semantics §7's rule for an output or gradient: max|lib - ref64| <= factor * max|ref_same - ref64|
    + eps; sentinels of ref (+-FLT_MAX) must match exactly."""
    if tuple(lib.shape) != tuple(ref.shape):
        return Check(f"{quantity} shape {tuple(lib.shape)} != {tuple(ref.shape)}", math.inf, 0.0)
    lib64 = lib.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    nv = same.detach().to("cpu", torch.float64)
    sentinel = ref64.abs() == FLT_MAX
    if bool(((lib64 != ref64) & sentinel).any()):
        return Check(f"{quantity} (invalid-row sentinels)", math.inf, 0.0)
    rest = ~sentinel
    if not bool(rest.any()):
        return Check(quantity, 0.0, 0.0)
    err = (lib64 - ref64)[rest].abs().max().item()
    err_nv = (nv - ref64)[rest].abs().max().item()
    if math.isnan(err):
        return Check(quantity + " (NaN)", math.inf, 0.0)
    scale = max(1.0, ref64[rest].abs().max().item())
    return Check(quantity, err, factor * err_nv + EPS[dtype] * scale)


STATS_REL = {"softmax_max": 1e-5, "softmax_sum": 1e-4}


def compare_stats(quantity: str, lib: Tensor, ref: Tensor) -> Check:
    """semantics §7 for a statistic, any input dtype: per element |x - ref64| <= 1e-5 * max(1, |ref64|)
    (softmax_max) or <= 1e-4 * ref64 (softmax_sum); reported as the worst ratio to that bound."""
    if tuple(lib.shape) != tuple(ref.shape):
        return Check(f"{quantity} shape {tuple(lib.shape)} != {tuple(ref.shape)}", math.inf, 0.0)
    lib64 = lib.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    sentinel = ref64.abs() == FLT_MAX
    if bool(((lib64 != ref64) & sentinel).any()):
        return Check(f"{quantity} (invalid-row sentinels)", math.inf, 0.0)
    if bool(torch.isnan(lib64).any()):
        return Check(quantity + " (NaN)", math.inf, 0.0)
    bound = STATS_REL[quantity] * (ref64.abs().clamp(min=1.0) if quantity == "softmax_max" else ref64.abs())
    err = (lib64 - ref64).abs().masked_fill(sentinel, 0.0)
    over = torch.where(bound > 0, err / bound.clamp(min=1e-300), torch.where(err > 0, math.inf, 0.0))
    return Check(quantity + " (float32 level)", over.max().item() if over.numel() else 0.0, 1.0)


def compare_golden(quantity: str, lib: Tensor, ref: Tensor) -> Check:
    """semantics §7's golden criterion: the fraction of elements with |lib - ref64| > max(0.005 |ref64|,
    2.5e-5) is at most 0.5 %."""
    lib64 = lib.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if ref64.numel() == 0:
        return Check(quantity + " (golden 0.5 %)", 0.0, 0.005)
    off = (lib64 - ref64).abs() > torch.clamp(0.005 * ref64.abs(), min=2.5e-5)
    return Check(quantity + " (golden 0.5 %)", off.double().mean().item(), 0.005)


def _forward_backward(s: Spec, kw: dict[str, Any], dy: Tensor | None) -> tuple[tuple, dict[str, Tensor]]:
    wrt = _wrt(s) if s.backward and dy is not None else []
    kw = dict(kw)
    leaves = []
    for n in wrt:
        kw[n] = kw[n].detach().clone().requires_grad_(True)
        leaves.append(kw[n])
    res = _call(s.api, kw)
    if not wrt:
        return res, {}
    grads = torch.autograd.grad(res[0], leaves, dy.to(res[0].device, res[0].dtype))
    return res, dict(zip(wrt, grads))


def run_case(s: Spec, device: torch.device, engine: str | None = None) -> Result:
    """Run one case: fascore (``engine`` or the default) on ``device`` against ref64 / ref_same on CPU."""
    r = Result(s.name, s.features())
    t0 = time.perf_counter()
    gen = default_generator(device)
    state = gen.get_state()
    try:
        gen.manual_seed(s.npu_seed or DEFAULT_NPU_SEED)  # every case, run alone or in a list, draws the same seed
        cpu = torch.device("cpu")
        base = _place(s, make_inputs(s), s.dtype, cpu)  # ref64 runs on the very values fascore sees
        lib_kw = _place(s, base, s.dtype, device)
        with _engine.use_engine(engine) if engine else contextlib.nullcontext():
            try:
                res0 = _call(s.api, lib_kw)
            except FlashAttentionError as e:
                refusal = f"engine={engine!r} cannot run this call: "
                if engine and str(e).startswith(refusal):
                    r.skipped = str(e)[len(refusal):]
                    return r
                raise
            dy = None
            if s.backward:
                g = torch.Generator().manual_seed(s.data_seed + 1)
                dy = torch.randn(tuple(res0[0].shape), generator=g).to(s.dtype)
                res, g_lib = _forward_backward(s, lib_kw, dy)
            else:
                res, g_lib = res0, {}
        if s.keep_prob < 1 and s.drop == "seed":
            if (s.seed and res[4] != s.seed) or res[4] == 0:
                raise AssertionError(f"seed={s.seed} came back as {res[4]}")
            base = dict(base, seed=res[4], offset=res[5])
        with _engine.use_engine("reference"):
            ref, g_ref = _forward_backward(s, _place(s, base, torch.float64, cpu), dy)
        with _engine.use_engine("reference"):  # ref_same: float32 logits, results in the input dtype
            nv, g_nv = _forward_backward(s, _place(s, base, s.dtype, cpu), dy)
        out = res[0]
        if out.dtype != s.dtype or out.device.type != device.type:
            raise AssertionError(f"attention_out is {out.dtype} on {out.device}, expected {s.dtype} on {device}")
        r.checks.append(compare("attention_out", res[0], ref[0], nv[0], s.dtype, 2.0))
        r.checks.append(compare_golden("attention_out", res[0], ref[0]))
        for i, q in ((1, "softmax_max"), (2, "softmax_sum")):
            r.checks.append(compare_stats(q, res[i], ref[i]))
        if tuple(res[3].shape) != (0,) or res[6] != ref[6]:
            r.checks.append(Check(f"softmax_out {tuple(res[3].shape)} / numels {res[6]} vs {ref[6]}", math.inf, 0.0))
        for n, gl in g_lib.items():
            r.checks.append(compare("d" + n, gl, g_ref[n], g_nv[n], s.dtype, 3.0))
    except Exception as e:  # noqa: BLE001 - a conformance failure, reported in the table
        r.error = f"{type(e).__name__}: {e}"
    finally:
        gen.set_state(state)
    r.seconds = time.perf_counter() - t0
    return r


# --------------------------------------------------------------------------- one case as Python
def _literal(x: Any) -> str:
    if isinstance(x, torch.dtype):
        return str(x)
    return repr(x)


def snippet(s: Spec, device: str | torch.device = "cpu") -> str:
    """The case as a self-contained Python snippet: its inputs, the emulated NPU generator's seed,
    the call with every argument written out, and the float64 reference it is checked against."""
    dflt = Spec()
    fields = [f"{f}={_literal(getattr(s, f))}" for f in s.__dataclass_fields__
              if f != "name" and getattr(s, f) != getattr(dflt, f)]
    kw = case_inputs(s)
    fn = "npu_fusion_attention" if s.api == "v1" else "npu_fusion_attention_v2"
    pos = ", ".join(f"{n}" for n in ("query", "key", "value")) + f", {kw['head_num']}, {kw['input_layout']!r}"
    spell = {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens"} if s.api == "v1" else {}
    args, notes = [], []
    for n, v in kw.items():
        if n in ("query", "key", "value", "head_num", "input_layout") or (s.api == "v1" and n == "pse_type"):
            continue
        if isinstance(v, Tensor):
            args.append(f"{spell.get(n, n)}=kw[{n!r}]")
            notes.append(f"#   {n}: {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
        else:
            args.append(f"{spell.get(n, n)}={_literal(v)}")
    shapes = ", ".join(f"{n} {list(kw[n].shape)}" for n in ("query", "key", "value"))
    call = f"fascore.{fn}(\n    {pos},\n    " + ",\n    ".join(args) + ")" if args else f"fascore.{fn}({pos})"
    lines = [
        f"# fascore check {s.name}: {', '.join(s.features())}",
        "import torch",
        "import fascore",
        "from fascore.tools.check import Spec, case_inputs",
        "",
        f"spec = Spec({', '.join(fields)})",
        f"kw = case_inputs(spec, device={str(torch.device(device))!r})  # the case's tensors (from spec.data_seed), "
        "in its dtype",
        f"#   {shapes} {str(s.dtype).replace('torch.', '')}",
        *notes,
        "query, key, value = kw['query'], kw['key'], kw['value']",
        f"fascore.manual_seed({s.npu_seed or DEFAULT_NPU_SEED})  # the emulated NPU generator, seeded as the check seeds it",
        f"out, softmax_max, softmax_sum, softmax_out, seed, offset, numels = {call}",
        "",
        "# the float64 reference the check compares with (same values, same dropout seed and offset)",
        "kw64 = case_inputs(spec, torch.float64)",
        "if spec.keep_prob < 1 and spec.drop == 'seed':",
        "    kw64.update(seed=seed, offset=offset)",
        "with fascore.use_engine('reference'):",
        "    ref = fascore.npu_fusion_attention_v2(**kw64)",
        "print('max |out - ref64| =', (out.double().cpu() - ref[0]).abs().max().item())",
    ]
    if s.api == "v1":
        lines[-2] = "    ref = fascore.npu_fusion_attention_v2(**kw64)  # v1 and v2 compute the same"
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- error codes
def _error_cases(device: torch.device) -> list[tuple[str, Callable[[], Any], int]]:
    def qkv(layout: str = "BSH") -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.randn(1, 8, 32, device=device) for _ in range(3))  # type: ignore[return-value]

    q, k, v = qkv()
    bad_mask = torch.zeros(2048, 2048, dtype=torch.bool, device=device)
    out = fascore.npu_fusion_attention(q, k, v, 2, "BSH")
    return [
        ("query=None", lambda: fascore.npu_fusion_attention(None, k, v, 2, "BSH"), 161001),
        ("sparse_mode=9", lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSH", sparse_mode=9), 161002),
        ("keep_prob=0", lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSH", keep_prob=0.0), 161002),
        ("head_num=3 (does not divide H)", lambda: fascore.npu_fusion_attention(q, k, v, 3, "BSH"), 161002),
        ("wrong compressed mask", lambda: fascore.npu_fusion_attention(q, k, v, 2, "BSH", atten_mask=bad_mask,
                                                                       sparse_mode=2), 161002),
        ("grad without softmax_max", lambda: fascore.npu_fusion_attention_grad(
            q, k, v, out[0], 2, "BSH", softmax_sum=out[2], attention_in=out[0]), 161001),
    ]


def run_errors(device: torch.device) -> Result:
    r = Result("error codes", ["errors (status codes)"])
    t0 = time.perf_counter()
    try:
        for what, fn, status in _error_cases(device):
            try:
                fn()
            except FlashAttentionError as e:
                r.checks.append(Check(f"{what}: status {e.status}", 0.0 if e.status == status else math.inf, 0.0))
            else:
                r.checks.append(Check(f"{what}: no error raised", math.inf, 0.0))
    except Exception as e:  # noqa: BLE001
        r.error = f"{type(e).__name__}: {e}"
    r.seconds = time.perf_counter() - t0
    return r


# --------------------------------------------------------------------------- the case lists
def _quick_cases() -> list[Spec]:
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    cs: list[Spec] = []
    # every layout x dtype, forward and backward; GQA in some, Sq != Skv in some
    for li, layout in enumerate(("BSH", "SBH", "BSND", "BNSD", "TND")):
        for di, dt in enumerate((f32, f16, bf16)):
            gqa = (li + di) % 2 == 1
            s = Spec(layout=layout, dtype=dt, n1=4, n2=2 if gqa else 4, sq=24 + 8 * di, skv=40 - 8 * li,
                     d=16 + 16 * (li % 2), dv=16 if li == 3 else None)
            if layout == "TND":
                s = replace(s, seqs=((5, 9), (0, 3), (17, 11), (8, 8)), pad_q=3)
            cs.append(s)
    # every sparse mode, non-TND
    modes = [Spec(mode=0, mask="full", pre=9, nxt=4, layout="BSND", sq=40, skv=56),
             Spec(mode=1, mask="full", layout="BNSD", dtype=bf16, mask_dtype=torch.uint8),
             Spec(mode=2, layout="BSH", sq=30, skv=50, n2=1),
             Spec(mode=3, layout="SBH", sq=50, skv=30, dtype=f16),
             Spec(mode=4, layout="BSH", sq=33, skv=47, pre=5, nxt=3, dtype=bf16),
             Spec(mode=5, layout="BNSD", sq=20, skv=36, prefix=(4, 30)),
             Spec(mode=6, layout="BSND", sq=20, skv=36, prefix=(16, 30), n2=2)]
    cs += modes
    # every TND sparse mode
    seqs = ((7, 7), (12, 12), (0, 0), (9, 9))
    for m in (0, 1, 2, 3, 4, 6, 7, 8):
        s = Spec(layout="TND", mode=m, seqs=seqs if m != 3 else ((7, 10), (12, 5), (9, 9)), n2=2,
                 mask="full" if m in (0, 1) else "none", dtype=bf16 if m % 2 else f32)
        if m in (0, 4, 7, 8):
            s = replace(s, pre=4, nxt=2)
        if m == 6:
            s = replace(s, prefix=(3, 5, 0, 6))
        cs.append(s)
    # pse types
    cs += [Spec(pse="full", pse_type=0, layout="BSH", sq=20, skv=28),
           Spec(pse="full1", pse_type=1, layout="BNSD", sq=20, skv=28, dtype=bf16),
           Spec(pse="row", pse_type=1, layout="SBH", sq=20, skv=28, mode=3),
           Spec(pse="slopes", pse_type=2, layout="BSND", sq=32, skv=32, mode=2, n2=2),
           Spec(pse="slopes_b", pse_type=3, layout="BSH", sq=32, skv=32, start_idx=(3, 1), dtype=f16),
           Spec(pse="slopes", pse_type=2, layout="TND", seqs=((6, 6), (10, 10)), mode=3),
           Spec(pse="tnd", pse_type=1, layout="TND", seqs=((6, 6), (10, 10)), mode=2, n1=2, n2=2)]
    # dropout
    cs += [Spec(keep_prob=0.8, seed=1234, layout="BSH", mode=2, sq=40, skv=40),
           Spec(keep_prob=0.7, seed=0, layout="SBH", dtype=bf16),
           Spec(keep_prob=0.75, drop="mask", layout="BNSD", sq=20, skv=36),
           Spec(keep_prob=0.9, seed=99, layout="TND", seqs=((5, 8), (11, 11)), mode=3, n2=1)]
    # sink, rope, invalid rows, softmax_layout, v1, float64, longer sequences (tile edges)
    cs += [Spec(sink=True, mode=2, layout="BSH", sq=24, skv=24),
           Spec(sink=True, layout="TND", seqs=((4, 6), (9, 9)), dtype=bf16),
           Spec(rope=8, layout="BSND", sq=20, skv=28),
           Spec(rope=8, layout="TND", seqs=((6, 9), (10, 10)), mode=3, dtype=f16),
           Spec(mode=0, mask="full", full_row_masked=True, layout="BSH", sq=16, skv=24),
           Spec(softmax_layout="TND", layout="TND", seqs=((6, 9), (10, 10))),
           Spec(api="v1", mode=4, pre=20, nxt=10, layout="SBH", sq=60, skv=60, pse="full", pse_type=1),
           Spec(dtype=torch.float64, layout="BNSD", mode=3, sq=20, skv=36),
           Spec(layout="BSH", mode=3, b=1, n1=2, n2=1, sq=270, skv=300, d=32, dtype=bf16),
           Spec(layout="BNSD", mode=4, b=1, n1=2, n2=2, sq=300, skv=270, pre=100, nxt=40, d=32)]
    return cs


def _random_spec(rng: random.Random, i: int) -> Spec:
    layout = rng.choice(("BSH", "SBH", "BSND", "BNSD", "TND"))
    dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16))
    n2 = rng.choice((1, 2, 4))
    n1 = n2 * rng.choice((1, 2, 3))
    d = rng.choice((8, 16, 32, 64))
    tnd = layout == "TND"
    mode = rng.choice((0, 0, 1, 2, 3, 4, 6, 7, 8) if tnd else (0, 0, 1, 2, 3, 4, 5, 6))
    alibi = rng.random() < 0.25
    pse_kind = "none"
    s = Spec(layout=layout, dtype=dtype, n1=n1, n2=n2, d=d, dv=rng.choice((None, d // 2)), mode=mode,
             b=rng.randint(1, 3), data_seed=1000 + i)
    if tnd:
        nb = rng.randint(1, 4)
        seqs = []
        for _ in range(nb):
            a = rng.randint(0, 70)
            seqs.append((a, a if alibi or rng.random() < 0.5 else rng.randint(max(1, a // 2), 90)))
        if all(a == 0 for a, _ in seqs):
            seqs[0] = (5, 5)
        s = replace(s, seqs=tuple(seqs), pad_q=rng.choice((0, 0, 3)), pad_kv=rng.choice((0, 2)))
    else:
        sq = rng.choice((1, 7, 33, 64, 130, 257))
        skv = sq if alibi or rng.random() < 0.4 else rng.choice((1, 9, 64, 129, 300))
        s = replace(s, sq=sq, skv=skv)
    if mode in (0, 1, 5):
        s = replace(s, mask="full" if mode else rng.choice(("none", "full")),
                    mask_dtype=rng.choice((torch.bool, torch.uint8)), full_row_masked=rng.random() < 0.2)
    if mode in (0, 4, 7, 8):
        s = replace(s, pre=rng.choice((0, 3, 17, 200, INT32_MAX)), nxt=rng.choice((0, 2, 33, INT32_MAX)))
    geoms = list(s.seqs) if tnd else [(s.sq, s.skv)] * s.b
    if mode in (5, 6):
        pfx = []
        for gq, gk in geoms:
            lo = max(0, gk - gq) if mode == 6 else 0
            pfx.append(rng.randint(lo, gk))
        s = replace(s, prefix=tuple(pfx))
    if alibi:
        pse_kind = rng.choice(("slopes", "slopes_b"))
        s = replace(s, pse=pse_kind, pse_type=rng.choice((2, 3)),
                    start_idx=rng.choice((None, (2, 0), (0, 5))))
    elif not tnd and rng.random() < 0.3:
        s = replace(s, pse=rng.choice(("full", "full1", "row")), pse_type=rng.choice((0, 1)))
    if rng.random() < 0.3:
        s = replace(s, keep_prob=rng.choice((0.5, 0.8, 0.95)), drop=rng.choice(("seed", "mask")),
                    seed=rng.choice((0, 77, 2**40 + 3)))
    if rng.random() < 0.2:
        s = replace(s, sink=True)
    if rng.random() < 0.2:
        s = replace(s, rope=rng.choice((8, 16)))
    if tnd and rng.random() < 0.3:
        s = replace(s, softmax_layout="TND")
    if s.pse_type == 1 and not s.rope and s.start_idx is None and rng.random() < 0.3:
        s = replace(s, api="v1")
    return s


def _valid(s: Spec) -> bool:
    """Random combinations that fascore must accept (band rules, dv <= d)."""
    if s.dv is not None and s.dv < 1:
        return False
    geoms = [g for g in s.seqs if g[0] > 0] if s.tnd else [(s.sq, s.skv)]
    if s.mode in (0, 4, 7, 8) and (s.mask != "none" or s.mode != 0):
        if s.mode == 0 and s.mask == "none":
            return True
        check = geoms
        if s.mode in (7, 8):
            check = geoms[-1:] if s.mode == 7 else geoms[:1]
        for gq, gk in check:
            shift = gk - gq if s.mode != 0 else 0
            pre, nxt = s.pre - shift, s.nxt + shift
            if pre < 0 and nxt < 0:
                return False
            if pre < 0 and not (nxt >= -pre and -pre < gk):
                return False
            if nxt < 0 and not (pre >= -nxt and -nxt < gq):
                return False
    return True


def cases(quick: bool = True, n_random: int = 200, seed: int = 0) -> list[Spec]:
    """The conformance cases: the quick CI subset, plus ``n_random`` random combinations and
    long sequences in the full run. Case i is the same in both lists when it is a quick one;
    ``seed`` fixes every random draw (the combinations, each case's data and the seed each case
    gives the emulated NPU generator), so a list and any case of it rerun identically."""
    if seed < 0 or n_random < 0:
        raise ValueError(f"seed={seed}, n_random={n_random}: must be >= 0")
    cs = _quick_cases()
    if not quick:
        rng = random.Random(seed)
        i = 0
        while i < n_random:
            s = _random_spec(rng, i)
            if _valid(s):
                cs.append(s)
                i += 1
        cs += [Spec(layout="BSH", mode=2, b=1, n1=2, n2=1, sq=1040, skv=1040, d=16, pse="compressed",
                    pse_type=1),
               Spec(layout="BNSD", mode=0, mask="full", pre=300, nxt=100, b=1, n1=2, n2=2, sq=900, skv=1100,
                    d=64, dtype=torch.bfloat16),
               Spec(layout="TND", mode=8, pre=100, nxt=0, seqs=((700, 700), (300, 500)), n1=2, n2=1, d=32,
                    keep_prob=0.9, seed=5)]
    for i, s in enumerate(cs):
        if not s.name:
            s.name = f"#{i:03d} {s.layout} {DTYPE_NAMES[s.dtype]} m{s.mode}"
        if not s.data_seed:
            s.data_seed = i + 1
        s.data_seed += SEED_STRIDE * seed  # --seed moves every random draw: data, combinations, generator
        s.npu_seed = 1 + i + SEED_STRIDE * seed
    return cs


def run(specs: list[Spec], device: str | torch.device = "cpu", engine: str | None = None,
        progress: Callable[[Result], None] | None = None, errors: bool = True) -> list[Result]:
    """Run the cases (and the error-code checks); ``progress`` is called after each."""
    dev = torch.device(device)
    results = []
    for s in specs:
        r = run_case(s, dev, engine)
        results.append(r)
        if progress:
            progress(r)
    if errors:
        r = run_errors(dev)
        results.append(r)
        if progress:
            progress(r)
    return results


def feature_table(results: list[Result]) -> list[tuple[str, int, int, Result | None, Check | None]]:
    """Per feature: (feature, cases, failed, worst case, its worst check), worst = largest err/tol."""
    order: list[str] = []
    by: dict[str, list[Result]] = {}
    for r in results:
        if r.skipped:
            continue
        for f in r.features:
            if f not in by:
                order.append(f)
                by[f] = []
            by[f].append(r)

    def key(f: str) -> tuple:
        group = f.split(" ")[0]
        groups = ["layout", "dtype", "sparse_mode", "pse", "pse_type", "dropout", "GQA/MQA", "sink",
                  "rope", "Sq", "invalid", "softmax_layout", "v1", "backward", "forward", "errors"]
        return (groups.index(group) if group in groups else len(groups), f)

    rows = []
    for f in sorted(order, key=key):
        rs = by[f]
        failed = [r for r in rs if not r.ok]
        pool = failed or rs

        def ratio(r: Result) -> float:
            if r.error:
                return math.inf
            w = r.worst()
            return 0.0 if w is None else (math.inf if not w.ok else (w.err / w.tol if w.tol > 0 else 0.0))
        worst = max(pool, key=ratio)
        rows.append((f, len(rs), len(failed), worst, worst.worst() if not worst.error else None))
    return rows
