"""``fascore compare``: check recorded FlashAttentionScore calls against fascore's exact reference,
and show where they diverge.

    report = compare("dump_path/")          # an msprobe dump, or a fascore replay bundle
    report.exit_code                         # 1 when a call is out of bounds
    report.to_json("report.json")

Input (a directory):

- an msprobe PyTorch dump (``dump.json`` + ``dump_tensor_data/``, any of ``dump_path``,
  ``step*`` or ``rank*``/``proc*`` directories; made with ``task: "tensor"`` so the tensors are
  there). Entries ``NPU.npu_fusion_attention[_v2|_grad|_grad_v2].<n>.forward`` are the calls,
  ``....backward`` the autograd gradients of a forward (``input``: dy, ...; ``output``: the
  gradients of its tensor inputs, matched to query, key, value, pse, ... by position and shape).
  ``MindSpeed.npu_fusion_attention`` is read as the v2 signature.
- a fascore replay bundle (``fascore_bundle.json``), written by :func:`fascore.tools.capture.capture`.

For every call the recorded inputs are replayed through fascore three times: the dense reference
in float64 (``ref64``, the exact answer), the dense reference in the input dtype (``ref_same``,
which semantics §7's bound is made from) and the default (or chosen) engine on the chosen device (a
baseline: what an exact implementation reaches). The recorded outputs are checked under semantics §7:

- softmax_max: |x - ref64| <= 1e-5 * max(1, |ref64|); softmax_sum: |x - ref64| <= 1e-4 * ref64,
  per element; invalid-row sentinels (-FLT_MAX / +FLT_MAX) exact;
- attention_out: max |x - ref64| <= 2 * max |ref_same - ref64| + eps, and at most 0.5 % of the
  elements beyond max(0.005 * |ref64|, 2.5e-5);
- gradients (dq, dk, dv, dpse, dsink, dq_rope, dk_rope): max |x - ref64| <= 3 * max |ref_same -
  ref64| + eps; eps = the dtype's rounding at 1.0 (fp32 1e-5, fp16 2^-10, bf16 2^-7) times
  max(1, max |ref64|).

Where it diverges: per output, the error per head and per (head, row block) -- query blocks for
attention_out, the statistics and dq; key blocks for dk and dv; (query block, key block) tiles for
dpse --, NaN/inf positions, invalid rows that differ, and a verdict per call: ``within bounds``,
``out of bounds``, ``inputs invalid`` (fascore's validation message: a wrong mask shape is the
commonest NPU bug) or ``skipped`` (the record lacks data). For calls out of bounds a diagnosis
tries the usual culprits: logits rounded to bf16/fp16 before the softmax (softmax_max equals the
rounded exact max), and a wrong sparse_mode, an inverted or ignored atten_mask, a missing scale or
dropout (the output matches the reference of the altered call). Calls with a generated dropout
mask are replayed with semantics §5's Philox model from the recorded seed/offset and flagged
``bits assumed``. Heatmaps (PNG) of |error| by head x row block go to ``out_dir``.
"""
from __future__ import annotations

import inspect
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

import fascore

from ..limits import FLT_MAX
from .capture import FORWARD_APIS, Missing, TensorFile, dtype_from_name, find_missing, is_bundle, load_bundle, \
    materialize

__all__ = ["compare", "compare_command", "Report", "CallReport", "TensorReport", "Options", "print_report", "heatmap"]

EPS = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-12}
WITHIN, OUT, INVALID, SKIPPED = "within bounds", "out of bounds", "inputs invalid", "skipped"
GRAD_APIS = ("npu_fusion_attention_grad", "npu_fusion_attention_grad_v2", "npu_fusion_attention_grad_v3")
APIS = FORWARD_APIS + GRAD_APIS
# grad names by input name (autograd backward of a forward call)
GRAD_NAME = {"query": "dq", "key": "dk", "value": "dv", "pse": "dpse", "sink": "dsink",
             "query_rope": "dq_rope", "key_rope": "dk_rope"}
_HALF_LIKE = ("query", "key", "value", "query_rope", "key_rope", "dy", "attention_in")
INT32_MAX = 2**31 - 1


# =========================================================================== records
@dataclass
class Record:
    """One recorded call: the API, its arguments and outputs as recorded, and (forward calls)
    the gradients autograd sent through it."""

    name: str
    api: str
    args: list
    kwargs: dict
    outputs: list | None
    backward: dict | None = None  # {"dy": T, "grads": {input name: T}} or {"dy": T, "grad_list": [T...]}
    source: str = ""
    notes: list[str] = field(default_factory=list)
    recorded_error: dict | None = None


_MSPROBE_KEY = re.compile(r"^(?P<prefix>[A-Za-z_]+)\.(?P<api>npu_fusion_attention(?:_grad)?(?:_v[23])?)\."
                          r"(?P<n>\d+)\.(?P<dir>forward|backward)$")


def _ms_value(v: Any, data_dir: Path) -> Any:
    """An msprobe dump.json argument entry back to a Python value (tensors as TensorFile)."""
    if v is None:
        return None
    if isinstance(v, list):
        return [_ms_value(x, data_dir) for x in v]
    if not isinstance(v, dict):
        return v
    if "type" not in v:
        return {k: _ms_value(x, data_dir) for k, x in v.items()}
    if "shape" in v and "dtype" in v and ("Tensor" in str(v["type"]) or "Parameter" in str(v["type"])
                                          or v["type"] == "numpy.ndarray"):
        shape = [int(s) for s in v.get("shape") or []]
        if v.get("data_name"):
            return TensorFile(data_dir / v["data_name"], v["dtype"], shape)
        if math.prod(shape) == 0:  # msprobe writes no file for an empty tensor
            try:
                return torch.empty(shape, dtype=dtype_from_name(v["dtype"]))
            except ValueError:
                return torch.empty(shape)
        return Missing(f"tensor {shape} {v['dtype']} was dumped without its data (dump with task \"tensor\")")
    if v["type"] == "torch.Size":
        return list(v.get("value") or [])
    if "value" in v:
        return v["value"]
    return Missing(f"unsupported dump value of type {v['type']}")


def find_dump_jsons(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.name == "dump.json" else []
    return sorted(path.rglob("dump.json"))


def load_msprobe(path: str | Path) -> list[Record]:
    """The npu_fusion_attention* calls of an msprobe PyTorch dump (one or many dump.json)."""
    root = Path(path)
    files = find_dump_jsons(root)
    if not files:
        raise FileNotFoundError(f"{root}: no dump.json (msprobe dump) or fascore_bundle.json (replay bundle) found")
    records: list[Record] = []
    for dj in files:
        with open(dj) as f:
            meta = json.load(f)
        data_dir = dj.parent / "dump_tensor_data"
        if not data_dir.is_dir() and meta.get("dump_data_dir"):
            data_dir = Path(meta["dump_data_dir"])
        where = "" if len(files) == 1 else (str(dj.parent.relative_to(root)) + ":" if root.is_dir() else "")
        groups: dict[tuple[str, str, int], dict[str, dict]] = {}
        for key, entry in (meta.get("data") or {}).items():
            m = _MSPROBE_KEY.match(key)
            if not m:
                continue
            groups.setdefault((m["prefix"], m["api"], int(m["n"])), {})[m["dir"]] = entry
        for (prefix, api, n), parts in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
            name = f"{where}{prefix}.{api}.{n}"
            notes = []
            fascore_api = api
            if prefix == "MindSpeed" and api == "npu_fusion_attention":
                fascore_api = "npu_fusion_attention_v2"
                notes.append("MindSpeed's npu_fusion_attention: replayed with the v2 signature")
            fw = parts.get("forward")
            if fw is None:
                records.append(Record(name, fascore_api, [], {}, None, source="msprobe",
                                      notes=notes + ["backward entry without its forward entry: not comparable"]))
                continue
            args = _ms_value(fw.get("input_args") or [], data_dir)
            kwargs = _ms_value(fw.get("input_kwargs") or {}, data_dir)
            outputs = _ms_value(fw.get("output"), data_dir) if "output" in fw else None
            bw = None
            if "backward" in parts:
                b = parts["backward"]
                grads_in = _ms_value(b.get("input") or [], data_dir)
                grads_out = _ms_value(b.get("output") or [], data_dir)
                bw = {"dy": grads_in[0] if grads_in else None, "grad_list": grads_out}
            records.append(Record(name, fascore_api, list(args), dict(kwargs), outputs, bw, "msprobe", notes))
    return records


def load_records(path: str | Path) -> tuple[str, list[Record]]:
    """("bundle" | "msprobe", records) of a directory or index file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if is_bundle(p):
        meta, calls = load_bundle(p)
        recs = []
        for c in calls:
            name = f"call {c['id']}" + (f" (#{c['seq']})" if c.get("seq") != c.get("id") else "")
            recs.append(Record(name, c["api"], list(c.get("args") or []), dict(c.get("kwargs") or {}), c.get("outputs"),
                               c.get("backward"), "bundle", [], c.get("error")))
        return "bundle", recs
    return "msprobe", load_msprobe(p)


# =========================================================================== reports
@dataclass
class TensorReport:
    """semantics §7 check of one recorded output against ref64, with where it diverges."""

    name: str
    shape: list[int]
    dtype: str
    ok: bool
    rule: str
    max_err: float
    bound: float  # out/grads: the max-error bound; statistics: max of err / tolerance (<= 1 passes)
    ref_same_err: float | None = None
    fascore_err: float | None = None
    fascore_ok: bool | None = None
    n: int = 0
    n_beyond: int = 0
    frac_beyond: float | None = None  # attention_out: fraction beyond max(0.005|ref64|, 2.5e-5)
    n_nan: int = 0
    n_inf: int = 0
    nonfinite_positions: list[dict] = field(default_factory=list)  # (batch, head, row, col) in [B, N, rows, cols]
    nonfinite_rows: list[dict] = field(default_factory=list)
    heads: list[dict] = field(default_factory=list)
    bad_heads: list[int] = field(default_factory=list)
    row_axis: str = "query"  # query | key | token (TND)
    block: int = 128
    bad_blocks: list[int] = field(default_factory=list)
    worst_tiles: list[dict] = field(default_factory=list)
    block_max: list[list[float]] = field(default_factory=list)  # [head][row block] max |err| over batches
    block_beyond: list[list[int]] = field(default_factory=list)  # [head][row block] elements beyond the bound
    message: str = ""


@dataclass
class CallReport:
    name: str
    api: str
    kind: str  # forward | grad | backward
    verdict: str
    message: str = ""
    status: int | None = None
    flags: list[str] = field(default_factory=list)
    geometry: dict = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)
    invalid_rows: dict = field(default_factory=dict)
    diagnosis: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    heatmap: str | None = None
    heatmap_axes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict != OUT

    def worst(self) -> TensorReport | None:
        bad = [t for t in self.tensors if not t.ok]
        pool = bad or self.tensors

        def ratio(t: TensorReport) -> float:
            if t.rule.startswith("stat"):
                return t.bound
            return t.max_err / t.bound if t.bound > 0 else (0.0 if t.max_err == 0 else math.inf)
        return max(pool, key=ratio, default=None)


@dataclass
class Report:
    source: str
    format: str
    calls: list[CallReport]
    fascore_version: str = getattr(fascore, "__version__", "?")
    torch_version: str = torch.__version__
    engine: str = ""

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.calls)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.calls)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict:
        d = {"source": self.source, "format": self.format, "fascore_version": self.fascore_version,
             "torch_version": self.torch_version, "engine": self.engine,
             "summary": {v: self.count(v) for v in (WITHIN, OUT, INVALID, SKIPPED)},
             "exit_code": self.exit_code, "calls": [asdict(c) for c in self.calls]}
        return _json_safe(d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text


def _json_safe(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


# =========================================================================== geometry
@dataclass
class Geometry:
    layout: str
    n1: int
    n2: int
    b: int
    sq: int
    skv: int
    d: int
    dv: int
    qlens: list[int] | None = None
    softmax_layout: str = ""

    def as_dict(self, named: dict) -> dict:
        q = named.get("query")
        g = {"layout": self.layout, "dtype": str(q.dtype).replace("torch.", "") if isinstance(q, Tensor) else "?",
             "B": self.b, "N1": self.n1, "N2": self.n2, "Sq": self.sq, "Skv": self.skv, "D": self.d, "Dv": self.dv}
        for k in ("sparse_mode", "keep_prob", "scale", "scale_value", "pse_type"):
            if k in named and not isinstance(named[k], Tensor):
                g[k] = named[k]
        for k in ("pre_tockens", "pre_tokens", "next_tockens", "next_tokens"):
            if k in named and named[k] != INT32_MAX:
                g[k] = named[k]
        m = named.get("atten_mask")
        if isinstance(m, Tensor):
            g["atten_mask"] = f"{list(m.shape)} {str(m.dtype).replace('torch.', '')}"
        p = named.get("pse")
        if isinstance(p, Tensor):
            g["pse"] = f"{list(p.shape)} {str(p.dtype).replace('torch.', '')}"
        if self.qlens is not None:
            g["actual_seq_qlen"] = _as_int_list(named.get("actual_seq_qlen"))
            g["actual_seq_kvlen"] = _as_int_list(named.get("actual_seq_kvlen"))
        return g


def _as_int_list(v: Any) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, Tensor):
        return [int(x) for x in v.reshape(-1).tolist()]
    return [int(x) for x in v]


def _seq_lens(cum: list[int]) -> list[int]:
    """Per-batch lengths from cumulative ends; trailing zeros are padding (semantics §2)."""
    end = len(cum)
    while end > 1 and cum[end - 1] == 0:
        end -= 1
    out, prev = [], 0
    for c in cum[:end]:
        out.append(max(0, c - prev))
        prev = c
    return out


def _geometry(named: dict) -> Geometry:
    layout = str(named["input_layout"]).upper()
    q, k, v = named["query"], named["key"], named["value"]
    n1 = int(named["head_num"])
    if layout in ("BSH", "SBH"):
        d = q.shape[2] // n1
        n2 = max(1, k.shape[2] // d)
        dv = v.shape[2] // n2
        b, sq, skv = (q.shape[0], q.shape[1], k.shape[1]) if layout == "BSH" else (q.shape[1], q.shape[0], k.shape[0])
        return Geometry(layout, n1, n2, b, sq, skv, d, dv)
    if layout == "BSND":
        return Geometry(layout, n1, k.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3])
    if layout == "BNSD":
        return Geometry(layout, n1, k.shape[1], q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    if layout == "TND":
        cq = _as_int_list(named.get("actual_seq_qlen")) or [q.shape[0]]
        lens = _seq_lens(cq)
        return Geometry(layout, n1, k.shape[1], len(lens), q.shape[0], k.shape[0], q.shape[2], v.shape[2], lens,
                        str(named.get("softmax_layout") or "").upper())
    raise ValueError(f"input_layout={named['input_layout']!r}")


def _canon(t: Tensor, role: str, g: Geometry) -> tuple[Tensor, str]:
    """``t`` as [B, N, rows, cols] (a permutation of its elements) and the name of the row axis.
    role: q (query-shaped), k (key/value-shaped), stats, pse, sink."""
    try:
        if role == "sink":
            return t.reshape(1, -1, 1, 1), "head"
        if role == "pse":
            return (t if t.dim() == 4 else t.reshape(1, 1, -1, t.shape[-1] if t.dim() else 1)), "query"
        if role == "stats":
            if g.layout != "TND":
                return t, "query"
            return _tnd_stats(t, g), "token"
        n = g.n1 if role == "q" else g.n2
        axis = ("query" if role == "q" else "key") if g.layout != "TND" else "token"
        if g.layout == "BSH":
            return t.reshape(t.shape[0], t.shape[1], n, -1).permute(0, 2, 1, 3), axis
        if g.layout == "SBH":
            return t.reshape(t.shape[0], t.shape[1], n, -1).permute(1, 2, 0, 3), axis
        if g.layout == "BSND":
            return t.permute(0, 2, 1, 3), axis
        if g.layout == "BNSD":
            return t, axis
        return t.permute(1, 0, 2).unsqueeze(0), axis  # TND: [1, N, T, D]
    except (RuntimeError, IndexError):
        return t.reshape(1, 1, -1, 1), "element"


def _tnd_stats(t: Tensor, g: Geometry) -> Tensor:
    """TND statistics [T1, N1, 8] -> [1, N1, T1, 8]; softmax_layout "" holds, per batch, a
    contiguous [N1, Sq_b, 8] block (semantics §2)."""
    t1, n1 = t.shape[0], t.shape[1]
    if g.softmax_layout == "TND":
        return t.permute(1, 0, 2).unsqueeze(0)
    flat = t.reshape(-1)
    c = t.shape[2]
    out = torch.empty(n1, t1, c, dtype=t.dtype)
    off = row = 0
    for sq in g.qlens or []:
        sq = min(sq, t1 - row)
        out[:, row:row + sq] = flat[off:off + n1 * sq * c].reshape(n1, sq, c)
        off += n1 * sq * c
        row += sq
    if row < t1:
        out[:, row:] = flat[off:off + (t1 - row) * n1 * c].reshape(t1 - row, n1, c).permute(1, 0, 2)
    return out.unsqueeze(0)


# =========================================================================== checking one tensor
@dataclass
class Options:
    engine: str | None = None  # baseline engine; None: fascore's default
    device: str = "cpu"  # where the baseline engine runs (the reference always runs on the CPU)
    block: int = 128  # rows per block (query / key blocks) in the per-tile statistics and heatmaps
    diagnose: bool = True
    diagnose_budget: int = 1 << 24  # B*N1*Sq*Skv above which the re-run diagnosis is skipped
    max_positions: int = 20
    out_dir: Path | None = None  # heatmaps; None: none written
    seeds: dict[str, tuple[int, int]] = field(default_factory=dict)  # call name -> (seed, offset) for dropout


def _row_blocks(err: Tensor, block: int) -> Tensor:
    """[B, N, R, C] -> [B, N, ceil(R / block)] max over the rows of each block and the columns."""
    b, n, r, _ = err.shape
    m = err.amax(-1) if err.shape[-1] else torch.zeros(b, n, r, dtype=err.dtype)
    nb = max(1, -(-r // block))
    pad = nb * block - r
    if pad:
        m = torch.cat([m, torch.zeros(b, n, pad, dtype=m.dtype)], -1)
    return m.reshape(b, n, nb, block).amax(-1)


def _row_block_sum(x: Tensor, block: int) -> Tensor:
    """[B, N, R, C] -> [B, N, ceil(R / block)] sums."""
    b, n, r, _ = x.shape
    s = x.sum(-1)
    nb = max(1, -(-r // block))
    pad = nb * block - r
    if pad:
        s = torch.cat([s, torch.zeros(b, n, pad, dtype=s.dtype)], -1)
    return s.reshape(b, n, nb, block).sum(-1)


def _tiles(err: Tensor, block: int) -> Tensor:
    """[B, N, R, C] -> [B, N, ceil(R/block), ceil(C/block)] max per (row block, column block)."""
    b, n, r, c = err.shape
    nbr, nbc = max(1, -(-r // block)), max(1, -(-c // block))
    e = torch.zeros(b, n, nbr * block, nbc * block, dtype=err.dtype)
    e[:, :, :r, :c] = err
    return e.reshape(b, n, nbr, block, nbc, block).amax((3, 5))


def check_tensor(name: str, x: Tensor, r64: Tensor, rs: Tensor | None, lib: Tensor | None, rule: str, role: str,
                 g: Geometry, opts: Options) -> TensorReport:
    """semantics §7 for one output. rule: out | grad | stat_max | stat_sum."""
    rep = TensorReport(name, list(x.shape), str(x.dtype).replace("torch.", ""), True, rule, 0.0, 0.0, n=x.numel(),
                       block=opts.block)
    if tuple(x.shape) != tuple(r64.shape):
        rep.ok, rep.max_err, rep.bound = False, math.inf, 0.0
        rep.message = f"shape {list(x.shape)} != fascore's {list(r64.shape)}"
        return rep
    x4, axis = _canon(x.detach().to("cpu", torch.float64), role, g)
    r4, _ = _canon(r64.detach().to("cpu", torch.float64), role, g)
    rep.row_axis = axis
    s4 = _canon(rs.detach().to("cpu", torch.float64), role, g)[0] if rs is not None else None
    l4 = _canon(lib.detach().to("cpu", torch.float64), role, g)[0] if lib is not None and \
        tuple(lib.shape) == tuple(x.shape) else None
    err = (x4 - r4).abs()
    err = torch.where(torch.isnan(x4) & ~torch.isnan(r4), torch.full_like(err, math.inf), err)
    err = torch.where(torch.isnan(err) & (x4 == r4), torch.zeros_like(err), err)  # both inf, same sign
    err = torch.nan_to_num(err, nan=math.inf, posinf=math.inf)
    rule_of = _stats_rule if rule.startswith("stat") else _max_rule
    err, beyond, ratio = rule_of(rep, rule, err, r4, s4, l4, x.dtype)
    rep.n_beyond = int(beyond.sum())
    _locate(rep, x4, r4, err, beyond, ratio, role, opts)
    return rep


def _stats_rule(rep: TensorReport, rule: str, err: Tensor, r4: Tensor, s4: Tensor | None, l4: Tensor | None,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics at float32 level per element, sentinels exact: (err, beyond, err / tol)."""
    sentinel = r4.abs() == FLT_MAX
    err = torch.where(sentinel, torch.where(err == 0, torch.zeros_like(err), torch.full_like(err, math.inf)), err)
    tol = 1e-5 * r4.abs().clamp_min(1.0) if rule == "stat_max" else 1e-4 * r4.abs()
    tol = torch.where(sentinel, torch.zeros_like(tol), tol)
    ratio = torch.where(tol > 0, err / tol.clamp_min(1e-300), torch.full_like(err, math.inf))
    ratio = torch.where(err == 0, torch.zeros_like(ratio), ratio)
    beyond = ~(err <= tol)
    rep.rule = rule + (" |x-ref64| <= 1e-5*max(1,|ref64|)" if rule == "stat_max" else " |x-ref64| <= 1e-4*ref64")
    rep.max_err = float(err.max()) if err.numel() else 0.0
    rep.bound = float(ratio.max()) if ratio.numel() else 0.0  # largest err / tol
    rep.ok = not bool(beyond.any())
    if s4 is not None:
        se = _inf_nan((s4 - r4).abs() * ~sentinel)
        rep.ref_same_err = float(se.max()) if se.numel() else 0.0
    if l4 is not None:
        le = (l4 - r4).abs().nan_to_num(nan=math.inf, posinf=math.inf)
        le = torch.where(sentinel, torch.where(l4 == r4, torch.zeros_like(le), torch.full_like(le, math.inf)), le)
        rep.fascore_err = float(le.max()) if le.numel() else 0.0
        rep.fascore_ok = bool((le <= tol).all())
    return err, beyond, ratio


def _max_rule(rep: TensorReport, rule: str, err: Tensor, r4: Tensor, s4: Tensor | None, l4: Tensor | None,
              dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs (2x) and gradients (3x) of ref_same's error, and the 0.5 % golden criterion."""
    factor = 2.0 if rule == "out" else 3.0
    fin = torch.isfinite(r4)
    same = float(_inf_nan((s4 - r4).abs()[fin]).max()) if s4 is not None and bool(fin.any()) else 0.0
    scale = max(1.0, float(r4.abs()[fin].max())) if bool(fin.any()) else 1.0
    bound = factor * same + EPS.get(dtype, 1e-5) * scale
    beyond = ~(err <= bound)
    rep.rule = f"{'out' if rule == 'out' else 'grad'} max|x-ref64| <= {factor:g}*max|ref_same-ref64| + eps"
    rep.max_err = float(err.max()) if err.numel() else 0.0
    rep.bound, rep.ref_same_err = bound, same
    rep.ok = not bool(beyond.any())
    if rule == "out":
        thr = torch.maximum(0.005 * r4.abs(), torch.full_like(r4, 2.5e-5))
        rep.frac_beyond = float((~(err <= thr)).double().mean()) if err.numel() else 0.0
        if rep.frac_beyond > 0.005:
            rep.ok = False
    if l4 is not None:
        le = (l4 - r4).abs().nan_to_num(nan=math.inf, posinf=math.inf)
        rep.fascore_err = float(le.max()) if le.numel() else 0.0
        rep.fascore_ok = rep.fascore_err <= bound
    return err, beyond, err / bound


def _locate(rep: TensorReport, x4: Tensor, r4: Tensor, err: Tensor, beyond: Tensor, ratio: Tensor, role: str,
            opts: Options) -> None:
    """Where it diverges: non-finite positions, heads, row blocks and tiles."""
    nan4, inf4 = torch.isnan(x4) & ~torch.isnan(r4), torch.isinf(x4) & ~torch.isinf(r4)
    rep.n_nan, rep.n_inf = int(nan4.sum()), int(inf4.sum())
    if rep.n_nan or rep.n_inf:
        pos = torch.nonzero(nan4 | inf4)[: opts.max_positions]
        rep.nonfinite_positions = [{"batch": int(p[0]), "head": int(p[1]), "row": int(p[2]), "col": int(p[3]),
                                    "value": str(float(x4[tuple(p)]))} for p in pos]
        rows = torch.nonzero((nan4 | inf4).any(-1))
        rep.nonfinite_rows = [{"batch": int(p[0]), "head": int(p[1]), "row": int(p[2])}
                              for p in rows[: opts.max_positions]]
        if len(rows) > opts.max_positions:
            rep.nonfinite_rows.append({"more": int(len(rows) - opts.max_positions)})
    for h in range(err.shape[1]):
        eh = err[:, h]
        rep.heads.append({"head": h, "max_err": float(eh.max()) if eh.numel() else 0.0,
                          "n_beyond": int(beyond[:, h].sum()), "n_nan": int(nan4[:, h].sum())})
    rep.bad_heads = [h["head"] for h in rep.heads if h["n_beyond"]]
    blk = _row_blocks(err, opts.block)  # [B, N, nb]
    rep.block_max = blk.amax(0).tolist()
    cnt = _row_block_sum(beyond.to(torch.float64), opts.block)  # [B, N, nb]
    rep.block_beyond = cnt.sum(0).long().tolist()
    rep.bad_blocks = sorted({int(i) for i in torch.nonzero(cnt.sum((0, 1)) > 0).reshape(-1).tolist()})
    rat = torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)
    if err.shape[0] == 0:
        rep.worst_tiles = []
    elif role == "pse":
        tiles = _tiles(rat, opts.block)  # [B, N, nbq, nbk]
        order = sorted(torch.nonzero(tiles > 1).tolist(), key=lambda p: -float(tiles[tuple(p)]))[: opts.max_positions]
        et = _tiles(err, opts.block)
        rep.worst_tiles = [{"batch": p[0], "head": p[1], "q_block": p[2], "k_block": p[3],
                            "rows": _span(p[2], opts.block, err.shape[2]),
                            "cols": _span(p[3], opts.block, err.shape[3]),
                            "max_err": float(et[tuple(p)]), "ratio": float(tiles[tuple(p)])} for p in order]
    else:
        rb = _row_blocks(rat, opts.block)
        order = sorted(torch.nonzero(rb > 1).tolist(), key=lambda p: -float(rb[tuple(p)]))[: opts.max_positions]
        key = {"q": "q_block", "stats": "q_block", "k": "k_block"}.get(role, "block")
        rep.worst_tiles = [{"batch": p[0], "head": p[1], key: p[2], "rows": _span(p[2], opts.block, err.shape[2]),
                            "max_err": float(blk[tuple(p)]), "ratio": float(rb[tuple(p)])} for p in order]


def _inf_nan(x: Tensor) -> Tensor:
    """NaN -> inf (a NaN error is the worst error), inf kept."""
    return torch.nan_to_num(x, nan=math.inf, posinf=math.inf)


def _span(i: int, block: int, n: int) -> str:
    return f"{i * block}-{min(n, (i + 1) * block) - 1}"


# =========================================================================== replay
def _fn(api: str) -> Callable:
    fn = getattr(fascore, api, None)
    if fn is None:
        raise LookupError(f"this fascore has no {api}")
    return fn


def _bind(api: str, args: list, kwargs: dict) -> dict:
    sig = inspect.signature(_fn(api))
    bound = sig.bind(*args, **kwargs)
    return dict(bound.arguments)


def _pse_type(api: str, named: dict) -> int:
    if api in ("npu_fusion_attention", "npu_fusion_attention_grad", "npu_fusion_attention_v3",
               "npu_fusion_attention_grad_v3"):
        return 1
    try:
        return int(named.get("pse_type", 1))
    except (TypeError, ValueError):
        return 1


def _as64(api: str, named: dict) -> dict:
    out = {}
    pt = _pse_type(api, named)
    for k, v in named.items():
        if isinstance(v, Tensor) and v.is_floating_point() and (k in _HALF_LIKE or (k == "pse" and pt in (0, 1))):
            v = v.to(torch.float64)
        out[k] = v
    return out


def _to(named: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in named.items()}


def _call(api: str, named: dict, engine: str, device: str = "cpu", wrt: list[str] | None = None,
          dy: Tensor | None = None) -> tuple[Any, dict[str, Tensor]]:
    """Run ``api`` with ``engine``; with ``wrt``, autograd gradients of attention_out (dy) too."""
    fn = _fn(api)
    kw = _to(named, device)
    with fascore.use_engine(engine):
        if not wrt:
            with torch.no_grad():
                return fn(**kw), {}
        leaves = {}
        for n in wrt:
            leaves[n] = kw[n].detach().clone().requires_grad_(True)
        kw.update(leaves)
        with torch.enable_grad():
            res = fn(**kw)
            grads = torch.autograd.grad(res[0], list(leaves.values()), dy.to(res[0].device, res[0].dtype),
                                        allow_unused=True)
    return res, dict(zip(wrt, grads))


def _call_ref(api: str, named: dict, notes: list[str], wrt: list[str] | None = None,
              dy: Tensor | None = None) -> tuple[Any, dict[str, Tensor]]:
    """The reference run; when the dense reference cannot get its memory (361001) the call is
    replayed with the first tiled engine of the device's priority list that runs it (same
    formula; float64 calls skip engines without float64), with a note."""
    try:
        return _call(api, named, "reference", wrt=wrt, dy=dy)
    except fascore.FlashAttentionError as e:
        if e.status != fascore.ACLNN_ERR_RUNTIME_ERROR:
            raise
        dense = e
    dev = next((t.device.type for t in named.values() if isinstance(t, Tensor)), "cpu")
    tiled = [n for n in fascore.engines.PRIORITY.get(dev, []) if n != "reference" and n in fascore.available_engines()]
    for name in tiled:
        try:
            res = _call(api, named, name, wrt=wrt, dy=dy)
        except fascore.FlashAttentionError as e:
            if f"engine={name!r} cannot run this call" in str(e):
                continue
            raise
        note = f"the dense reference does not fit ({dense}); reference runs use the {name!r} engine"
        if note not in notes:
            notes.append(note)
        return res
    raise dense


def _grad_outputs(api: str, res: Any, named: dict) -> dict[str, Any]:
    """Name the grad op's results. grad (v1, v3): (dq, dk, dv, dpse, dsink); grad_v2 in torch_npu's
    order (dq, dk, dv, dpse, dq_rope, dk_rope, dsink), with fascore's older (dq, dk, dv, dpse, dsink
    [, dq_rope, dk_rope]) told apart by the shape of the fifth entry."""
    res = list(res) if isinstance(res, (list, tuple)) else [res]
    names = ["dq", "dk", "dv", "dpse", "dsink"]
    if api == "npu_fusion_attention_grad_v2" and len(res) == 7:
        qr = named.get("query_rope")
        fifth = res[4]
        spec_order = isinstance(fifth, Tensor) and isinstance(qr, Tensor) and tuple(fifth.shape) == tuple(qr.shape)
        if spec_order or qr is None and isinstance(res[6], Tensor) and isinstance(named.get("sink"), Tensor) and \
                tuple(res[6].shape) == tuple(named["sink"].shape):
            names = ["dq", "dk", "dv", "dpse", "dq_rope", "dk_rope", "dsink"]
        else:
            names = ["dq", "dk", "dv", "dpse", "dsink", "dq_rope", "dk_rope"]
    return {n: res[i] for i, n in enumerate(names) if i < len(res)}


_ROLE = {"dq": "q", "dk": "k", "dv": "k", "dq_rope": "q", "dk_rope": "k", "dpse": "pse", "dsink": "sink"}


def _map_grad_list(named: dict, api: str, grad_list: list) -> dict[str, Any]:
    """msprobe's backward ``output``: gradients of the forward's tensor inputs in order. The first
    three are dq, dk, dv; the rest are matched to pse, sink, query_rope, key_rope by shape."""
    out: dict[str, Any] = {}
    for n, g in zip(("query", "key", "value"), grad_list[:3]):
        out[n] = g
    cands = [n for n in ("pse", "sink", "query_rope", "key_rope") if isinstance(named.get(n), Tensor)]
    if "pse" in cands and _pse_type(api, named) not in (0, 1):
        cands.remove("pse")
    for g in grad_list[3:]:
        if not isinstance(g, Tensor):
            continue
        for n in list(cands):
            if tuple(named[n].shape) == tuple(g.shape):
                out[n] = g
                cands.remove(n)
                break
    return out


def _is_tensor(v: Any) -> bool:
    return isinstance(v, Tensor)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, Tensor) and v.numel() == 0)


# =========================================================================== comparing one record
def _invalid_rows(x_max: Tensor, x_sum: Tensor, x_out: Tensor, r_max: Tensor, g: Geometry, opts: Options) -> dict:
    xm = _canon(x_max.double(), "stats", g)[0][..., 0]
    xs = _canon(x_sum.double(), "stats", g)[0][..., 0]
    rm = _canon(r_max.double(), "stats", g)[0][..., 0]
    xo = _canon(x_out.double(), "q", g)[0]
    ref_inv = rm == -FLT_MAX
    npu_inv = (xm == -FLT_MAX) & (xs == FLT_MAX)
    out_nonzero = (xo != 0).any(-1) if xo.shape[:3] == ref_inv.shape else torch.zeros_like(ref_inv)
    differ = (ref_inv != npu_inv) | (ref_inv & out_nonzero)
    pos = torch.nonzero(differ)
    return {"ref_invalid": int(ref_inv.sum()), "recorded_invalid": int(npu_inv.sum()), "differ": int(differ.sum()),
            "positions": [{"batch": int(p[0]), "head": int(p[1]), "row": int(p[2]),
                           "reference": "invalid" if bool(ref_inv[tuple(p)]) else "valid",
                           "recorded": "invalid" if bool(npu_inv[tuple(p)]) else "valid"}
                          for p in pos[: opts.max_positions]]}


def _dropout_seed(rec: Record, named: dict, call: CallReport, given: tuple[int, int] | None = None) -> bool:
    """Set seed/offset of a forward call with a generated mask from the recorded outputs (or
    ``given``); False when they are unknown (the call is then skipped)."""
    try:
        kp = float(named.get("keep_prob", 1.0))
    except (TypeError, ValueError):
        return True
    if kp >= 1.0 or named.get("dropout_mask") is not None:
        return True
    out = rec.outputs or []
    seed = out[4] if len(out) > 4 else None
    off = out[5] if len(out) > 5 else None
    if given is not None:
        seed, off = given
    if isinstance(seed, Tensor):
        seed = int(seed.reshape(-1)[0])
    if isinstance(off, Tensor):
        off = int(off.reshape(-1)[0])
    if seed is None or not isinstance(seed, int) or seed == 0:
        given = named.get("seed", 0)
        if isinstance(given, int) and given != 0:
            seed, off = given, named.get("offset", 0)
        else:
            return False
    named["seed"], named["offset"] = int(seed), int(off or 0)
    call.flags.append("bits assumed")
    call.notes.append(f"dropout mask regenerated with semantics §5's Philox model from seed={seed}, offset={off}")
    return True


def compare_record(rec: Record, opts: Options) -> list[CallReport]:
    """Check one recorded call (and its autograd backward, when recorded)."""
    t0 = time.perf_counter()
    is_grad = rec.api in GRAD_APIS
    call = CallReport(rec.name, rec.api, "grad" if is_grad else "forward", SKIPPED, notes=list(rec.notes))
    reports = [call]
    engine = opts.engine or fascore.current_engine_name()
    loaded = _load(rec, call, reports, opts)
    if loaded is None:
        return reports
    named, outputs = loaded
    refs = _references(rec, named, call, reports, engine, opts)
    call.seconds = time.perf_counter() - t0
    if refs is None:
        return reports
    g, rs, r64, lib = refs
    if outputs is None:
        call.message = "the record holds no outputs"
        return reports
    if is_grad:
        _check_grads(call, rec.api, named, outputs, r64, rs, lib, g, opts)
    else:
        _check_forward(call, outputs, r64, rs, lib, g, opts)
    _verdict(call)
    if call.verdict == OUT and opts.diagnose and not is_grad:
        call.diagnosis = diagnose(rec.api, named, outputs, r64, call, g, opts)
    _summarise(call)
    call.seconds = time.perf_counter() - t0
    if rec.backward and not is_grad:
        reports.append(_compare_backward(rec, named, outputs, g, engine, opts, call))
    return reports


def _load(rec: Record, call: CallReport, reports: list[CallReport], opts: Options) -> tuple[dict, Any] | None:
    """The record's arguments by name and its outputs, or None (the reason in ``call``)."""
    if rec.api not in APIS or not hasattr(fascore, rec.api):
        call.message = f"{rec.api}: not an entry point of this fascore"
        return None
    missing = find_missing([rec.args, rec.kwargs])
    if missing:
        call.message = "the record lacks inputs: " + "; ".join(missing[:3])
        return None
    try:
        args, kwargs = materialize(rec.args), materialize(rec.kwargs)
        outputs = materialize(rec.outputs) if rec.outputs is not None else None
    except OSError as e:
        call.message = str(e)
        return None
    try:
        named = _bind(rec.api, args, kwargs)
    except TypeError as e:
        call.verdict, call.message = INVALID, f"the recorded arguments do not fit {rec.api}: {e}"
        return None
    if rec.api in GRAD_APIS:
        _flag_assumed_bits(call, named)
    elif not _dropout_seed(Record(rec.name, rec.api, args, kwargs, outputs), named, call, opts.seeds.get(rec.name)):
        call.message = ("keep_prob < 1 with a generated dropout mask, but the record holds no seed/offset "
                        "(msprobe drops outputs 4 and 5 of npu_fusion_attention): the mask cannot be regenerated "
                        "(give them with --dropout-seed NAME=SEED,OFFSET if known)")
        if rec.backward:
            reports.append(CallReport(rec.name + " backward", rec.api, "backward", SKIPPED, call.message))
        return None
    return named, outputs


def _flag_assumed_bits(call: CallReport, named: dict) -> None:
    try:
        kp = float(named.get("keep_prob", 1.0))
    except (TypeError, ValueError):
        kp = 1.0
    if kp < 1.0 and named.get("dropout_mask") is None:
        call.flags.append("bits assumed")
        call.notes.append(f"dropout mask regenerated with semantics §5's Philox model from seed={named.get('seed', 0)}, "
                          f"offset={named.get('offset', 0)}")


def _references(rec: Record, named: dict, call: CallReport, reports: list[CallReport], engine: str,
                opts: Options) -> tuple | None:
    """(geometry, ref_same, ref64, fascore's engine) of the call, or None: the validation's
    FlashAttentionError makes the verdict "inputs invalid" (out of memory: skipped)."""
    try:
        g = _geometry(named)
        call.geometry = g.as_dict(named)
    except Exception as e:  # noqa: BLE001 - the validation below names the problem
        g = None
        call.notes.append(f"geometry: {type(e).__name__}: {e}")
    try:
        rs, _ = _call_ref(rec.api, named, call.notes)
    except fascore.FlashAttentionError as e:
        verdict = SKIPPED if e.status == fascore.ACLNN_ERR_RUNTIME_ERROR else INVALID
        call.verdict, call.message, call.status = verdict, str(e), e.status
        if rec.backward:
            reports.append(CallReport(rec.name + " backward", rec.api, "backward", verdict, str(e), e.status))
        return None
    if g is None:
        call.message = "could not read the call's geometry"
        return None
    try:
        r64, _ = _call_ref(rec.api, _as64(rec.api, named), call.notes)
    except fascore.FlashAttentionError as e:
        call.verdict, call.message, call.status = SKIPPED, f"float64 reference: {e}", e.status
        return None
    try:
        lib, _ = _call(rec.api, named, engine, opts.device)
    except Exception as e:  # noqa: BLE001 - a baseline failure is reported, not fatal
        lib = None
        call.notes.append(f"fascore engine {engine!r} failed on this call: {type(e).__name__}: {e}")
    if rec.recorded_error:
        e = rec.recorded_error
        call.notes.append(f"the recorded run raised {e.get('type')}: {e.get('message')}")
    return g, rs, r64, lib


def _check_forward(call: CallReport, outputs: list, r64: tuple, rs: tuple, lib: tuple | None, g: Geometry,
                   opts: Options) -> None:
    checks = [("attention_out", 0, "out", "q"), ("softmax_max", 1, "stat_max", "stats"),
              ("softmax_sum", 2, "stat_sum", "stats")]
    for name, i, rule, role in checks:
        x = outputs[i] if i < len(outputs) else None
        if not _is_tensor(x):
            call.notes.append(f"{name} not recorded")
            continue
        call.tensors.append(check_tensor(name, x, r64[i], rs[i], lib[i] if lib is not None else None, rule, role,
                                         g, opts))
    if all(_is_tensor(outputs[i]) for i in range(3)) and tuple(outputs[1].shape) == tuple(r64[1].shape) \
            and tuple(outputs[0].shape) == tuple(r64[0].shape):
        call.invalid_rows = _invalid_rows(outputs[1], outputs[2], outputs[0], r64[1], g, opts)


def _check_grads(call: CallReport, api: str, named: dict, outputs: list, r64: tuple, rs: tuple, lib: tuple | None,
                 g: Geometry, opts: Options) -> None:
    xo = _grad_outputs(api, outputs, named)
    ro, so = _grad_outputs(api, r64, named), _grad_outputs(api, rs, named)
    lo = _grad_outputs(api, lib, named) if lib is not None else {}
    for name in ("dq", "dk", "dv", "dpse", "dq_rope", "dk_rope", "dsink"):
        x, r = xo.get(name), ro.get(name)
        if not _is_tensor(x) or _empty(r) and _empty(x):
            continue
        if _empty(r):
            if x.numel():
                call.notes.append(f"{name}: recorded {list(x.shape)}, fascore returns none (not compared)")
            continue
        call.tensors.append(check_tensor(name, x, r, so.get(name), lo.get(name), "grad", _ROLE[name], g, opts))


def _compare_backward(rec: Record, named: dict, outputs: list, g: Geometry, engine: str, opts: Options,
                      fwd: CallReport) -> CallReport:
    t0 = time.perf_counter()
    call = CallReport(rec.name + " backward", rec.api, "backward", SKIPPED, flags=list(fwd.flags),
                      geometry=fwd.geometry)
    try:
        bw = materialize(rec.backward)
    except OSError as e:
        call.message = str(e)
        return call
    dy = bw.get("dy")
    if not _is_tensor(dy):
        call.message = "the backward record holds no dy (gradient of attention_out)"
        return call
    grads = bw.get("grads")
    if grads is None:
        grads = _map_grad_list(named, rec.api, bw.get("grad_list") or [])
    wrt = [n for n in ("query", "key", "value", "pse", "sink", "query_rope", "key_rope")
           if _is_tensor(grads.get(n)) and _is_tensor(named.get(n))]
    if "pse" in wrt and _pse_type(rec.api, named) not in (0, 1):
        wrt.remove("pse")
    if not wrt:
        call.message = "the backward record holds no input gradients"
        return call
    try:
        _, gs = _call_ref(rec.api, named, call.notes, wrt=wrt, dy=dy)
        _, g64 = _call_ref(rec.api, _as64(rec.api, named), call.notes, wrt=wrt, dy=dy.to(torch.float64))
    except fascore.FlashAttentionError as e:
        verdict = SKIPPED if e.status == fascore.ACLNN_ERR_RUNTIME_ERROR else INVALID
        call.verdict, call.message, call.status = verdict, str(e), e.status
        return call
    try:
        _, gl = _call(rec.api, named, engine, opts.device, wrt=wrt, dy=dy)
    except Exception as e:  # noqa: BLE001
        gl = {}
        call.notes.append(f"fascore engine {engine!r} failed on this backward: {type(e).__name__}: {e}")
    for n in wrt:
        gname = GRAD_NAME[n]
        if g64.get(n) is None:
            call.notes.append(f"{gname}: fascore computes no gradient for {n}")
            continue
        call.tensors.append(check_tensor(gname, grads[n], g64[n], gs.get(n), gl.get(n), "grad", _ROLE[gname], g, opts))
    _verdict(call)
    _summarise(call)
    call.seconds = time.perf_counter() - t0
    return call


def _verdict(call: CallReport) -> None:
    if not call.tensors:
        call.verdict = SKIPPED
        call.message = call.message or "nothing recorded to compare"
        return
    bad = [t for t in call.tensors if not t.ok]
    call.verdict = OUT if bad else WITHIN


def _where(t: TensorReport) -> str:
    """Where one output is beyond its bound: heads, row blocks, NaN rows."""
    bits = []
    n_heads = len(t.heads)
    if t.bad_heads:
        bits.append(f"heads {_compact(t.bad_heads)} of {n_heads}" if len(t.bad_heads) < n_heads else
                    f"all {n_heads} heads")
    nb = len(t.block_max[0]) if t.block_max else 0
    if t.bad_blocks:
        bits.append(f"{t.row_axis} blocks {_compact(t.bad_blocks)} of {nb}" if len(t.bad_blocks) < nb else
                    f"all {nb} {t.row_axis} blocks")
    if t.n_nan or t.n_inf:
        rows = [r for r in t.nonfinite_rows if "row" in r]
        more = sum(r.get("more", 0) for r in t.nonfinite_rows)
        first = f" (first: batch {rows[0]['batch']}, head {rows[0]['head']}, row {rows[0]['row']})" if rows else ""
        bits.append(f"{t.n_nan} NaN / {t.n_inf} inf in {len(rows) + more} rows{first}")
    if t.frac_beyond is not None and t.frac_beyond > 0.005:
        bits.append(f"{100 * t.frac_beyond:.2f} % of elements beyond 0.5 % of |ref64| (limit 0.5 %)")
    if t.message:
        bits.append(t.message)
    return ", ".join(bits)


def _summarise(call: CallReport) -> None:
    """One line of where: per failing output, its heads / blocks / NaNs (outputs failing in the
    same places share the line), and the invalid rows that differ."""
    if call.verdict == WITHIN:
        w = call.worst()
        if w is not None:
            call.message = f"worst {w.name}: {_ratio_text(w)}"
        return
    if call.verdict != OUT:
        return
    groups: dict[str, list[str]] = {}
    for t in call.tensors:
        if not t.ok:
            groups.setdefault(_where(t), []).append(t.name)
    parts = [f"{', '.join(names)}: {where}" if where else ", ".join(names) for where, names in groups.items()]
    if call.invalid_rows.get("differ"):
        parts.append(f"{call.invalid_rows['differ']} invalid rows differ")
    call.message = "; ".join(parts)


def _ratio_text(t: TensorReport) -> str:
    if t.rule.startswith("stat"):
        return f"max|err| {t.max_err:.2e} ({t.bound:.3g} x tolerance)"
    return f"max|err| {t.max_err:.2e} vs bound {t.bound:.2e}"


def _tile_text(x: dict) -> str:
    """A worst tile as 'h5 q2 12x' (head, query/key block, ratio to the bound)."""
    blk = (f"q{x['q_block']}" if "q_block" in x else "") + ("/" if "q_block" in x and "k_block" in x else "") + \
        (f"k{x['k_block']}" if "k_block" in x else "") + (f"b{x['block']}" if "block" in x else "")
    r = x["ratio"]
    return f"h{x['head']} {blk} {'inf' if r == math.inf else f'{r:.3g}'}x"


def _compact(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    xs = sorted(xs)
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


# =========================================================================== diagnosis
def diagnose(api: str, named: dict, outputs: list, r64: Any, call: CallReport, g: Geometry, opts: Options) -> list[str]:
    """Likely causes of an out-of-bounds forward call."""
    found: list[str] = []
    # logits rounded before the softmax: the row max is then exactly the rounded exact max
    x_max, r_max = outputs[1], r64[1]
    if _is_tensor(x_max) and tuple(x_max.shape) == tuple(r_max.shape):
        xm = x_max.double().reshape(-1)
        rm = r_max.double().reshape(-1)
        live = (rm.abs() != FLT_MAX) & torch.isfinite(rm) & torch.isfinite(xm)
        off = live & ((xm - rm).abs() > 1e-5 * rm.abs().clamp_min(1.0))
        if int(off.sum()) and int(live.sum()):
            for dt, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
                same = float((xm[live] == rm[live].to(dt).double()).double().mean())
                if same >= 0.5:
                    found.append(f"softmax_max equals the {label} rounding of the exact row max in {100 * same:.0f} % "
                                 f"of rows: the logits were rounded to {label} before the softmax (semantics §3 keeps them "
                                 "float32)")
                    break
    x_out = outputs[0]
    work = g.b * g.n1 * g.sq * g.skv if g.layout != "TND" else g.n1 * g.sq * g.skv
    if not _is_tensor(x_out) or work > opts.diagnose_budget:
        if work > opts.diagnose_budget:
            call.notes.append(f"re-run diagnosis skipped: {work} attention elements > budget {opts.diagnose_budget}")
        return found
    t_out = next((t for t in call.tensors if t.name == "attention_out"), None)
    if t_out is None:
        return found
    base_err = t_out.max_err
    x64 = x_out.double()
    alts: list[tuple[str, dict]] = []
    mode = int(named.get("sparse_mode", 0) or 0)
    mask = named.get("atten_mask")
    for m in range(9):
        if m != mode:
            alts.append((f"sparse_mode={m}", dict(named, sparse_mode=m)))
    if _is_tensor(mask):
        inv = mask.logical_not() if mask.dtype == torch.bool else (mask == 0).to(mask.dtype)
        alts.append(("atten_mask inverted (1 = keep)", dict(named, atten_mask=inv)))
        alts.append(("atten_mask ignored", dict(named, atten_mask=None)))
        if mask.dim() >= 2 and mask.shape[-1] == mask.shape[-2]:
            alts.append(("atten_mask transposed", dict(named, atten_mask=mask.transpose(-1, -2).contiguous())))
    sk = "scale_value" if "scale_value" in named else "scale"
    scale = float(named.get(sk, 1.0))
    if scale != 1.0:
        alts.append((f"{sk}=1 (scale not applied)", dict(named, **{sk: 1.0})))
    inv_sqrt = 1.0 / math.sqrt(max(1, g.d))
    if abs(scale - inv_sqrt) > 1e-6 * inv_sqrt:
        alts.append((f"{sk}=1/sqrt(D)={inv_sqrt:.6g}", dict(named, **{sk: inv_sqrt})))
    try:
        kp = float(named.get("keep_prob", 1.0))
    except (TypeError, ValueError):
        kp = 1.0
    if kp < 1.0:
        alts.append(("keep_prob=1 (no dropout)", dict(named, keep_prob=1.0)))
    fits, near = [], []
    for label, alt in alts:
        try:
            with _quiet():
                ra, _ = _call_ref(api, _as64(api, alt), [])
        except (fascore.FlashAttentionError, ValueError, TypeError):
            continue
        if tuple(ra[0].shape) != tuple(x64.shape):
            continue
        err = (x64 - ra[0].double()).abs().nan_to_num(nan=math.inf, posinf=math.inf)
        e = float(err.max()) if err.numel() else 0.0
        thr = torch.maximum(0.005 * ra[0].double().abs(), torch.full_like(err, 2.5e-5))
        frac = float((err > thr).double().mean()) if err.numel() else 0.0
        if e <= t_out.bound and frac <= 0.005:
            fits.append((e, label))
        elif e < 0.25 * base_err:
            near.append((e, label))
    if fits:
        found.append("attention_out matches the reference of the call with " + " / ".join(
            f"{lbl} (max|err| {e:.2e})" for e, lbl in sorted(fits)) + f" instead of {base_err:.2e} as recorded")
    elif near:
        e, lbl = min(near)
        found.append(f"closest altered call: {lbl} (max|err| {e:.2e} against {base_err:.2e} as recorded)")
    return found


class _quiet:
    """Silence the sparse_mode-without-mask warning while trying alternatives."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._w.__exit__(*exc)


# =========================================================================== heatmaps
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def heatmap(call: CallReport, path: Path) -> list[dict]:
    """|error| by head x row block for every compared output of ``call``, one PNG; returns the
    subplots' titles and axis labels. Colour: log10 of the block's max |x - ref64|; x marks
    blocks holding elements beyond semantics §7's bound; blue blocks hold NaN/inf."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    ts = [t for t in call.tensors if t.block_max]
    if not ts:
        return []
    cols = min(3, len(ts))
    rows = -(-len(ts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.1 * rows + 0.5), squeeze=False)
    info = []
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#00b3ff")  # NaN / inf blocks
    for ax, t in zip(axes.reshape(-1), ts):
        m = np.array(t.block_max, dtype=float)
        finite = m[np.isfinite(m) & (m > 0)]
        lo = float(finite.min()) if finite.size else 1e-12
        hi = float(finite.max()) if finite.size else 1.0
        bound_cell = t.bound if not t.rule.startswith("stat") else None
        if bound_cell:
            lo, hi = min(lo, bound_cell / 100), max(hi, bound_cell * 2)
        lo, hi = math.log10(max(lo, 1e-300)), math.log10(max(hi, 1e-300))
        if hi - lo < 1:
            lo = hi - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.ma.masked_invalid(np.log10(np.where(m > 0, m, 10.0 ** lo)))
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi, origin="upper")
        bad = np.array(t.block_beyond, dtype=float) > 0 if t.block_beyond else np.zeros_like(m, dtype=bool)
        ys, xs = np.nonzero(bad)
        if len(xs) and len(xs) <= 2000:
            ax.scatter(xs, ys, marker="x", s=14, c="#00c070", linewidths=0.9)
        xlabel = f"{t.row_axis} block ({t.block} rows)"
        ylabel = "kv head" if t.row_axis == "key" else "head"
        title = f"{t.name}: max|err| {t.max_err:.2e}" + (f", bound {t.bound:.1e}" if bound_cell else "")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9, color="black" if t.ok else "#c00000")
        fig.colorbar(im, ax=ax, label="log10 max |x - ref64|", fraction=0.08, pad=0.03)
        info.append({"tensor": t.name, "title": title, "xlabel": xlabel, "ylabel": ylabel, "shape": list(m.shape)})
    for ax in axes.reshape(-1)[len(ts):]:
        ax.axis("off")
    fig.suptitle(f"{call.name} ({call.kind}): {call.verdict}    x: beyond semantics §7's bound    blue: NaN/inf",
                 fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.94, bottom=0.13 / rows + 0.02, top=1 - 0.16 / rows, wspace=0.45,
                        hspace=0.55)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return info


# =========================================================================== entry points
def compare(path: str | Path, out_dir: str | Path | None = None, *, engine: str | None = None, device: str = "cpu",
            block: int = 128, match: str | None = None, limit: int | None = None, diagnose: bool = True,
            heatmaps: bool | str = True, seeds: dict[str, tuple[int, int]] | None = None,
            progress: Callable[[CallReport], None] | None = None) -> Report:
    """Check every recorded npu_fusion_attention* call in ``path`` (msprobe dump or replay bundle).

    ``out_dir``: where heatmap PNGs go (None: none); ``heatmaps``: True / "failing" for the calls
    out of bounds, "all" for every compared call, False / "none" for none. ``engine``: the fascore engine run as the
    baseline (default: fascore's default). ``device``: where that engine runs. ``block``: rows
    per query/key block. ``match``: only calls whose name contains this regex. ``limit``: at
    most this many calls. ``seeds``: {call name: (seed, offset)} for dropout calls whose record
    lacks them (msprobe).
    """
    if block < 1:
        raise ValueError(f"block={block}: must be >= 1")
    mode = {True: "failing", False: "none"}.get(heatmaps, heatmaps) if isinstance(heatmaps, bool) else heatmaps
    if mode not in ("failing", "all", "none"):
        raise ValueError(f"heatmaps={heatmaps!r}: must be True, False, 'failing', 'all' or 'none'")
    if engine is not None and engine not in fascore.available_engines():
        raise ValueError(f"engine={engine!r}: must be one of {fascore.available_engines()}")
    fmt, records = load_records(path)
    if match:
        rx = re.compile(match)
        records = [r for r in records if rx.search(r.name) or rx.search(r.api)]
    if limit is not None:
        records = records[:limit]
    opts = Options(engine=engine, device=device, block=block, diagnose=diagnose,
                   out_dir=Path(out_dir) if out_dir is not None and mode != "none" else None, seeds=dict(seeds or {}))
    report = Report(str(path), fmt, [], engine=engine or fascore.current_engine_name())
    for rec in records:
        for c in compare_record(rec, opts):
            if opts.out_dir is not None and c.tensors and (mode == "all" or c.verdict == OUT):
                p = opts.out_dir / f"{_slug(c.name)}.{c.kind}.png"
                c.heatmap_axes = heatmap(c, p)
                c.heatmap = str(p) if c.heatmap_axes else None
            report.calls.append(c)
            if progress:
                progress(c)
    return report


def print_report(report: Report, console: Any = None, detail: bool = True) -> None:
    """The report as rich tables: one row per call, then the outputs of calls that failed."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = console or Console(highlight=False)
    colour = {WITHIN: "green", OUT: "red", INVALID: "yellow", SKIPPED: "dim"}
    t = Table(title=f"fascore compare: {report.source} ({report.format}), reference float64, baseline engine "
                    f"{report.engine!r}", box=box.SIMPLE_HEAD)
    for col, ratio in (("call", 2), ("kind", 1), ("shape", 2), ("verdict", 2), ("worst output", 3), ("where", 4)):
        t.add_column(col, overflow="fold", ratio=ratio)
    for c in report.calls:
        g = c.geometry
        shape = (f"{g.get('layout', '?')} {g.get('dtype', '')} B{g.get('B')} N{g.get('N1')}/{g.get('N2')} "
                 f"S{g.get('Sq')}x{g.get('Skv')} D{g.get('D')}"
                 + (f" m{g['sparse_mode']}" if g.get("sparse_mode") else "")
                 ) if g else "-"
        w = c.worst()
        worst = f"{w.name}: {_ratio_text(w)}" if w is not None else "-"
        verdict = f"[{colour[c.verdict]}]{c.verdict}[/{colour[c.verdict]}]" + (
            f" ({', '.join(c.flags)})" if c.flags else "")
        where = {WITHIN: "", OUT: c.message, INVALID: "see below", SKIPPED: "see below"}[c.verdict]
        t.add_row(c.name, c.kind, shape, verdict, worst if c.verdict in (WITHIN, OUT) else "-", where)
    con.print(t)
    if detail:
        for c in report.calls:
            if c.verdict != OUT:
                continue
            d = Table(title=f"{c.name} ({c.kind}): {c.verdict}", box=box.SIMPLE_HEAD)
            for col in ("output", "ok", "max |err|", "bound", "fascore", "beyond", "NaN/inf", "heads",
                        "worst blocks"):
                d.add_column(col, overflow="fold")
            for tr in c.tensors:
                tiles = " ".join(_tile_text(x) for x in tr.worst_tiles[:3])
                stat = tr.rule.startswith("stat")
                d.add_row(tr.name, "[green]yes[/green]" if tr.ok else "[red]no[/red]", f"{tr.max_err:.2e}",
                          f"{tr.bound:.3g}x tol" if stat else f"{tr.bound:.2e}",
                          "-" if tr.fascore_err is None else f"{tr.fascore_err:.2e}",
                          (f"{100 * tr.n_beyond / tr.n:.2f} %" if tr.n else "0") if tr.n_beyond else "0",
                          f"{tr.n_nan}/{tr.n_inf}" if tr.n_nan or tr.n_inf else "-",
                          _compact(tr.bad_heads) or "-", tiles or "-")
            con.print(d)
            for line in c.diagnosis:
                con.print(f"  [bold]diagnosis[/bold]: {line}")
            if c.invalid_rows.get("differ"):
                iv = c.invalid_rows
                con.print(f"  invalid rows: {iv['differ']} differ (reference {iv['ref_invalid']}, "
                          f"recorded {iv['recorded_invalid']})")
            if c.heatmap:
                con.print(f"  heatmap: {c.heatmap}")
        for c in report.calls:
            if c.verdict == INVALID:
                con.print(f"[yellow]{c.name}: inputs invalid[/yellow] (status {c.status}): {c.message}")
            elif c.verdict == SKIPPED:
                con.print(f"[dim]{c.name}: skipped: {c.message}[/dim]")
            for n in c.notes:
                con.print(f"[dim]  note ({c.name}): {n}[/dim]")
    n = {v: report.count(v) for v in (WITHIN, OUT, INVALID, SKIPPED)}
    summary = ", ".join(f"{k} {v}" for k, v in n.items() if v) or "no calls"
    con.print(("[red]" if not report.ok else "[green]") + f"{len(report.calls)} calls: {summary}" +
              ("[/red]" if not report.ok else "[/green]"))


def compare_command(path: str | Path, out_dir: str | Path | None = "compare_out", json_out: str | Path | None = None,
                    *, engine: str | None = None, device: str = "cpu", block: int = 128, match: str | None = None,
                    limit: int | None = None, diagnose: bool = True, heatmaps: bool | str = True,
                    dropout_seeds: list[str] | None = None, console: Any = None, quiet: bool = False) -> int:
    """The ``fascore compare`` command: compare, print, write JSON/PNGs; returns the exit code
    (1 when a call is out of bounds, 0 otherwise, 2 on usage errors)."""
    from rich.console import Console

    con = console or Console(highlight=False)
    try:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here")
        seeds = dict(_parse_seed(x) for x in dropout_seeds or [])
        report = compare(path, out_dir, engine=engine, device=device, block=block, match=match,
                         limit=limit, diagnose=diagnose, heatmaps=heatmaps, seeds=seeds)
    except (FileNotFoundError, ValueError, json.JSONDecodeError, re.error) as e:
        con.print(f"[red]fascore compare: {e}[/red]")
        return 2
    if not quiet:
        print_report(report, con)
    if json_out is not None:
        report.to_json(json_out)
        if not quiet:
            con.print(f"wrote {json_out}")
    if out_dir is not None and not quiet and any(c.heatmap for c in report.calls):
        con.print(f"heatmaps in {out_dir}/")
    return report.exit_code


def _parse_seed(text: str) -> tuple[str, tuple[int, int]]:
    """'NPU.npu_fusion_attention.3=1234,24' -> (name, (1234, 24)); the offset defaults to 0."""
    name, sep, val = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        parts = [int(x, 0) for x in val.split(",")]
        if len(parts) not in (1, 2):
            raise ValueError
    except ValueError:
        raise ValueError(f"--dropout-seed {text!r}: expected NAME=SEED or NAME=SEED,OFFSET") from None
    return name, (parts[0], parts[1] if len(parts) == 2 else 0)
